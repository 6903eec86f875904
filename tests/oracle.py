"""The test oracle of DESIGN.md §2: per-sample ``autograd.grad`` loops, independent of hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def oracle_jacobian(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``J[i] = ∇_θ losses[i]`` over ``params``, one ``autograd.grad`` per loss."""
    rows = []
    for loss in losses.flatten():
        grads = torch.autograd.grad(
            loss, params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def oracle_gramian(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    jac = oracle_jacobian(losses, params)
    return jac @ jac.T


def oracle_grads(losses: Tensor, params: Sequence[Tensor], weights: Tensor) -> list[Tensor]:
    """Expected ``.grad``: ``Σ_i w_i ∇ losses[i]``."""
    return list(
        torch.autograd.grad(
            losses.flatten(),
            params,
            grad_outputs=weights.to(losses.dtype),
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
    )


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)
