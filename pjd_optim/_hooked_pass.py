"""The pass of a hooked step (:class:`HookedPass`): the collection passes, the row checks, the
other ranks' agreement and calls, the resume point."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _maps
from ._checks import is_finite, is_finite_tensor
from ._distributed import Agreed, CallGatherer, Ranks, agree, refuse, shapes_signature
from ._pass import Pass
from ._passes import NotConnected, keeps_graph
from ._records import Record
from ._resume import Resume
from ._resume import find as find_resume
from ._uses import refuse_outside_uses, refuse_unrecorded_uses

if TYPE_CHECKING:
    from ._engine import HookedGramian


class HookedPass(Pass):
    """A step's pass through the hooks: resume point, passes, row checks, other ranks' calls."""

    def __init__(
        self, source: HookedGramian, losses: Tensor, ranks: Ranks, keep_graph: bool
    ) -> None:
        super().__init__(losses.reshape(-1))
        self.resumable = not keep_graph
        self.source, self.losses, self.ranks = source, losses, ranks
        self.size, self.rank = (ranks.size, ranks.rank) if ranks.gather else (1, 0)
        if self.size > 1 and losses.ndim != 1:
            raise ValueError("distributed='global' needs 1-D losses (one per sample).")
        self.gather = CallGatherer(ranks) if self.size > 1 else None
        self.resume: Resume | None = None

    def gramian(self) -> tuple[Tensor, bool]:
        """``[m, m]`` Gramian over ``losses.flatten()``, and whether it and the losses are finite.

        Every row of every considered call is checked to feed one loss (``_maps``); the step is
        refused before anything changes otherwise, on every rank under ``torch.distributed``.
        Under ``"global"`` the calls are all-gathered (``_distributed``): the Gramian is over
        every rank's samples. Where exact, the passes also fill the resume point.
        """
        losses = self.losses
        if self.ranks.sharded:  # (every pass gathers parameters: agree before the first)
            self._agree_first()
        # Resume the trunk's backward at the considered part's boundary where that is exact.
        if self.resumable:
            self.resume = find_resume(losses, self.source.hooks, self.source.plan)
        ranks = self.ranks
        try:
            records, gramian, finite = self._checked()
        except _NotFinite as stopped:  # (another rank's step is not finite: so is this one)
            records, gramian, finite = [], stopped.gramian, False
        except Agreed:
            raise
        except ValueError:
            refuse(losses.device, ranks)
            raise
        # One all-reduce: whether every rank went through, and (the Gramians being local
        # unless "global") whether every rank's is finite, so that all skip, raise or go on
        # together (a rank stepping alone would wait in DDP's all-reduce).
        shapes = shapes_signature(records) if self.gather is not None else 0
        every_finite, same, alike = agree(losses.device, ranks, finite, losses.numel(), shapes)
        if self.gather is not None and not same:
            raise ValueError(
                "distributed='global' needs as many losses on every rank (it gathers the "
                "considered calls): a last batch of another size? Use drop_last=True in the "
                "DataLoader, or distributed='local'. Nothing was changed."
            )
        if self.gather is not None and not alike:
            raise ValueError(
                "distributed='global' gathers the considered calls' inputs and output gradients, "
                "which need the same shapes on every rank: here they differ (sequences padded "
                "to each rank's longest? Pad to one length on every rank, e.g. padding="
                "'max_length' or pad_to_multiple_of, or use distributed='local'). Nothing was "
                "changed."
            )
        if gramian is None:  # "global": the Gramian of every rank's calls
            assert self.gather is not None
            records = self.gather(records)
            self.received_bytes = self.gather.received_bytes
            gramian = self.source._sum(records, losses.numel() * self.size)
            # (every rank's losses too: a NaN added to one rank's losses leaves its rows finite)
            every_finite = every_finite and is_finite(gramian, losses)
        return gramian, every_finite

    def _agree_first(self) -> None:
        """Under FSDP every pass gathers the sharded parameters, so every rank must take as many:
        one all-reduce before the first says whether every rank got this far (a rank that
        refused earlier says no), and, for per-position losses (``[B, T]``, one pass per
        position), whether every rank has as many positions."""
        _, same, _ = agree(self.losses.device, self.ranks, count=self.losses[0].numel())
        if not same:
            raise ValueError(
                f"Per-position losses {tuple(self.losses.shape)} under FSDP need the same "
                "positions on every rank (the step's passes per position each gather the sharded "
                "parameters): pad every rank's batch to one length, or pass one loss per sample. "
                "Nothing was changed."
            )

    def _agree_passes(self, done: bool, finite: bool) -> None:
        """Under FSDP, after the two passes every rank takes: whether each is done (its rows in
        the losses' order, or not finite) or takes more passes. Every rank must do the same: a
        non-finite rank makes every rank stop there (a non-finite step); a mix of both is
        refused on every rank."""
        device = self.losses.device
        every_finite, same, _ = agree(device, self.ranks, finite, int(done))
        if not every_finite:
            m = self.objectives.numel()
            raise _NotFinite(torch.full((m, m), torch.nan, device=device))
        if not same:
            raise Agreed(
                "Under FSDP every rank's step must take the same passes (each gathers the sharded "
                "parameters): here some ranks' losses are in the order of their batch rows and "
                "others' are not (permuted, sorted, subsets). Keep the losses in batch order on "
                "every rank, or reorder them on every rank. Nothing was changed."
            )

    def _checked(self) -> tuple[list[Record], Tensor | None, bool]:
        """The checked records, their Gramian (``None`` under ``"global"``, where it is over
        every rank's calls) and whether it is finite."""
        losses, resume, source = self.losses, self.resume, self.source
        try:
            collected = source.passes.collect(losses, resume)
        except NotConnected:
            refuse_unrecorded_uses(losses, source.owners, set(), source.param_names)
            raise
        reached = {id(r.module) for r in collected.reached}
        refuse_unrecorded_uses(losses, source.owners, reached, source.param_names)
        # (after: a module with no recorded call, e.g. run before the optimizer hooked it, is
        # named as such rather than as used outside its forward)
        refuse_outside_uses(losses, source.hooks, source.owners, source.param_names)
        self.check_seconds = source.passes.check_seconds
        m = collected.m
        start = time.perf_counter()
        fast = _maps.expected(collected)
        self.check_seconds += time.perf_counter() - start
        grads = [g.flatten() for r in collected.reached for g in (*r.call.output_grads, *r.tagged)]
        if fast is not None:
            records, verified = fast
            # Non-finite gradients cannot be checked, and make the step non-finite anyway. Under
            # "global" the Gramian comes after the gather, and under FSDP after the agreement
            # (re-running a module gathers its parameters): the gradients tell finiteness here.
            late = self.gather is not None or self.ranks.sharded
            gramian = None if late else source._sum(records, m)
            finite = is_finite_tensor(torch.cat(grads) if gramian is None else gramian, losses)
            flags = torch.stack([verified, finite]).tolist()
            done = not flags[1] or flags[0]
            if self.ranks.sharded:
                self._agree_passes(done, bool(flags[1]))
            if done:
                if resume is not None:
                    resume.records = records
                if gramian is None and self.gather is None:
                    gramian = source._sum(records, m)
                    return records, gramian, bool(flags[1]) and is_finite(gramian, losses)
                return records, gramian, bool(flags[1])
        grads_finite = is_finite(torch.cat(grads), losses)
        if fast is None and self.ranks.sharded:
            self._agree_passes(not grads_finite, grads_finite)
        if not grads_finite and self.gather is None:
            return [], torch.full((m, m), torch.nan, device=losses.device), False
        if self.gather is not None:
            if grads_finite:
                _maps.named(collected, None)  # a refusal naming what mixes the rows, if any does
            raise ValueError(
                "distributed='global' needs the losses in the order of the batch rows of every "
                "considered call (row i feeding loss i); use distributed='local' for others."
            )
        per_column = None
        if losses.ndim > 1 and resume is None:
            per_column = lambda reached: source.passes.per_column(collected)  # noqa: E731
        start = time.perf_counter()
        freed = not keeps_graph(resume)
        # Rows named by their tags are confirmed by a pass with the mirrored tags; where the
        # graph is freed, only a one-to-one map (a permutation) is taken.
        confirm = None if freed else source.passes.confirm(collected, resume)
        records, rows = _maps.named(collected, per_column, confirm)
        if freed:
            _maps.one_to_one(rows, m)
        self.check_seconds += time.perf_counter() - start
        if resume is not None:
            resume.records = records
            if not resume.skips:
                resume.rows = _maps.rows_of_inputs(resume.boundary, collected, rows)
            else:
                try:
                    resume.rows = _maps.boundary_rows(collected, confirm)
                except ValueError:  # the passes kept the graph: losses.backward(w) instead
                    resume.usable = False
        if self.ranks.sharded:  # (a rank that refused above says so before the parameter gathers)
            agree(losses.device, self.ranks)
        gramian = source._sum(records, m)
        return records, gramian, is_finite(gramian, losses)

    @property
    def resumed(self) -> bool:  # type: ignore[override]
        return self.resume is not None and self.resume.usable

    def weighted_backward(self, weights: Tensor) -> None:
        if self.resume is not None and self.resume.usable:
            self.source.weighted_backward(self.resume, weights)
        else:
            super().weighted_backward(weights)


class _NotFinite(Exception):
    """Another rank's step is not finite: this one stops at its non-finite Gramian too."""

    def __init__(self, gramian: Tensor) -> None:
        super().__init__()
        self.gramian = gramian
