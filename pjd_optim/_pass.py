"""One Jacobian-descent backward over some losses: the protocol of a step.

The optimizer opens a *pass* for its losses at a Gramian source, asks it for the Gramian, weighs
it, and has the pass do the weighted backward::

    jd = source.begin(losses, distributed)   # or source.begin_tasks(task_losses, trainable)
    gramian, finite = jd.gramian()           # checked (refused before anything changes)
    jd.backward(weighting(gramian))          # Σ_i w_i ∇ℓ_i into .grad

What a source needs between the two (where the backward resumes, other ranks' calls, the row
checks) stays in the pass. Under ``distributed="global"`` the Gramian and the weights cover every
rank's objectives; :meth:`Pass.backward` applies this rank's share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from ._checks import is_finite
from ._distributed import ALONE, Ranks, agree, refuse


class Pass:
    """The Gramian of :attr:`objectives` and their weighted backward (by default
    ``objectives.backward(w)``). ``size``/``rank``: the ranks whose objectives the Gramian covers
    (``distributed="global"``); ``ranks``: the ranks the step agrees with, decided once per step;
    ``resumed``, ``check_seconds``, ``received_bytes``: for ``StepInfo``."""

    size = 1
    rank = 0
    ranks = ALONE
    resumed = False
    check_seconds = 0.0
    received_bytes = 0

    def __init__(self, objectives: Tensor) -> None:
        self.objectives = objectives

    def gramian(self) -> tuple[Tensor, bool]:
        """The ``[m, m]`` Gramian, and whether it and the objectives are finite."""
        raise NotImplementedError

    def own(self, weights: Tensor) -> Tensor:
        """This rank's weights among every rank's (all of them when ``size == 1``)."""
        m = self.objectives.numel()
        return weights[self.rank * m : (self.rank + 1) * m]

    def applied(self, weights: Tensor) -> Tensor:
        """The cotangent of this rank's objectives: its weights, times the number of ranks under
        ``"global"`` (DDP averages the gradients of the ranks of its group)."""
        return (self.own(weights) * self.size).to(self.objectives.dtype)

    def backward(self, weights: Tensor) -> None:
        """``Σ_i w_i ∇ℓ_i`` of this rank's objectives into ``.grad``."""
        self.weighted_backward(self.applied(weights))

    def weighted_backward(self, weights: Tensor) -> None:
        torch.autograd.backward(self.objectives, weights)


class GramianPass(Pass):
    """A pass whose Gramian comes from a function of the objectives (autograd's), agreed with
    ``ranks`` as the hooks' pass agrees (whether every rank went through, and is finite)."""

    def __init__(
        self, objectives: Tensor, gramian_of: Callable[[], Tensor], ranks: Ranks = ALONE
    ) -> None:
        super().__init__(objectives)
        self.gramian_of, self.ranks = gramian_of, ranks

    def gramian(self) -> tuple[Tensor, bool]:
        device = self.objectives.device
        try:
            gramian = self.gramian_of()
        except ValueError:
            refuse(device, self.ranks)
            raise
        every_finite, _, _ = agree(device, self.ranks, is_finite(gramian, self.objectives))
        return gramian, every_finite


class TaskPass(GramianPass):
    """Task objectives (see ``_tasks``): the ``heads`` (parameters used after the considered
    part) get the plain sum of the task gradients ``Σ_j ∇ℓ_j``, every other trainable parameter
    ``Σ_j w_j ∇ℓ_j``."""

    def __init__(
        self,
        tasks: Sequence[Tensor],
        gramian_of: Callable[[], Tensor],
        heads: Sequence[Tensor],
        shared: Sequence[Tensor],
    ) -> None:
        super().__init__(torch.stack(list(tasks)), gramian_of)
        self.heads, self.shared = list(heads), list(shared)

    def weighted_backward(self, weights: Tensor) -> None:
        stacked = self.objectives
        if self.heads:
            ones = torch.ones_like(stacked)
            torch.autograd.backward(stacked, ones, inputs=self.heads, retain_graph=True)
        if self.shared:
            torch.autograd.backward(stacked, weights, inputs=self.shared)


class WeightedMean(torch.autograd.Function):
    """Value ``losses.mean()``; gradient ``grad · weights`` to the losses (weights detached)."""

    @staticmethod
    def forward(ctx: FunctionCtx, losses: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(weights)
        ctx.shape = losses.shape  # type: ignore[attr-defined]
        return losses.detach().mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        (weights,) = ctx.saved_tensors
        return (grad * weights).view(ctx.shape), None


def full_precision(losses: Tensor) -> torch.autocast:
    """Autocast off for the Gramian and the weighting (a step called inside an autocast region
    would otherwise run the rules' products and the solver in 16 bits)."""
    return torch.autocast(losses.device.type, enabled=False)
