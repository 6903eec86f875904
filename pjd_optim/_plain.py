"""What ``PartialJDOptimizer`` does with non-finite steps, and its steps without losses (a mixin:
the optimizer's state lives in its ``Status``): NaN weights or a skipped step or an error where
the losses or the Gramian are not finite; the weighted backward's gradients checked (finite
losses can still give NaN below the considered part); ``base.step()`` on what is in ``.grad``,
guarded against what a non-finite ``backward(losses)`` left there, with the warnings of a plain
loop. NaN never reaches the parameters."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checks import RestoreGradsOnError, check_weights, nonfinite_gradient
from ._distributed import ALONE, Ranks, agree, refuse
from ._info import Status, StepInfo
from ._pass import Pass
from .weightings import Weighting


class _NonFiniteGradients(Exception):
    """Raised inside the weighted backward to restore the gradients."""


class PlainSteps:
    """``_plain_step`` and the non-finite guard, on the optimizer's ``_status``."""

    _status: Status
    nonfinite: str
    base: Optimizer
    weighting: Weighting
    _considered: list[Tensor]
    param_groups: list[dict[str, Any]]
    _base_step: Callable[[tuple[Any, ...]], None]  # (WrappedOptimizer's)

    def _trainable(self) -> list[Tensor]:
        raise NotImplementedError

    def _weigh(
        self, gramian: Tensor, finite: bool, stop_on_nonfinite: bool, ranks: Ranks
    ) -> Tensor | None:
        """The weighting's weights; where the losses or the Gramian are not finite, ``NaN``
        weights (as ``Tensor.backward`` on an overflowed loss: a non-finite gradient, which
        ``GradScaler`` skips), or, when stopping there, a skipped step (``None``) or an error, as
        ``nonfinite`` says. Every rank's weighting went through, or all refuse (the ranks weigh
        their own Gramians, and a solver may refuse one rank's only; under ``"global"`` every
        rank weighs the same one)."""
        if finite:
            ranks = ALONE if ranks.gather else ranks
            device = gramian.device
            try:
                weights = self.weighting(gramian.detach())
                weights = check_weights(weights, gramian.shape[0], gramian).detach()
            except Exception:
                refuse(device, ranks)
                raise
            agree(device, ranks)
            return weights
        if not stop_on_nonfinite:
            return torch.full_like(gramian[0], torch.nan).detach()
        self._skip_or_raise(
            "Non-finite losses or Gramian (NaN or inf): nothing was changed. Check the data "
            "and the learning rate, skip this batch, or pass nonfinite='skip'."
        )
        return None

    def _guarded_backward(
        self, jd: Pass, weights: Tensor, finite: bool, stop_on_nonfinite: bool
    ) -> tuple[bool, tuple[Tensor, Tensor] | None]:
        """``jd.backward(weights)`` (the gradients restored if it raises); whether it was taken,
        and a parameter with its non-finite gradient if finite losses and Gramian gave one (0·inf
        in the trunk's backward). When stopping there: the gradients restored, and the step
        skipped or an error, as ``nonfinite`` says."""
        nonfinite = None
        trainable = self._trainable()
        try:
            with RestoreGradsOnError(trainable):
                jd.backward(weights)
                nonfinite = nonfinite_gradient(trainable) if finite else None
                stop = stop_on_nonfinite and finite  # (every rank takes the same decision)
                if stop and not agree(weights.device, jd.ranks, nonfinite is None)[0]:
                    raise _NonFiniteGradients
        except _NonFiniteGradients:
            self._skip_or_raise(
                "The weighted backward gave non-finite gradients (NaN or inf) from finite "
                "losses and Gramian, e.g. 0·inf in the backward of sqrt or log at 0 below the "
                "considered part: nothing was changed. Check the model's operations there, skip "
                "this batch, or pass nonfinite='skip'."
            )
            return False, None
        return True, nonfinite

    def _skip_or_raise(self, message: str) -> None:
        """A non-finite step: skipped (counted) under ``nonfinite="skip"``, else the error."""
        if self.nonfinite != "skip":
            raise ValueError(message)
        self._status.skipped_steps += 1
        self._status.last_step = None

    def _record(self, info: StepInfo, finite: bool) -> None:
        """After a Jacobian-descent backward: what it computed, or, if it was not finite, that a
        later plain step must read the gradients first."""
        status = self._status
        status.pending = True
        status.backwards += 1
        status.cleared = False
        status.last_step = info if finite else None
        if not finite:  # (kept through later finite backwards: they accumulate onto it)
            status.read_grads = True

    def _plain_step(self, args: tuple[Any, ...]) -> None:
        """``base.step()`` on the gradients in ``.grad``, unless a non-finite ``backward`` left
        them there (then raise or skip, as ``nonfinite`` says)."""
        status = self._status
        # The caller's backward of a weighted_loss: finite losses and Gramian can still give NaN
        # below the considered part, so its gradients are read too.
        status.read_grads = status.read_grads or status.weighted or status.weighted_nonfinite
        if status.weighted_nonfinite:
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
                stacklevel=4,  # (_plain_step, _step, step, the caller)
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
                stacklevel=4,  # (_plain_step, _step, step, the caller)
            )
        status.pending = status.cleared = status.weighted = False
        self._base_step(args)

    def _finite_or_refused(self) -> bool:
        """Whether the gradients are free of what a non-finite backward left in them (read where
        ``read_grads`` says: its values, as a gradient rewritten out of place stays NaN); if
        not, raise, or skip the step (``False``), as ``nonfinite`` says."""
        status = self._status
        if not status.read_grads:
            return True
        if nonfinite_gradient(self._trainable()) is not None:
            if self.nonfinite == "skip":
                status.skipped_steps += 1
                return False
            raise ValueError(
                "The gradients are not finite (the last backward had NaN or inf losses or "
                "Gramian, or 0·inf below the considered part, e.g. sqrt or log at 0): nothing "
                "was changed. Call zero_grad() and skip this batch, step through a GradScaler "
                "(it skips such steps), or pass nonfinite='skip'."
            )
        status.read_grads = False
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

    def _group_parameters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]
