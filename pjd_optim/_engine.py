"""The Gramian ``G = J Jᵀ`` of the losses' Jacobian w.r.t. the considered parameters.

Two ways, same result for models whose samples are independent:

- :class:`HookedGramian` (default): taps on the considered modules save their inputs; one backward
  from the losses with cotangent 1 (per objective column) gives each module's output gradients;
  the per-layer rules turn (inputs, output gradients) into the module's Gramian. Parameters used by
  several modules (tied weights) get their per-sample gradients summed across modules first.
- :func:`autograd_gramian`: one vector-Jacobian product per loss (batched). Exact for any graph,
  including batch-coupled ones, and slow.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from ._hooks import HookSet, ModuleCall, collecting, input_versions
from ._resume import Resume, book_kept
from ._resume import find as find_resume
from .gramian import couples_batch, rule_for, sum_of_gramians

Plan = dict[nn.Module, dict[str, nn.Parameter]]


def plan_modules(model: nn.Module, considered: Sequence[nn.Parameter]) -> Plan:
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
            f"{len(missing)} considered parameter(s) (shapes {shapes}) belong to no module of "
            "`model`. Pass the model that uses them, or remove them from the considered groups."
        )
    return plan


class HookedGramian:
    """Hooks the planned modules of ``model`` and computes Gramians from their taps."""

    def __init__(self, model: nn.Module, considered: Sequence[nn.Parameter]) -> None:
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

    def resume_point(self, losses: Tensor) -> Resume | None:
        """Where the weighted backward can resume (see ``_resume``), or ``None``."""
        return find_resume(losses, self.hooks, self.plan)

    def gramian(
        self,
        losses: Tensor,
        gather: Callable[[list[ModuleCall]], list[ModuleCall]] | None = None,
        resume: Resume | None = None,
    ) -> Tensor:
        """``[m, m]`` Gramian over ``losses.flatten()`` (batch on dim 0, objectives after).

        ``gather`` may replace the collected calls by calls over a larger batch (other ranks'
        samples appended, see ``_distributed``); the Gramian is then over that batch. With
        ``resume``, the collection pass also fills ``resume`` for :meth:`weighted_backward`.
        """
        calls = self.collect(losses, resume)
        if gather is not None:
            calls = gather(calls)
        gramians: list[Tensor] = []
        shared_grads: dict[int, Tensor] = {}
        for module, module_calls in _by_module(calls).items():
            params = self._trainable(module)
            own = {n: p for n, p in params.items() if id(p) not in self.shared}
            tied = {n: p for n, p in params.items() if id(p) in self.shared}
            rule = rule_for(module)
            if own:
                gramians.append(rule.gramian(module, module_calls, own))
            if tied:
                for name, grad in rule.per_sample_grads(module, module_calls, tied).items():
                    key = id(tied[name])
                    shared_grads[key] = shared_grads[key] + grad if key in shared_grads else grad
        if shared_grads:
            gramians.append(sum_of_gramians(list(shared_grads.values())))
        total = gramians[0]
        for g in gramians[1:]:
            total = total + g  # type promotion keeps the widest dtype
        return _objective_major_to_sample_major(total, losses)

    def weighted_backward(self, resume: Resume, weights: Tensor) -> None:
        """``Σ_i w_i ∇ℓ_i`` into ``.grad`` without a second backward through the considered
        modules: theirs from ``summed_grads`` on output gradients scaled by ``w``, the trunk's by
        one backward from the boundary with rows scaled by ``w`` (DESIGN.md §3). Both run in one
        engine call, so gradient hooks (DDP's included) fire as in ``losses.backward(w)``."""
        by_module = _by_module(resume.calls)
        owned = {module: self._trainable(module) for module in by_module}
        params = {id(p): p for own in owned.values() for p in own.values()}

        def summed() -> list[Tensor | None]:
            total: dict[int, Tensor] = {}
            for module, calls in by_module.items():
                weighted = [
                    replace(
                        c, output_grads=tuple(g * _rows_like(weights, g) for g in c.output_grads)
                    )
                    for c in calls
                ]
                own = owned[module]
                for name, grad in rule_for(module).summed_grads(module, weighted, own).items():
                    key = id(own[name])
                    total[key] = total[key] + grad if key in total else grad
            return [total[k].to(p.dtype) if k in total else None for k, p in params.items()]

        root = book_kept(summed, list(params.values()))
        boundary_grads = [grad * _rows_like(weights, grad) for grad in resume.grads]
        torch.autograd.backward([*resume.boundary, root], [*boundary_grads, torch.ones_like(root)])

    def _trainable(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.plan[module].items() if p.requires_grad}

    def collect(self, losses: Tensor, resume: Resume | None = None) -> list[ModuleCall]:
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
        for j in range(objectives):
            if objectives == 1:
                cotangent = torch.ones_like(columns)
            else:
                cotangent = torch.zeros_like(columns)
                cotangent[:, j] = 1
            inputs = [self.hooks.anchor, *(resume.boundary if resume else ())]
            with collecting(self.hooks.token) as collector:
                found = torch.autograd.grad(
                    columns,
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
            names = sorted({f"{self.names.get(id(m), '?')} ({type(m).__name__})" for m in coupling})
            raise ValueError(
                f"{', '.join(names)} in train mode sits between the considered parameters and the "
                "losses and mixes the samples of the batch, so per-sample gradients do not factor. "
                "Fix: put those layers in eval mode (module.eval(), or "
                "timm.layers.freeze_batch_norm_2d), or pass gramian_mode='autograd' (exact, slow)."
            )
        if not grads:
            raise ValueError(
                "The losses do not depend on any considered parameter: check that the losses come "
                "from a forward of `model` with gradients enabled after the optimizer was created. "
                "If the considered modules run inside torch.compile, compile only the trunk "
                "below them (their forward hooks do not run in compiled code)."
            )
        for call in grads:
            if input_versions(call) != call.versions:
                raise ValueError(
                    f"An input of {type(call.module).__name__} was modified in place after its "
                    "forward; its saved activations are stale. Avoid in-place ops on that input."
                )
        if objectives == 1 and any(p[0][0].shape[0] != batch for p in grads.values()):
            grads = self._scatter_to_losses(columns, grads)
        ordered = sorted(grads.items(), key=lambda item: item[0].order)
        calls = [_with_rows(call, passes, batch) for call, passes in ordered]
        if resume is not None:
            resume.calls = calls
        return calls

    def _scatter_to_losses(
        self, columns: Tensor, grads: dict[ModuleCall, list[tuple[Tensor, ...]]]
    ) -> dict[ModuleCall, list[tuple[Tensor, ...]]]:
        """Several forwards concatenated into one loss vector: find which loss each row of each
        call feeds (one more pass, cotangent ``i + 1`` for loss ``i``, gives row ``r`` scaled by
        its loss index) and spread every call's rows onto the ``B`` losses, with zero rows where
        a call has no sample (those contribute nothing)."""
        batch = columns.shape[0]
        tags = torch.arange(1, batch + 1, dtype=columns.dtype, device=columns.device)
        with collecting(self.hooks.token) as collector:
            torch.autograd.grad(
                columns, self.hooks.anchor, tags.unsqueeze(1), retain_graph=True, allow_unused=True
            )
        tagged = dict(collector.calls)
        spread: dict[ModuleCall, list[tuple[Tensor, ...]]] = {}
        for call, passes in grads.items():
            ones = torch.cat([g.flatten(start_dim=1) for g in passes[0]], dim=1)
            scaled = torch.cat([g.flatten(start_dim=1) for g in tagged[call]], dim=1)
            pick = ones.abs().argmax(dim=1, keepdim=True)
            ratio = scaled.gather(1, pick) / ones.gather(1, pick)
            index = torch.where(ones.gather(1, pick) != 0, ratio.round() - 1, -1).long().squeeze(1)
            live = index >= 0
            if torch.unique(index[live]).numel() != int(live.sum()):
                raise ValueError(
                    f"Two rows of one call of {type(call.module).__name__} feed the same loss: "
                    "losses must be per-instance (one row of the batch each)."
                )

            def place(x: Tensor, index: Tensor = index[live], live: Tensor = live) -> Tensor:
                return x.new_zeros(batch, *x.shape[1:]).index_copy_(0, index, x[live])

            placed = tuple(place(g) for g in passes[0])
            spread[call.map_rows(ones.shape[0], place, ())] = [placed]
        return spread


def _by_module(calls: Iterable[ModuleCall]) -> dict[nn.Module, list[ModuleCall]]:
    by_module: dict[nn.Module, list[ModuleCall]] = defaultdict(list)
    for call in calls:
        by_module[call.module].append(call)
    return by_module


def _rows_like(weights: Tensor, x: Tensor) -> Tensor:
    """``weights`` ``[B]`` shaped to scale the rows of ``x`` ``[B, ...]``."""
    return weights.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _with_rows(call: ModuleCall, passes: list[tuple[Tensor, ...]], batch: int) -> ModuleCall:
    """``call`` with output gradients of the passes stacked objective-major and inputs repeated."""
    objectives = len(passes)
    rows = passes[0][0].shape[0]
    if rows != batch:
        raise ValueError(
            f"{type(call.module).__name__} saw a batch of {rows} rows but the losses have "
            f"{batch} rows. Losses must be per-instance with the batch on dim 0 of every "
            "considered module's input and output; concatenate per-sample losses of separate "
            "forwards in order, or use gramian_mode='autograd'."
        )
    if objectives == 1:
        return replace(call, output_grads=passes[0])
    stacked = tuple(torch.cat(grads, dim=0) for grads in zip(*passes, strict=True))

    def repeat(x: Tensor) -> Tensor:
        return x.repeat(objectives, *([1] * (x.ndim - 1)))

    return call.map_rows(batch, repeat, stacked)


def _objective_major_to_sample_major(gramian: Tensor, losses: Tensor) -> Tensor:
    """Reorder a Gramian indexed (objective, sample) as ``losses.flatten()`` (sample, objective)."""
    batch = losses.shape[0]
    objectives = losses.numel() // batch
    if objectives == 1:
        return gramian
    g = gramian.view(objectives, batch, objectives, batch).permute(1, 0, 3, 2)
    return g.reshape(batch * objectives, batch * objectives)


def autograd_gramian(losses: Tensor, params: Iterable[nn.Parameter]) -> Tensor:
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
