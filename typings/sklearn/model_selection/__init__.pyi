from typing import Any

from numpy.typing import ArrayLike, NDArray

def train_test_split(
    *arrays: NDArray[Any],
    test_size: float | int | None = None,
    train_size: float | int | None = None,
    random_state: int | None = None,
    shuffle: bool = True,
    stratify: ArrayLike | None = None,
) -> list[NDArray[Any]]: ...
