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

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import _maps
from ._checks import is_finite, is_finite_tensor
from ._distributed import all_ranks_agree, world
from ._hooks import HookSet, ModuleCall, suspended
from ._records import Record, batch_major, by_module, moved, rows_like, scaled
from ._resume import Resume, book_kept
from ._resume import find as find_resume
from ._rowmap import TagSource, precision_of
from .gramian import accumulate, rule_for, sum_of_gramians

Plan = dict[nn.Module, dict[str, nn.Parameter]]
Gather = Callable[[list[Record]], list[Record]]


class GramianSource:
    """Strategy interface: the Gramian of some losses and, optionally, a cheaper weighted backward.

    ``resume_point`` returns where the weighted backward can resume (``None``: the optimizer runs
    ``losses.backward(w)``); ``weighted_backward`` is only called with such a point.
    ``check_seconds``: host time the last :meth:`gramian` spent checking which loss each row
    feeds (the tagged pass and the checks).
    """

    check_seconds: float = 0.0

    def resume_point(self, losses: Tensor) -> Resume | None:
        return None

    def gramian(
        self, losses: Tensor, gather: Gather | None = None, resume: Resume | None = None
    ) -> tuple[Tensor, bool]:
        """The Gramian of ``losses.flatten()`` and whether it and the losses are finite."""
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
        self.tags = TagSource()
        for module in self.plan:
            self.hooks.tap(module)
        for module in model.modules():
            if rule_for(module).couples_batch(module) is not None:
                self.hooks.mark(module, lambda m: bool(rule_for(m).couples_batch(m)))

    def close(self) -> None:
        self.hooks.remove()

    def resume_point(self, losses: Tensor) -> Resume | None:
        """Where the weighted backward can resume (see ``_resume``), or ``None``."""
        return find_resume(losses, self.hooks, self.plan)

    def gramian(
        self, losses: Tensor, gather: Gather | None = None, resume: Resume | None = None
    ) -> tuple[Tensor, bool]:
        """``[m, m]`` Gramian over ``losses.flatten()``, and whether it and the losses are finite.

        Every row of every considered call is checked to feed one loss (``_maps``); the step is
        refused before anything changes otherwise, on every rank under ``torch.distributed``.
        ``gather`` may replace the calls by calls over a larger batch (other ranks' samples
        appended, see ``_distributed``); the Gramian is then over that batch. With ``resume``,
        the passes also give the gradients at the boundary and fill ``resume``.
        """
        try:
            records, gramian, finite = self._checked(losses, resume, gathered=gather is not None)
        except ValueError:
            all_ranks_agree(False, losses.device)
            raise
        if not all_ranks_agree(True, losses.device):
            raise ValueError(
                "Another rank refused this step (its error says why): nothing changed."
            )
        if gather is not None:
            records = gather(records)
            gramian = self._sum(records, losses.numel() * world()[0])
            finite = is_finite(gramian, losses)
        return gramian, finite

    def _checked(
        self, losses: Tensor, resume: Resume | None, gathered: bool
    ) -> tuple[list[Record], Tensor, bool]:
        """The verified records, their Gramian (``None`` when ``gathered``) and finiteness."""
        collected = self.collect(losses, resume)
        m = collected.m
        start = time.perf_counter()
        fast = _maps.expected(collected)
        self.check_seconds += time.perf_counter() - start
        if fast is not None:
            records, verified = fast
            gramian = self._sum(records, m)
            flags = torch.stack([verified, is_finite_tensor(gramian, losses)]).tolist()
            if not flags[1] or flags[0]:
                if resume is not None:
                    resume.records = records
                return records, gramian, bool(flags[1])
        grads = [g.flatten() for r in collected.reached for g in (*r.call.output_grads, *r.tagged)]
        if not is_finite(torch.cat(grads), losses):
            return [], torch.full((m, m), torch.nan, device=losses.device), False
        if gathered:
            _maps.named(collected, None)  # a refusal names what mixes the rows, if anything does
            raise ValueError(
                "distributed='global' needs the losses in the order of the batch rows of every "
                "considered call (row i feeding loss i); use distributed='local' for others."
            )
        per_column = None
        if losses.ndim > 1 and resume is None:
            per_column = lambda reached: self._per_column(collected)  # noqa: E731
        start = time.perf_counter()
        records, rows = _maps.named(collected, per_column)
        self.check_seconds += time.perf_counter() - start
        if resume is not None:
            resume.records = records
            if not resume.skips:
                resume.rows = _maps.rows_of_inputs(resume.boundary, collected, rows)
            else:
                try:
                    resume.rows = _maps.boundary_rows(collected)
                except ValueError:  # the graph was kept: the optimizer runs losses.backward(w)
                    resume.usable = False
        gramian = self._sum(records, m)
        return records, gramian, is_finite(gramian, losses)

    def collect(self, losses: Tensor, resume: Resume | None = None) -> _maps.Collected:
        """The tagged pass, then the pass with cotangent 1: every reached call with its output
        gradients in both. With ``resume`` (1-D losses) they also give the gradients at the
        boundary, and the second pass frees the graph above it."""
        flat = losses.reshape(-1)
        m = flat.shape[0]
        dtypes = [losses.dtype, *(d for call in list(self.hooks.live.calls) for d in call.dtypes)]
        tags = self.tags.draw(m, flat, precision_of(dtypes))
        inputs = [self.hooks.anchor, *(resume.boundary if resume else ())]
        # The boundary's rows are checked where they also reach the losses other than through the
        # considered calls; elsewhere they feed what the rows of the calls they enter feed.
        checked = inputs if resume is not None and resume.skips else inputs[:1]
        start = time.perf_counter()
        tagged, tagged_boundary = self._pass(flat, tags.values, checked, retain=True)
        self.check_seconds = time.perf_counter() - start
        keep = resume is None or resume.skips  # (a skip may still make resuming inexact)
        plain, plain_boundary = self._pass(flat, torch.ones_like(flat), inputs, keep)
        if not plain:
            raise self._not_connected()
        if resume is not None:
            resume.grads = plain_boundary
        reached = []
        for call in sorted(plain, key=lambda c: c.order):
            record = batch_major(call, plain[call])
            if record.output_grads[0].ndim == 0 or record.rows == 0:
                raise ValueError(
                    f"{self._name(call.module)} returned a scalar: a considered module's output "
                    "needs a batch (one row per sample)."
                )
            other = tagged.get(call, tuple(torch.zeros_like(g) for g in plain[call]))
            moved_tagged = moved(other, record.output_dims)
            name = self._name(call.module)
            reached.append(_maps.Reached(call.module, record, moved_tagged, name, call))
        boundary = list(zip(plain_boundary, tagged_boundary, strict=False))
        return _maps.Collected(flat, losses.shape, tags, reached, boundary)

    def _pass(
        self,
        losses: Tensor,
        cotangent: Tensor,
        inputs: list[Tensor],
        retain: bool,
        per_instance: bool = True,
    ) -> tuple[dict[ModuleCall, tuple[Tensor, ...]], tuple[Tensor, ...]]:
        """One collection pass: every reached call's output gradients, and those of ``inputs[1:]``
        (``per_instance``: refuse a pass through a module that couples the batch)."""
        with self.hooks.collecting() as collector:
            found = torch.autograd.grad(
                self.hooks.probe(losses),
                inputs,
                cotangent,
                retain_graph=retain,
                allow_unused=True,
                materialize_grads=True,
            )
        if collector.coupling and per_instance:
            self._refuse_coupling(collector.coupling)
        calls = dict(collector.calls)
        self._check_inputs(calls)
        return calls, found[1:]

    def _per_column(self, collected: _maps.Collected) -> list[Record]:
        """Losses ``[N, K]`` whose rows a call cannot separate: one pass per column."""
        n, m = collected.shape[0], collected.m
        k = m // n
        size = k * _maps.per_column_bytes(collected)
        if size > _maps.PER_COLUMN_BYTES:
            raise ValueError(
                f"Losses of shape {tuple(collected.shape)} need one pass per column here (a "
                "considered call mixes the positions of a sample), whose tensors would take "
                f"{size / 2**30:.1f} GiB: consider position-wise layers only (e.g. the output "
                "layer or a final norm), use fewer positions per step, or pass "
                "gramian_mode='autograd'."
            )
        flat = collected.losses
        sample_tags = self.tags.draw(n, flat, collected.tags.dtype)
        anchor = [self.hooks.anchor]
        cotangent = sample_tags.values.repeat_interleave(k)
        tagged = _maps.aligned(collected, self._pass(flat, cotangent, anchor, retain=True)[0])
        columns = []
        for j in range(k):
            one_hot = torch.zeros(n, k, dtype=flat.dtype, device=flat.device)
            one_hot[:, j] = 1
            found = self._pass(flat, one_hot.flatten(), anchor, retain=True)[0]
            columns.append(_maps.aligned(collected, found))
        return _maps.per_column_records(collected, sample_tags, tagged, columns)

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
            calls, _ = self._pass(loss, torch.ones_like(loss), anchor, True, per_instance=False)
            records = [(c.module, batch_major(c, grads)) for c, grads in calls.items()]
            with suspended():
                for module, group in by_module(records).items():
                    own = self._trainable(module)
                    for name, grad in rule_for(module).summed_grads(module, group, own).items():
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


def _row_weights(weights: Tensor, sigma: Tensor | None) -> Tensor:
    """The weight of the loss each row feeds (0 for none); ``weights`` itself for the identity."""
    if sigma is None:
        return weights
    return torch.where(sigma >= 0, weights[sigma.clamp_min(0)], 0)


def _zeros_like_any(slots: Sequence[Tensor | None]) -> Tensor:
    """Zeros shaped as the gradients in ``slots`` (a task that does not reach a parameter)."""
    return torch.zeros_like(next(g for g in slots if g is not None))


__all__ = ["GramianSource", "HookedGramian", "plan_modules"]
