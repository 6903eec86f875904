"""Gramian sources: where ``G = J Jᵀ`` (the objectives' Jacobian w.r.t. the considered
parameters) comes from, and the passes they open for a step (``_pass``). The optimizer holds one
source, chosen at construction:

- :class:`HookedGramian` (``gramian_mode="hooks"``): taps on the considered modules save their
  inputs; backwards from the losses give each module's output gradients (``_passes``), checked to
  come from one loss per row (``_maps``); the per-layer rules turn (inputs, output gradients) into
  the module's Gramian. Parameters used by several modules (tied weights) get their per-sample
  gradients summed across modules first. Where the graph allows it, the weighted gradient is then
  book-kept from the same factors and the trunk's backward resumes at the considered part's
  boundary (``_resume``).
- ``AutogradGramian`` (``gramian_mode="autograd"``, in ``_autograd``): one vector-Jacobian
  product per objective (batched). Exact for any graph, including batch-coupled ones, and slow.
- ``ClosedGramian`` (in ``_autograd``): after ``close()``; every Jacobian-descent step is refused.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import _maps
from ._checks import check_hookable, check_planned, is_finite, is_finite_tensor
from ._distributed import CallGatherer, Ranks, shapes_signature, step_agreed
from ._hooks import HookSet, finalize_with, suspended
from ._pass import Pass, TaskPass
from ._passes import NotConnected, Passes, keeps_graph
from ._plan import plan_modules
from ._records import Record, batch_major, by_module, rows_like, scaled
from ._resume import Resume, book_kept
from ._resume import find as find_resume
from ._tasks import heads
from ._uses import refuse_outside_uses, refuse_unrecorded_uses
from .gramian import sum_of_gramians
from .gramian._registry import accumulate, rule_for


class GramianSource:
    """Strategy interface: opens the pass of a step over per-instance losses (:meth:`begin`) or
    task losses (:meth:`begin_tasks`)."""

    def begin(self, losses: Tensor, ranks: Ranks, keep_graph: bool = False) -> Pass:
        """The pass of per-instance losses over ``ranks``; ``keep_graph``: the caller runs the
        backward (the passes keep the whole graph, the pass does not resume)."""
        raise NotImplementedError

    def begin_tasks(
        self, tasks: Sequence[Tensor], trainable: Sequence[Tensor], ranks: Ranks
    ) -> Pass:
        """The pass of ``k`` scalar task losses (see ``_tasks``): the heads after the considered
        part get the plain sum of the task gradients, the rest the weighted sum."""
        if ranks.size > 1:
            raise ValueError("Task losses are not supported under torch.distributed yet.")
        head_params = heads(tasks, self.considered(), trainable)
        head_ids = {id(p) for p in head_params}
        shared = [p for p in trainable if id(p) not in head_ids]
        return TaskPass(tasks, lambda: self.task_gramian(tasks), head_params, shared)

    def considered(self) -> list[Tensor]:
        raise NotImplementedError

    def ran_in_half(self) -> bool:
        """Whether a considered call on a live graph ran in float16 (autocast's, say)."""
        return False

    def task_gramian(self, losses: Sequence[Tensor]) -> Tensor:
        """``[k, k]`` Gramian of ``k`` scalar task losses."""
        raise NotImplementedError

    def close(self) -> None:
        return None

    def finalize_with(self, owner: object) -> None:
        """Let go of the model (remove hooks) when ``owner`` is garbage-collected."""
        return None


class HookedGramian(GramianSource):
    """Hooks the planned modules of ``model`` and computes Gramians from their taps."""

    def __init__(self, model: nn.Module, considered: Sequence[Tensor]) -> None:
        self.plan = plan_modules(model, considered)
        # id of each considered parameter -> ids of the modules that own it (several: tied)
        self.owners: defaultdict[int, set[int]] = defaultdict(set)
        for module, params in self.plan.items():
            for p in params.values():
                self.owners[id(p)].add(id(module))
        self.shared = {pid for pid, modules in self.owners.items() if len(modules) > 1}
        names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
        self.param_names = {
            id(p): f"{names[id(m)]}.{n}" for m, own in self.plan.items() for n, p in own.items()
        }
        check_hookable(self.plan, names)
        self.hooks = HookSet()
        self.passes = Passes(self.hooks, names)
        for module in self.plan:
            self.hooks.tap(module)
        for module in model.modules():
            if rule_for(module).couples_batch(module) is not None:
                self.hooks.mark(module, lambda m: bool(rule_for(m).couples_batch(m)))

    def close(self) -> None:
        self.hooks.remove()

    def finalize_with(self, owner: object) -> None:
        finalize_with(owner, self.hooks)

    def considered(self) -> list[Tensor]:
        return list({id(p): p for own in self.plan.values() for p in own.values()}.values())

    def ran_in_half(self) -> bool:
        return torch.float16 in self.hooks.live.dtypes()

    def begin(self, losses: Tensor, ranks: Ranks, keep_graph: bool = False) -> HookedPass:
        check_planned(self.plan, self.param_names)
        return HookedPass(self, losses, ranks, keep_graph)

    def _sum(self, records: list[Record], m: int) -> Tensor:
        """``Σ`` of the considered modules' Gramians over the records (``m`` rows each). A
        parameter shared by several modules gets its per-sample gradients summed first."""
        gramians: list[Tensor] = []
        shared_grads: dict[int, Tensor] = {}
        with suspended():  # rules may re-run a module's forward: no taps there
            for module, calls in by_module(records).items():
                params = self._trainable(module)
                own = {n: p for n, p in params.items() if id(p) not in self.shared}
                tied = {n: p for n, p in params.items() if id(p) in self.shared}
                rule = rule_for(module)
                if own:
                    gramians.append(rule.gramian(module, calls, own))
                if tied:
                    for name, grad in rule.per_sample_grads(module, calls, tied).items():
                        accumulate(shared_grads, id(tied[name]), grad)
        if shared_grads:
            gramians.append(sum_of_gramians(list(shared_grads.values())))
        if not gramians:
            raise ValueError(
                "No considered parameter the losses reach requires grad (frozen after the "
                "optimizer was built?): unfreeze them, or build a new PartialJDOptimizer that "
                "considers trainable parameters. Nothing was changed."
            )
        total = gramians[0]
        for g in gramians[1:]:
            total = total + g  # type promotion keeps the widest dtype
        assert total.shape == (m, m), (total.shape, m)
        return total

    def weighted_backward(self, resume: Resume, weights: Tensor) -> None:
        """``Σ_i w_i ∇ℓ_i`` into ``.grad`` without a second backward through the considered
        modules: theirs from ``summed_grads`` on output gradients scaled by ``w``, the trunk's by
        one backward from the boundary with each row scaled by the weight of the loss it feeds.
        Both run in one engine call, so gradient hooks (DDP's included) fire as in
        ``losses.backward(w)``."""
        grouped = by_module(resume.records)
        owned = {module: self._trainable(module) for module in grouped}
        params = {id(p): p for own in owned.values() for p in own.values()}

        def summed() -> list[Tensor | None]:
            total: dict[int, Tensor] = {}
            with suspended():
                for module, calls in grouped.items():
                    weighted = [scaled(call, weights) for call in calls]
                    own = owned[module]
                    for name, grad in rule_for(module).summed_grads(module, weighted, own).items():
                        accumulate(total, id(own[name]), grad)
            return [total[k].to(p.dtype) if k in total else None for k, p in params.items()]

        root = book_kept(summed, list(params.values()))
        rows: list[Tensor | None] = [*resume.rows] if resume.rows else [None] * len(resume.grads)
        boundary_grads = [
            grad * rows_like(_row_weights(weights, sigma), grad)
            for grad, sigma in zip(resume.grads, rows, strict=True)
        ]
        torch.autograd.backward([*resume.boundary, root], [*boundary_grads, torch.ones_like(root)])

    def task_gramian(self, losses: Sequence[Tensor]) -> Tensor:
        """One collection pass per task loss; each considered module's rule turns that task's
        output gradients into its parameters' gradients (``summed_grads``: the exact VJP, summed
        over instances), and ``G = P Pᵀ`` over the ``k`` rows of those gradients."""
        k = len(losses)
        per_param: dict[int, list[Tensor | None]] = {}
        for j, loss in enumerate(losses):
            anchor = [self.hooks.anchor]
            calls, _ = self.passes.one(
                loss, torch.ones_like(loss), anchor, True, per_instance=False
            )
            records = [(c.module, batch_major(c, grads)) for c, grads in calls.items()]
            with suspended():
                for module, group in by_module(records).items():
                    own = self._trainable(module)
                    for name, grad in rule_for(module).summed_grads(module, group, own).items():
                        slot = per_param.setdefault(id(own[name]), [None] * k)
                        previous = slot[j]
                        slot[j] = grad.flatten() if previous is None else previous + grad.flatten()
        if not per_param:
            raise self.passes._not_connected()
        columns = [  # per parameter, [k, numel] (zeros for a task that does not reach it)
            torch.stack([g if g is not None else _zeros_like_any(slots) for g in slots])
            for slots in per_param.values()
        ]
        P = torch.cat(columns, dim=1)
        return P @ P.T

    def _trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.plan[module].items() if p.requires_grad}


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
        if self.ranks.sharded and losses.ndim > 1:
            self._agree_positions()
        # Resume the trunk's backward at the considered part's boundary where that is exact.
        if self.resumable:
            self.resume = find_resume(losses, self.source.hooks, self.source.plan)
        ranks = self.ranks
        try:
            records, gramian, finite = self._checked()
        except ValueError:
            step_agreed(False, False, 0, losses.device, ranks)
            raise
        # One all-reduce: whether every rank went through, and (the Gramians being local
        # unless "global") whether every rank's is finite, so that all skip, raise or go on
        # together (a rank stepping alone would wait in DDP's all-reduce).
        shapes = shapes_signature(records) if self.gather is not None else 0
        ok, every_finite, same, alike = step_agreed(
            True, finite, losses.numel(), losses.device, ranks, shapes
        )
        if not ok:
            raise _another_rank_refused()
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

    def _agree_positions(self) -> None:
        """Under FSDP, per-position losses (``[B, T]``) take passes per position, each gathering
        the sharded parameters: every rank must take as many (one all-reduce first)."""
        positions = self.losses[0].numel()
        ok, _, same, _ = step_agreed(True, True, positions, self.losses.device, self.ranks)
        if not ok:
            raise _another_rank_refused()
        if not same:
            raise ValueError(
                f"Per-position losses {tuple(self.losses.shape)} under FSDP need the same "
                "positions on every rank (the step's passes per position each gather the sharded "
                "parameters): pad every rank's batch to one length, or pass one loss per sample. "
                "Nothing was changed."
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
            # "global" the Gramian comes after the gather: the gradients tell finiteness here.
            gramian = None if self.gather is not None else source._sum(records, m)
            finite = is_finite_tensor(torch.cat(grads) if gramian is None else gramian, losses)
            flags = torch.stack([verified, finite]).tolist()
            if not flags[1] or flags[0]:
                if resume is not None:
                    resume.records = records
                return records, gramian, bool(flags[1])
        grads_finite = is_finite(torch.cat(grads), losses)
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


def _another_rank_refused() -> ValueError:
    return ValueError("Another rank refused this step (its error says why): nothing changed.")


def _row_weights(weights: Tensor, sigma: Tensor | None) -> Tensor:
    """The weight of the loss each row feeds (0 for none); ``weights`` itself for the identity."""
    if sigma is None:
        return weights
    return torch.where(sigma >= 0, weights[sigma.clamp_min(0)], 0)


def _zeros_like_any(slots: Sequence[Tensor | None]) -> Tensor:
    """Zeros shaped as the gradients in ``slots`` (a task that does not reach a parameter)."""
    return torch.zeros_like(next(g for g in slots if g is not None))


__all__ = ["GramianSource", "HookedGramian", "plan_modules"]
