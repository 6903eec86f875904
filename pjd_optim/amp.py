"""``JDScaler``: timm's ``NativeScaler`` loop for per-instance losses.

``scaler(losses, optimizer, clip_grad=1.0, parameters=model.parameters())`` does
``optimizer.backward(scale · losses)`` (UPGrad's weights do not depend on the scale above
``norm_eps``, see the README), then, as
``NativeScaler``: unscale, clip, ``GradScaler.step`` (skipped on inf/NaN gradients), ``update``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .optimizer import PartialJDOptimizer


class JDScaler:
    """Drop-in for ``timm.utils.NativeScaler`` in training loops that use ``PartialJDOptimizer``."""

    state_dict_key = "amp_scaler"

    def __init__(self, device: str = "cuda", **grad_scaler_kwargs: Any) -> None:
        self._scaler = torch.amp.GradScaler(device, **grad_scaler_kwargs)

    def __call__(
        self,
        losses: Tensor,
        optimizer: PartialJDOptimizer,
        clip_grad: float | None = None,
        clip_mode: str = "norm",
        parameters: Iterable[Tensor] | None = None,
        create_graph: bool = False,
        need_update: bool = True,
    ) -> Tensor:
        """One scaled Jacobian-descent backward (and, if ``need_update``, the step); returns the
        weights. With ``need_update=False`` gradients accumulate, as with ``NativeScaler``.

        The arguments are ``NativeScaler.__call__``'s. An overflow (inf/NaN in the scaled losses
        or Gramian) is a skipped step with a smaller scale, as with ``NativeScaler``."""
        if not isinstance(optimizer, PartialJDOptimizer):
            raise TypeError("JDScaler needs a PartialJDOptimizer (use NativeScaler otherwise).")
        if create_graph:
            raise ValueError(
                "create_graph=True (a second-order optimizer) is not supported by partial "
                "Jacobian descent: its weighted gradient has no graph of its own."
            )
        if clip_grad is not None and parameters is None:
            raise ValueError("clip_grad needs parameters=..., as with NativeScaler.")
        if clip_mode not in ("norm", "value", "agc"):
            raise ValueError(f"clip_mode must be 'norm', 'value' or 'agc', got {clip_mode!r}.")
        weights = optimizer.backward(self._scaler.scale(losses))
        if need_update:
            if clip_grad is not None and parameters is not None:
                self._scaler.unscale_(optimizer)
                _clip(list(parameters), clip_grad, clip_mode)
            self._scaler.step(optimizer)
            self._scaler.update()
        return weights

    def state_dict(self) -> dict[str, Any]:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._scaler.load_state_dict(state_dict)


def _clip(parameters: list[Tensor], value: float, mode: str) -> None:
    if mode == "norm":
        torch.nn.utils.clip_grad_norm_(parameters, value)
    elif mode == "value":
        torch.nn.utils.clip_grad_value_(parameters, value)
    else:  # adaptive gradient clipping lives in timm
        from timm.utils.clip_grad import dispatch_clip_grad

        dispatch_clip_grad(parameters, value, mode=mode)
