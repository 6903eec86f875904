"""The ranks a step agrees with (:class:`Ranks`), and the global Gramian across them
(``distributed="global"``).

A step's refusals and non-finite skips are agreed by one all-reduce over the ranks of its model:
a ``DistributedDataParallel`` wrapper's process group, else every rank (the optimizer of a model
that DDP wraps later, as accelerate and Lightning do, sees the inner module only); none under
``distributed="none"`` (a model one rank trains alone).

Under ``"global"`` each rank all-gathers the saved inputs and output gradients of every
considered call (``all_gather``, equal shapes on every rank, agreed first), so every rank holds
the factors of the whole global batch, computes the same ``[R·B, R·B]`` Gramian with the same
rules and solves the same UPGrad problem; rank ``r`` then applies its slice of the weights
(times ``R``: DDP averages over its group). Bytes received per rank and step:

    (R − 1) · Σ_calls (numel(inputs) + numel(output grads)) · bytes per element.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._records import Record
from .gramian._registry import map_rows
from .gramian._sharded import sharded


@dataclass(frozen=True)
class Ranks:
    """The ranks of a step: ``size`` of them in ``group`` (``None``: the default group), this
    one's ``rank`` there; ``gather``: the considered calls are all-gathered (``"global"``);
    ``sharded``: every backward pass gathers the model's sharded parameters (FSDP)."""

    size: int = 1
    rank: int = 0
    group: Any = None
    gather: bool = False
    sharded: bool = False


ALONE = Ranks()


class Agreed(ValueError):
    """A refusal every rank raises after agreeing on it (no further collective)."""


def another_rank_refused() -> Agreed:
    return Agreed("Another rank refused this step (its error says why): nothing changed.")


def step_ranks(model: nn.Module, distributed: str) -> Ranks:
    """The ranks a step of ``model`` agrees with (see the module docstring): a
    ``DistributedDataParallel`` wrapper's process group, else every rank; none under
    ``"none"`` or without an initialised process group."""
    if distributed == "none" or not (dist.is_available() and dist.is_initialized()):
        return ALONE
    group = getattr(model, "process_group", None)  # (DistributedDataParallel's)
    sharded = False
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        group, sharded = None, _sharded(model)
    size = dist.get_world_size(group)
    gather = distributed == "global" and size > 1
    return Ranks(size, dist.get_rank(group), group, gather, sharded and size > 1)


def _sharded(model: nn.Module) -> bool:
    r"""Whether ``model`` is sharded across ranks: FSDP2 (its parameters are ``DTensor``\ s) or
    the FSDP1 wrapper."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel) or sharded(model)


def agree(
    device: torch.device, ranks: Ranks, finite: bool = True, count: int = 0, shapes: int = 0
) -> tuple[bool, bool, bool]:
    """An agreement point of a rank that went through (one all-reduce, of the same shape at every
    point, so that a refusing rank's word, :func:`refuse`, meets whichever point the others are
    at): raises :func:`another_rank_refused` where a rank refused; else whether every rank is
    ``finite``, has the same ``count`` (of losses, positions, ...) and the same ``shapes`` (a
    signature of the calls ``"global"`` gathers). Alone: the values themselves."""
    ok, every_finite, same, alike = _reduced(True, finite, count, shapes, device, ranks)
    if not ok:
        raise another_rank_refused()
    return every_finite, same, alike


def refuse(device: torch.device, ranks: Ranks) -> None:
    """This rank refuses the step: it says so at the other ranks' agreement point, where they
    refuse too (none waits for it in a later collective)."""
    _reduced(False, False, 0, 0, device, ranks)


def _reduced(
    ok: bool, finite: bool, count: int, shapes: int, device: torch.device, ranks: Ranks
) -> tuple[bool, bool, bool, bool]:
    """Every rank's ``ok`` and ``finite`` (all of them), and whether ``count`` and ``shapes`` are
    the same on every rank: one MIN all-reduce of six integers."""
    if ranks.size == 1:
        return ok, finite, True, True
    values = torch.tensor([int(ok), int(finite), count, -count, shapes, -shapes], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN, group=ranks.group)
    every_ok, every_finite, fewest, most, least, greatest = values.tolist()
    return bool(every_ok), bool(every_finite), fewest == -most, least == -greatest


def shapes_signature(records: Sequence[Record]) -> int:
    """A signature of the shapes and element sizes of what :class:`CallGatherer` gathers from
    ``records``: equal on ranks whose gathers match (a polynomial code of the integers, the same
    in every process, unlike Python's salted hashes)."""
    code = len(records)
    for _, call in records:
        inputs = [x for x, one in zip(call.tensors(), call.per_sample(), strict=True) if one]
        for x in (*call.output_grads, *inputs):
            for value in (x.ndim, *x.shape, x.element_size()):
                code = (code * 1_000_003 + value) % _PRIME
    return code


_PRIME = (1 << 61) - 1


class CallGatherer:
    """All-gathers the batched tensors of calls along dim 0 over ``ranks``; counts the bytes
    received."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.received_bytes = 0

    def __call__(self, records: Sequence[Record]) -> list[Record]:
        self.received_bytes = 0
        gathered = []
        for module, call in records:
            grads = tuple(self._gather(g) for g in call.output_grads)
            rows = call.output_grads[0].shape[0]
            gathered.append((module, map_rows(call, rows, self._gather, grads)))
        return gathered

    def _gather(self, x: Tensor) -> Tensor:
        size = self.ranks.size
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=self.ranks.group)
        self.received_bytes += x.numel() * x.element_size() * (size - 1)
        return torch.cat(parts)
