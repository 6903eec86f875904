"""The record of one zoo architecture and its per-sample loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

B = 6


@dataclass
class Case:
    """A model, a batch, the considered part and per-sample losses of the model's output.

    ``resumed``: whether the step may resume the trunk's backward at the considered part's
    boundary (``False`` where that would not be exact, and ``losses.backward(w)`` must run)."""

    model: nn.Module
    inputs: Tensor
    considered: Sequence[nn.Module | Tensor]
    loss: Callable[[Tensor], Tensor]
    resumed: bool = True


def mse(out: Tensor) -> Tensor:
    """Squared error to fixed targets of random sign per sample, so that the losses conflict."""
    generator = torch.Generator().manual_seed(0)
    target = 3 * torch.randn(out.shape, generator=generator, dtype=torch.float64)
    target = target.to(dtype=out.dtype, device=out.device)
    return (out - target).pow(2).flatten(start_dim=1).mean(dim=1)
