"""Gramian sources: where ``G = J Jᵀ`` (the objectives' Jacobian w.r.t. the considered
parameters) comes from. The optimizer holds one of them, chosen at construction:

- :class:`HookedGramian` (``gramian_mode="hooks"``): taps on the considered modules save their
  inputs; one backward from the losses with cotangent 1 (per objective column) gives each module's
  output gradients; the per-layer rules turn (inputs, output gradients) into the module's Gramian.
  Parameters used by several modules (tied weights) get their per-sample gradients summed across
  modules first. Where the graph allows it, the weighted gradient is then book-kept from the same
  factors and the trunk's backward resumes at the considered part's boundary (``_resume``).
- ``AutogradGramian`` (``gramian_mode="autograd"``, in ``_autograd``): one vector-Jacobian
  product per objective (batched). Exact for any graph, including batch-coupled ones, and slow.
- ``ClosedGramian`` (in ``_autograd``): after ``close()``; every Jacobian-descent step is refused.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ._hooks import HookSet, ModuleCall, suspended
from ._records import (
    Record,
    batch_major,
    by_module,
    objective_major_to_sample_major,
    rows_like,
    scaled,
    with_rows,
)
from ._resume import Resume, book_kept
from ._resume import find as find_resume
from .gramian import Call, accumulate, couples_batch, map_rows, rule_for, sum_of_gramians

Plan = dict[nn.Module, dict[str, nn.Parameter]]
Gather = Callable[[list[Record]], list[Record]]


class GramianSource:
    """Strategy interface: the Gramian of some losses and, optionally, a cheaper weighted backward.

    ``resume_point`` returns where the weighted backward can resume (``None``: the optimizer runs
    ``losses.backward(w)``); ``weighted_backward`` is only called with such a point.
    """

    def resume_point(self, losses: Tensor) -> Resume | None:
        return None

    def gramian(
        self, losses: Tensor, gather: Gather | None = None, resume: Resume | None = None
    ) -> Tensor:
        raise NotImplementedError

    def weighted_backward(self, resume: Resume, weights: Tensor) -> None:
        raise NotImplementedError

    def task_gramian(self, losses: Sequence[Tensor]) -> Tensor:
        """``[k, k]`` Gramian of ``k`` scalar task losses (see ``_tasks``)."""
        raise NotImplementedError

    def close(self) -> None:
        return None


def plan_modules(model: nn.Module, considered: Sequence[Tensor]) -> Plan:
    """Which module owns which considered parameter, by local name.

    A module owns its direct parameters; a module whose rule is ``recursive`` (e.g.
    ``MultiheadAttention``) owns those of its whole subtree. A parameter may have several owners
    (tied weights). Raises ``ValueError`` if some considered parameter has no owner in ``model``.
    """
    wanted = {id(p) for p in considered}
    plan: Plan = {}
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        recursive = rule_for(module).recursive
        named = module.named_parameters(recurse=recursive, remove_duplicate=False)
        owned = {name: p for name, p in named if id(p) in wanted}
        if owned:
            plan[module] = owned
        if not recursive:
            for child in module.children():
                visit(child)

    visit(model)
    owned_ids = {id(p) for params in plan.values() for p in params.values()}
    missing = [p for p in considered if id(p) not in owned_ids]
    if missing:
        shapes = ", ".join(str(tuple(p.shape)) for p in missing[:5])
        raise ValueError(
            f"{len(missing)} considered parameter(s) (shapes {shapes}) are not in `model`. Pass "
            "the model that uses them, or consider modules and parameters of that model only."
        )
    return plan


class HookedGramian(GramianSource):
    """Hooks the planned modules of ``model`` and computes Gramians from their taps."""

    def __init__(self, model: nn.Module, considered: Sequence[Tensor]) -> None:
        self.plan = plan_modules(model, considered)
        owners: defaultdict[int, int] = defaultdict(int)
        for params in self.plan.values():
            for p in set(params.values()):
                owners[id(p)] += 1
        self.shared = {pid for pid, count in owners.items() if count > 1}
        self.names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
        self.hooks = HookSet()
        for module in self.plan:
            self.hooks.tap(module)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self.hooks.mark(module, couples_batch)

    def close(self) -> None:
        self.hooks.remove()

    def resume_point(self, losses: Tensor) -> Resume | None:
        """Where the weighted backward can resume (see ``_resume``), or ``None``."""
        return find_resume(losses, self.hooks, self.plan)

    def gramian(
        self, losses: Tensor, gather: Gather | None = None, resume: Resume | None = None
    ) -> Tensor:
        """``[m, m]`` Gramian over ``losses.flatten()`` (batch on dim 0, objectives after).

        ``gather`` may replace the collected calls by calls over a larger batch (other ranks'
        samples appended, see ``_distributed``); the Gramian is then over that batch. With
        ``resume``, the collection pass also fills ``resume`` for :meth:`weighted_backward`.
        """
        records = self.collect(losses, resume)
        if gather is not None:
            records = gather(records)
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
        total = gramians[0]
        for g in gramians[1:]:
            total = total + g  # type promotion keeps the widest dtype
        return objective_major_to_sample_major(total, losses)

    def weighted_backward(self, resume: Resume, weights: Tensor) -> None:
        """``Σ_i w_i ∇ℓ_i`` into ``.grad`` without a second backward through the considered
        modules: theirs from ``summed_grads`` on output gradients scaled by ``w``, the trunk's by
        one backward from the boundary with rows scaled by ``w``. Both run in one engine call,
        so gradient hooks (DDP's included) fire as in ``losses.backward(w)``."""
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
        boundary_grads = [grad * rows_like(weights, grad) for grad in resume.grads]
        torch.autograd.backward([*resume.boundary, root], [*boundary_grads, torch.ones_like(root)])

    def task_gramian(self, losses: Sequence[Tensor]) -> Tensor:
        """One collection pass per task loss; each considered module's rule turns that task's
        output gradients into its parameters' gradients (``summed_grads``: the exact VJP, summed
        over instances), and ``G = P Pᵀ`` over the ``k`` rows of those gradients."""
        k = len(losses)
        per_param: dict[int, list[Tensor | None]] = {}
        for j, loss in enumerate(losses):
            with self.hooks.collecting() as collector:
                torch.autograd.grad(
                    self.hooks.probe(loss), self.hooks.anchor, retain_graph=True, allow_unused=True
                )
            self._check_inputs(call for call, _ in collector.calls)
            records = [batch_major(call, [grads]) for call, grads in collector.calls]
            with suspended():
                for module, calls in by_module((c.module, r) for c, r in records).items():
                    own = self._trainable(module)
                    for name, grad in rule_for(module).summed_grads(module, calls, own).items():
                        slot = per_param.setdefault(id(own[name]), [None] * k)
                        previous = slot[j]
                        slot[j] = grad.flatten() if previous is None else previous + grad.flatten()
        if not per_param:
            raise self._not_connected()
        columns = [  # per parameter, [k, numel] (zeros for a task that does not reach it)
            torch.stack([g if g is not None else _zeros_like_any(slots) for g in slots])
            for slots in per_param.values()
        ]
        P = torch.cat(columns, dim=1)
        return P @ P.T

    def _trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.plan[module].items() if p.requires_grad}

    def collect(self, losses: Tensor, resume: Resume | None = None) -> list[Record]:
        """Run the cotangent pass(es); return every reached call with its output gradients.

        Losses ``[B, k...]`` take ``K = Π k`` passes (one per objective column); the calls are
        returned with ``K·B`` rows, objective-major, inputs repeated ``K`` times. With
        ``resume`` (1-D losses only) the single pass also gives the gradients at the boundary
        and frees the graph above it (the weighted backward then resumes from the boundary).
        """
        batch = losses.shape[0]
        columns = losses.reshape(batch, -1)
        objectives = columns.shape[1]
        grads: dict[ModuleCall, list[tuple[Tensor, ...]]] = {}
        coupling: list[nn.Module] = []
        inputs = [self.hooks.anchor, *(resume.boundary if resume else ())]
        for j in range(objectives):
            if objectives == 1:
                cotangent = torch.ones_like(columns)
            else:
                cotangent = torch.zeros_like(columns)
                cotangent[:, j] = 1
            with self.hooks.collecting() as collector:
                found = torch.autograd.grad(
                    self.hooks.probe(columns),
                    inputs,
                    cotangent,
                    retain_graph=resume is None,
                    allow_unused=True,
                    materialize_grads=True,
                )
            if resume is not None:
                resume.grads = found[1:]
            for call, call_grads in collector.calls:
                grads.setdefault(call, []).append(call_grads)
            coupling += collector.coupling
        if coupling:
            self._refuse_coupling(coupling)
        if not grads:
            raise self._not_connected()
        self._check_inputs(grads)
        records = [batch_major(call, passes) for call, passes in grads.items()]
        if objectives == 1 and any(r.output_grads[0].shape[0] != batch for _, r in records):
            records = self._scatter_to_losses(columns, records)
        records.sort(key=lambda item: item[0].order)
        out = [
            (call.module, with_rows(self._name(call.module), rec, batch, objectives))
            for call, rec in records
        ]
        if resume is not None:
            resume.records = out
        return out

    def _check_inputs(self, calls: Iterable[ModuleCall]) -> None:
        for call in calls:
            if call.modified_in_place():
                raise ValueError(
                    f"An input of {self._name(call.module)} was modified in place after its "
                    "forward, so its saved value is stale. Avoid in-place operations on the inputs "
                    "of considered modules (e.g. use out = x * 2 instead of x.mul_(2))."
                )

    @staticmethod
    def _not_connected() -> ValueError:
        return ValueError(
            "The losses do not depend on any considered parameter. Compute them from a forward "
            "of the model this optimizer was built with (not of a copy of it, e.g. "
            "copy.deepcopy(model)), with gradients enabled and after the optimizer was created."
        )

    def _name(self, module: nn.Module) -> str:
        return f"{self.names.get(id(module), '?')} ({type(module).__name__})"

    def _refuse_coupling(self, coupling: list[nn.Module]) -> None:
        names = ", ".join(sorted({self._name(m) for m in coupling}))
        raise ValueError(
            f"{names} normalises with statistics of the whole batch (BatchNorm in train mode, or "
            "with track_running_stats=False) between the considered parameters and the losses, "
            "so every loss depends on every sample and per-sample gradients do not factor. Fix: "
            "normalise with running statistics (module.eval() on those layers, or "
            "timm.layers.freeze_batch_norm_2d), or pass gramian_mode='autograd' (exact, slow)."
        )

    def _scatter_to_losses(
        self, columns: Tensor, records: list[tuple[ModuleCall, Call]]
    ) -> list[tuple[ModuleCall, Call]]:
        """Several forwards concatenated into one loss vector: find which loss each row of each
        call feeds (one more pass, cotangent ``i + 1`` for loss ``i``, gives row ``r`` scaled by
        its loss index) and spread every call's rows onto the ``B`` losses, with zero rows where
        a call has no sample (those contribute nothing)."""
        batch = columns.shape[0]
        tags = torch.arange(1, batch + 1, dtype=columns.dtype, device=columns.device)
        with self.hooks.collecting() as collector:
            torch.autograd.grad(
                self.hooks.probe(columns),
                self.hooks.anchor,
                tags.unsqueeze(1),
                retain_graph=True,
                allow_unused=True,
            )
        tagged = {call: batch_major(call, [grads])[1] for call, grads in collector.calls}
        spread = []
        for call, passes in records:
            ones = torch.cat([g.flatten(start_dim=1) for g in passes.output_grads], dim=1)
            scaled = torch.cat([g.flatten(start_dim=1) for g in tagged[call].output_grads], dim=1)
            pick = ones.abs().argmax(dim=1, keepdim=True)
            ratio = scaled.gather(1, pick) / ones.gather(1, pick)
            index = torch.where(ones.gather(1, pick) != 0, ratio.round() - 1, -1).long().squeeze(1)
            live = index >= 0
            if torch.unique(index[live]).numel() != int(live.sum()):
                raise ValueError(
                    f"Two rows of one call of {self._name(call.module)} feed the same loss: "
                    "losses must be per-instance (one row of the batch each). Objectives that "
                    "mix the batch go in a list of scalar task losses, step([loss_1, ...]), or "
                    "use gramian_mode='autograd'."
                )

            def place(x: Tensor, index: Tensor = index[live], live: Tensor = live) -> Tensor:
                return x.new_zeros(batch, *x.shape[1:]).index_copy_(0, index, x[live])

            placed = tuple(place(g) for g in passes.output_grads)
            spread.append((call, map_rows(passes, ones.shape[0], place, placed)))
        return spread


def _zeros_like_any(slots: Sequence[Tensor | None]) -> Tensor:
    """Zeros shaped as the gradients in ``slots`` (a task that does not reach a parameter)."""
    return torch.zeros_like(next(g for g in slots if g is not None))


__all__ = ["GramianSource", "HookedGramian", "plan_modules"]
