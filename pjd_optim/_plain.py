"""The steps without losses of ``PartialJDOptimizer``: ``base.step()`` on what is in ``.grad``,
guarded against what a non-finite ``backward(losses)`` left there, with the warnings of a plain
loop (a mixin: the optimizer's state lives in its ``Status``)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._info import Status


class PlainSteps:
    """``_plain_step`` and the non-finite guard, on the optimizer's ``_status``."""

    _status: Status
    nonfinite: str
    base: Optimizer
    _considered: list[Tensor]
    param_groups: list[dict[str, Any]]

    def _plain_step(self) -> None:
        """``base.step()`` on the gradients in ``.grad``, unless a non-finite ``backward`` left
        them there (then raise or skip, as ``nonfinite`` says)."""
        status = self._status
        if status.weighted_nonfinite:  # the caller's backward of a non-finite weighted_loss
            status.nonfinite_grad = self._a_gradient()
            status.weighted = status.weighted_nonfinite = False
        if not self._finite_or_refused():
            return
        if status.cleared:
            warnings.warn(
                "PartialJDOptimizer.step(): the Jacobian-descent gradient computed by "
                "backward(losses) was cleared by zero_grad() before step(), so this step applies "
                "whatever is in .grad (nothing, unless a plain backward ran since). Call "
                "zero_grad() before backward(losses), not between backward(losses) and step(), "
                "or call optimizer.step(losses).",
                stacklevel=3,
            )
        elif (
            not status.pending
            and not status.weighted
            and not status.warned_plain
            and self._has_gradient()
        ):
            # (No gradient at all is no plain loop: e.g. torch.distributed.checkpoint's
            # initialisation of the optimizer state steps on zero gradients; stay silent.)
            status.warned_plain = True
            warnings.warn(
                "PartialJDOptimizer.step() without losses applied the gradients already in .grad: "
                "a plain step, without Jacobian descent. Pass the per-instance losses, "
                "optimizer.step(losses), or call optimizer.backward(losses) before step().",
                stacklevel=3,
            )
        status.pending = status.cleared = status.weighted = False
        self.base.step()

    def _finite_or_refused(self) -> bool:
        """Whether the gradients are free of what a non-finite ``backward(losses)`` left in them;
        if not, raise, or skip the step (``False``), as ``nonfinite`` says."""
        status = self._status
        if status.nonfinite_grad is None:
            return True
        param, grad = status.nonfinite_grad
        if param.grad is grad and not bool(torch.isfinite(grad).all()):
            if self.nonfinite == "skip":
                status.skipped_steps += 1
                return False
            raise ValueError(
                "The gradients are not finite (the last backward(losses) had NaN or inf "
                "losses or Gramian): nothing was changed. Call zero_grad() and skip this "
                "batch, step through a GradScaler (it skips such steps), or pass "
                "nonfinite='skip'."
            )
        status.nonfinite_grad = None
        return True

    def _has_gradient(self) -> bool:
        """Whether some optimized parameter has a nonzero ``.grad`` (one host-device
        synchronisation per gradient until the first nonzero one)."""
        for p in self._group_parameters():
            grad = p.grad
            if grad is not None:
                values = grad._values() if grad.is_sparse else grad
                if bool(values.any()):
                    return True
        return False

    def _a_gradient(self) -> tuple[Tensor, Tensor] | None:
        """A parameter and its ``.grad`` (to tell later whether that gradient is still there)."""
        for p in (*self._considered, *self._group_parameters()):
            if p.grad is not None:
                return p, p.grad
        return None

    def _group_parameters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]
