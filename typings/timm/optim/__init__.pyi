from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

def create_optimizer_v2(
    model_or_params: nn.Module | ParamsT,
    opt: str = "sgd",
    lr: float | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    foreach: bool | None = None,
    filter_bias_and_bn: bool = True,
    fallback_list: Collection[str] = (),
    fallback_no_weight_decay: bool = False,
    layer_decay: float | None = None,
    layer_decay_min_scale: float = 0.0,
    layer_decay_no_opt_scale: float | None = None,
    param_group_fn: Callable[[nn.Module], ParamsT] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer: ...

class Lookahead(torch.optim.Optimizer):
    def __init__(
        self, base_optimizer: torch.optim.Optimizer, alpha: float = 0.5, k: int = 6
    ) -> None: ...
