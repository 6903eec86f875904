"""Task objectives: ``step([loss_1, …, loss_k])``, one objective per task (multi-task learning).

Each ``loss_j`` is a scalar that may depend on the whole batch (a mean over instances, say). The
Gramian is over the ``k`` task losses: ``G_jl = ⟨∇ℓ_j, ∇ℓ_l⟩`` w.r.t. the considered parameters;
from the hooks, pass ``j`` (cotangent 1 on ``ℓ_j``) gives each considered module's output
gradient for task ``j``, and the module's rule turns it into ``∇ℓ_j`` of its parameters (the
exact layer VJP, summed over instances: no per-instance factorisation is needed, so batch-coupled
layers are fine). Gradients, as TorchJD's ``mtl_backward`` with the considered parameters as its
shared ones:

- parameters used *after* the considered part (task heads: not needed to compute any considered
  layer's input) get the plain sum of the task gradients ``Σ_j ∇ℓ_j`` (a head of task ``j``
  alone: ``∇ℓ_j``);
- the considered parameters, and those before them, get ``Σ_j w_j ∇ℓ_j``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._graph import leaves_and_uses


def heads(
    losses: Sequence[Tensor], considered: Sequence[Tensor], trainable: Sequence[Tensor]
) -> list[Tensor]:
    """The ``trainable`` parameters used after the considered part: reached from the losses, not
    considered, and not reached from the inputs of any operation that uses a considered
    parameter (walks of the losses' autograd graph)."""
    considered_ids = {id(p) for p in considered}
    wanted = {id(p): p for p in trainable}
    reached, inputs = leaves_and_uses([loss.grad_fn for loss in losses], considered_ids)
    below, _ = leaves_and_uses([node for node, _ in inputs], set())
    return [
        wanted[pid]
        for pid in reached
        if pid in wanted and pid not in considered_ids and pid not in below
    ]
