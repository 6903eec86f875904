from collections.abc import Iterable

from torch import Tensor

def dispatch_clip_grad(
    parameters: Iterable[Tensor], value: float, mode: str = "norm", norm_type: float = 2.0
) -> None: ...
