"""The collection passes of a step: backwards from the losses to the considered modules' taps.

:meth:`Passes.collect` runs the tagged pass (cotangent: the tags, see ``_rowmap``) and the pass
with cotangent 1, and returns every reached call with its output gradients in both;
:meth:`Passes.per_column` runs one pass per column of ``[N, K]`` losses (see ``_maps``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import Tensor, nn

from . import _maps
from ._hooks import HookSet, ModuleCall
from ._records import Record, batch_major, moved
from ._resume import Resume
from ._rowmap import TagSource, precision_of


class NotConnected(ValueError):
    """The losses reach no considered call."""


def keeps_graph(resume: Resume | None) -> bool:
    """Whether the collection passes keep the graph above the considered part: for the
    confirming pass of rows not in the losses' order, and for a boundary that reaches the losses
    past the calls; a resumed step without such a boundary frees it (logits-sized tensors)."""
    return resume is None or resume.skips


class Passes:
    """The passes of one optimizer's hook set; ``check_seconds``: the last tagged pass's time."""

    def __init__(self, hooks: HookSet, names: dict[int, str]) -> None:
        self.hooks = hooks
        self.names = names
        self.tags = TagSource()
        self.check_seconds = 0.0

    def collect(self, losses: Tensor, resume: Resume | None = None) -> _maps.Collected:
        """The tagged pass, then the pass with cotangent 1: every reached call with its output
        gradients in both. With ``resume`` (1-D losses) they also give the gradients at the
        boundary, and the second pass frees the graph above it unless the boundary reaches the
        losses past the calls (``Resume.skips``)."""
        flat = losses.reshape(-1)
        m = flat.shape[0]
        dtypes = [losses.dtype, *self.hooks.live.dtypes()]
        tags = self.tags.draw(m, flat, precision_of(dtypes))
        inputs, checked = self._inputs(resume)
        start = time.perf_counter()
        tagged, tagged_boundary = self.one(flat, tags.values, checked, retain=True)
        self.check_seconds = time.perf_counter() - start
        keep = keeps_graph(resume)
        plain, plain_boundary = self.one(flat, torch.ones_like(flat), inputs, retain=keep)
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
            for g in record.output_grads:
                if g.ndim == 0 or g.shape[0] != record.rows:
                    raise ValueError(
                        f"{self._name(call.module)} returned, besides outputs of {record.rows} "
                        f"rows, a differentiable output of shape {tuple(g.shape)} without that "
                        "batch (an auxiliary loss, a batch statistic?): every output of a "
                        "considered module needs one row per sample. Detach it inside the module "
                        "if the losses do not use it (aux.detach()), compute it in another "
                        "module, or consider other modules. Nothing was changed."
                    )
            other = tagged.get(call, tuple(torch.zeros_like(g) for g in plain[call]))
            moved_tagged = moved(other, record.output_dims)
            name = self._name(call.module)
            reached.append(_maps.Reached(call.module, record, moved_tagged, name, call))
        boundary = list(zip(plain_boundary, tagged_boundary, strict=False))
        return _maps.Collected(flat, losses.shape, tags, reached, boundary)

    def confirm(self, collected: _maps.Collected, resume: Resume | None) -> _maps.Collected:
        """``collected`` with the tagged gradients of a pass with the mirrored tags (rows named
        by their ratio are kept only where both draws agree: ``_rowmap.agreed``)."""
        tags = TagSource.mirrored(collected.tags)
        found, boundary = self.one(collected.losses, tags.values, self._inputs(resume)[1], True)
        tagged = _maps.aligned(collected, found)
        reached = [replace(r, tagged=tagged[id(r)]) for r in collected.reached]
        pairs = [(plain, t) for (plain, _), t in zip(collected.boundary, boundary, strict=False)]
        return replace(collected, tags=tags, reached=reached, boundary=pairs)

    def _inputs(self, resume: Resume | None) -> tuple[list[Tensor], list[Tensor]]:
        """What a pass differentiates: the taps' anchor and the boundary, and of these the ones
        a tagged pass checks (the boundary's rows where they also reach the losses other than
        through the considered calls; elsewhere they feed what the calls they enter feed)."""
        inputs = [self.hooks.anchor, *(resume.boundary if resume else ())]
        return inputs, inputs if resume is not None and resume.skips else inputs[:1]

    def one(
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
            try:
                found = torch.autograd.grad(
                    self.hooks.probe(losses),
                    inputs,
                    cotangent,
                    retain_graph=retain,
                    allow_unused=True,
                    materialize_grads=True,
                )
            except RuntimeError as error:
                if "use_reentrant" not in str(error):
                    raise
                raise ValueError(
                    "The considered modules lie below a torch.utils.checkpoint with "
                    "use_reentrant=True, which the collection passes cannot go through: use "
                    "use_reentrant=False. Nothing was changed."
                ) from error
        if collector.coupling and per_instance:
            self._refuse_coupling(collector.coupling)
        calls = dict(collector.calls)
        self._check_inputs(calls)
        return calls, found[1:]

    def per_column(self, collected: _maps.Collected) -> list[Record]:
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
        # Samples are named by the ratio of Σ_j τ_n c_j ∇ℓ_nj to Σ_j c_j ∇ℓ_nj (two passes, whose
        # arithmetic differs by the factors τ_n only), with random c_j in [1, 2): unit weights
        # would let a sample whose columns' gradients cancel (softmax probabilities as
        # objectives) look negligible.
        weights = self.tags.column_weights(k, flat)
        anchor = [self.hooks.anchor]
        draws = []
        for tags in (sample_tags, TagSource.mirrored(sample_tags)):  # (see ``confirm``)
            cotangent = (tags.values.unsqueeze(1) * weights).flatten()
            found = self.one(flat, cotangent, anchor, retain=True)[0]
            draws.append((tags, _maps.aligned(collected, found)))
        weighted = self.one(flat, weights.repeat(n), anchor, retain=True)[0]
        columns = []
        for j in range(k):
            one_hot = torch.zeros(n, k, dtype=flat.dtype, device=flat.device)
            one_hot[:, j] = 1
            found = self.one(flat, one_hot.flatten(), anchor, retain=True)[0]
            columns.append(_maps.aligned(collected, found))
        records = _maps.aligned(collected, weighted)
        return _maps.per_column_records(collected, records, draws, columns)

    def _check_inputs(self, calls: Iterable[ModuleCall]) -> None:
        for call in calls:
            if call.modified_in_place():
                raise ValueError(
                    f"An input of {self._name(call.module)} was modified in place after its "
                    "forward, so its saved value is stale. Avoid in-place operations on the inputs "
                    "of considered modules (e.g. use out = x * 2 instead of x.mul_(2)), consider "
                    "other modules, or pass gramian_mode='autograd'. Nothing was changed."
                )
            if call.output_modified_in_place():
                raise ValueError(
                    f"The output of {self._name(call.module)} was modified in place after its "
                    "forward, and its rule checks a re-run of the module against that output. "
                    "Avoid in-place operations on the outputs of considered modules: an in-place "
                    "activation after it (nn.ReLU(inplace=True), timm's act layers built with "
                    "inplace=True) built with inplace=False, out = out * 2 instead of "
                    "out.mul_(2); or consider other modules, or pass gramian_mode='autograd'. "
                    "Nothing was changed."
                )

    @staticmethod
    def _not_connected() -> ValueError:
        return NotConnected(
            "The losses do not depend on any considered parameter through a recorded call of its "
            "module. Compute them from a forward of the model this optimizer was built with (not "
            "of a copy of it, e.g. copy.deepcopy(model)), with gradients enabled and after the "
            "optimizer was created; considered modules inside torch.utils.checkpoint need "
            "use_reentrant=False (the reentrant variant runs them without gradients)."
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
