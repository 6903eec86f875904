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

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._checks import check_hookable, check_planned
from ._distributed import Ranks
from ._hooked_pass import HookedPass
from ._hooks import HookSet, finalize_with, suspended
from ._pass import Pass, TaskPass
from ._passes import Passes
from ._plan import plan_modules
from ._records import Record, batch_major, by_module, rows_like, scaled
from ._resume import Resume, book_kept
from ._tasks import heads
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


def _row_weights(weights: Tensor, sigma: Tensor | None) -> Tensor:
    """The weight of the loss each row feeds (0 for none); ``weights`` itself for the identity."""
    if sigma is None:
        return weights
    return torch.where(sigma >= 0, weights[sigma.clamp_min(0)], 0)


def _zeros_like_any(slots: Sequence[Tensor | None]) -> Tensor:
    """Zeros shaped as the gradients in ``slots`` (a task that does not reach a parameter)."""
    return torch.zeros_like(next(g for g in slots if g is not None))


__all__ = ["GramianSource", "HookedGramian", "plan_modules"]
