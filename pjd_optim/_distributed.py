"""Global Gramian across ``torch.distributed`` ranks (``distributed="global"``).

Each rank all-gathers the saved inputs and output gradients of every considered call
(``all_gather``, equal shapes on every rank), so every rank holds the factors of the whole global
batch, computes the same ``[R·B, R·B]`` Gramian with the same rules and solves the same UPGrad
problem; rank ``r`` then applies its slice of the weights. Bytes received per rank and step:

    (R − 1) · Σ_calls (numel(inputs) + numel(output grads)) · bytes per element.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ._records import Record
from .gramian._registry import map_rows


def world() -> tuple[int, int]:
    """``(world size, rank)``, ``(1, 0)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """Whether every rank says ``ok`` (one all-reduce under torch.distributed, else ``ok``): a
    step one rank refuses is refused on all, before any other collective, so none waits."""
    return each_agreed([ok], device)[0]


def step_agreed(ok: bool, finite: bool, rows: int, device: torch.device) -> tuple[bool, bool, bool]:
    """The step's one agreement (one all-reduce; without torch.distributed the values
    themselves): whether every rank went through (a rank that refused says ``ok=False``), whether
    every rank's Gramian and losses are finite, and whether every rank has ``rows`` losses
    (``"global"`` gathers equal shapes)."""
    size, _ = world()
    if size == 1:
        return ok, finite, True
    values = torch.tensor([int(ok), int(finite), rows, -rows], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    every_ok, every_finite, fewest, most = values.tolist()
    return bool(every_ok), bool(every_finite), fewest == -most


def each_agreed(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, whether every rank says it (one all-reduce for all, every rank passing as
    many flags; without torch.distributed the flags themselves)."""
    size, _ = world()
    if size == 1:
        return flags
    values = torch.tensor([1 if f else 0 for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return [bool(v) for v in values.tolist()]


class CallGatherer:
    """All-gathers the batched tensors of calls along dim 0; counts the bytes received."""

    def __init__(self) -> None:
        self.received_bytes = 0

    def __call__(self, records: Sequence[Record]) -> list[Record]:
        size, _ = world()
        self.received_bytes = 0
        gathered = []
        for module, call in records:
            grads = tuple(self._gather(g, size) for g in call.output_grads)
            rows = call.output_grads[0].shape[0]
            gathered.append((module, map_rows(call, rows, lambda x: self._gather(x, size), grads)))
        return gathered

    def _gather(self, x: Tensor, size: int) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        self.received_bytes += x.numel() * x.element_size() * (size - 1)
        return torch.cat(parts)
