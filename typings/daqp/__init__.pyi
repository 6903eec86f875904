# Minimal stubs for the parts of DAQP (a compiled dual active-set QP solver) the solver uses.
from typing import Any

import numpy as np
from numpy.typing import NDArray

class Model:
    def __init__(self) -> None: ...
    @property
    def settings(self) -> dict[str, float]: ...
    @settings.setter
    def settings(self, value: dict[str, float]) -> None: ...
    def setup(
        self,
        H: NDArray[np.float64],
        f: NDArray[np.float64],
        A: NDArray[np.float64],
        bupper: NDArray[np.float64],
        blower: NDArray[np.float64] | None = None,
    ) -> tuple[int, float]: ...
    def update(
        self,
        H: NDArray[np.float64] | None = None,
        f: NDArray[np.float64] | None = None,
        blower: NDArray[np.float64] | None = None,
        sense: NDArray[np.int32] | None = None,
    ) -> int: ...
    def solve(self) -> tuple[NDArray[np.float64], float, int, dict[str, Any]]: ...
