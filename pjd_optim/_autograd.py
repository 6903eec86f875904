"""Gramian sources without hooks: autograd's (one VJP per objective) and the closed one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ._distributed import Ranks
from ._engine import GramianSource
from ._pass import GramianPass, Pass
from .gramian import sum_of_gramians


class AutogradGramian(GramianSource):
    """Exact Gramian from one VJP per loss (vmapped when the graph allows, else a loop)."""

    def __init__(self, considered: Sequence[Tensor]) -> None:
        self._considered = list(considered)

    def considered(self) -> list[Tensor]:
        return self._considered

    def begin(self, losses: Tensor, ranks: Ranks, keep_graph: bool = False) -> Pass:
        if ranks.sharded:
            raise ValueError(
                "gramian_mode='autograd' does not support FSDP-sharded models (its per-loss "
                "backward cannot differentiate w.r.t. sharded parameters): use "
                "gramian_mode='hooks'. Nothing was changed."
            )
        gramian_of = lambda: autograd_gramian(losses, self._considered)  # noqa: E731
        return GramianPass(losses.reshape(-1), gramian_of, ranks)

    def task_gramian(self, losses: Sequence[Tensor]) -> Tensor:
        return autograd_gramian(torch.stack(list(losses)), self._considered)


def autograd_gramian(losses: Tensor, params: Iterable[Tensor]) -> Tensor:
    """Exact Gramian from one VJP per loss (vmapped when the graph allows, else a loop)."""
    flat = losses.flatten()
    inputs = [p for p in params if p.requires_grad]
    eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    try:
        jac = torch.autograd.grad(
            flat, inputs, eye, retain_graph=True, is_grads_batched=True, materialize_grads=True
        )
    except RuntimeError:
        rows = [
            torch.autograd.grad(flat, inputs, e, retain_graph=True, materialize_grads=True)
            for e in eye
        ]
        jac = tuple(torch.stack(col) for col in zip(*rows, strict=True))
    return sum_of_gramians(list(jac))


class ClosedGramian(GramianSource):
    """After ``close()``: the hooks are gone, so no Gramian can be computed."""

    def begin(self, losses: Tensor, ranks: Ranks, keep_graph: bool = False) -> Pass:
        raise self._closed()

    def begin_tasks(
        self, tasks: Sequence[Tensor], trainable: Sequence[Tensor], ranks: Ranks
    ) -> Pass:
        raise self._closed()

    @staticmethod
    def _closed() -> ValueError:
        return ValueError(
            "This PartialJDOptimizer was closed (its hooks were removed), so it cannot take a "
            "Jacobian-descent step any more: build a new one, or call step() for a plain step."
        )
