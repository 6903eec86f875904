"""Where the trunk's backward may resume: the boundary of the considered part of the graph.

With weights ``w``, the step needs ``Σ_i w_i ∇ℓ_i`` for every trainable parameter. Split the graph
at a set of *boundary* tensors ``b`` (inputs of considered modules computed by the trunk)::

    Σ_i w_i ∇_θ ℓ_i = Σ_b (w ⊙_rows ∂(Σℓ)/∂b) · ∂b/∂θ     for every trunk parameter θ,

since row ``i`` of ``∂(Σℓ)/∂b`` is ``∂ℓ_i/∂b_i`` when samples are independent. The collection pass
already walks from the losses to the considered modules; extended to the boundary it also gives
``∂(Σℓ)/∂b``, so the trunk gets one backward from ``b`` with rows scaled by ``w``, and the
considered modules' own gradients come from their saved inputs and output gradients (the rules'
``summed_grads``). No second backward goes through the considered part.

This is exact when every path from a trainable parameter to the losses either stays inside the
considered modules (their parameters are book-kept) or crosses the boundary once. :func:`find`
checks it by walking the autograd graph from the losses and returns ``None`` (use
``losses.backward(w)``) when it does not hold: a trainable non-considered parameter, or a
tensor that is neither a considered module's input nor downstream of one, between the losses and
the considered modules (a non-considered layer after a considered one, a skip connection or a
loss term from deeper trunk features), boundary tensors that feed each other, a boundary without
one row per loss or with gradient hooks (they would run in both backwards), or a considered
module whose rule does not book-keep.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from ._graph import Edge, Node, children, independent, latest_first, leaf
from ._hooks import HookSet, ModuleCall, is_tap
from .gramian._registry import rule_for
from .gramian._sharded import is_sharded

# Resuming saves a backward through the considered part, about 2·B·(considered parameters) flops
# for linear layers, and costs a Python walk of the graph (≈0.1 ms). Below this many saved flops
# (≈0.2 ms of one core) the plain ``losses.backward(w)`` is faster.
MIN_SAVED_FLOPS = 4_000_000


@dataclass(eq=False)
class Resume:
    """The boundary tensors of one step and, once collected, their gradients ``∂(Σℓ)/∂b``, the
    considered calls with their output gradients (``(module, Call)`` records, one row per loss)
    and, where not row ``i`` → loss ``i``, the loss each boundary row feeds."""

    boundary: list[Tensor]
    grads: tuple[Tensor, ...] = field(default=())
    records: list[tuple[nn.Module, Any]] = field(default_factory=list)
    rows: list[Tensor] | None = None  # the loss each boundary row feeds (None: row i, loss i)
    skips: bool = False  # a boundary tensor reaches the losses other than as a call's input
    usable: bool = True  # False once the check found a boundary row feeding several losses


def find(
    losses: Tensor, hooks: HookSet, plan: Mapping[nn.Module, Mapping[str, Tensor]]
) -> Resume | None:
    """The boundary of the considered part of ``losses``' graph, or ``None`` if the split is not
    exact (see the module docstring) or saves too little. ``plan``: the hooked modules and the
    considered parameters each owns."""
    if losses.ndim != 1 or losses.grad_fn is None:
        return None
    considered = {id(p): p for params in plan.values() for p in params.values()}
    if 2 * losses.shape[0] * sum(p.numel() for p in considered.values()) < MIN_SAVED_FLOPS:
        return None
    reached_params: set[int] = set()  # considered parameters the losses depend on
    covered: set[int] = set()  # those of modules with a reached call (book-kept)
    batch = losses.shape[0]
    first_tap = hooks.live.first_seq()
    # Candidate edges: (node, output_nr) of the trunk tensors fed to considered modules.
    candidates: dict[Edge, Tensor] = {}
    entered: dict[Edge, int] = {}  # how many reached calls each candidate enters
    boundary: dict[Edge, Tensor] = {}
    # Nodes with a parent outside every considered call (the losses' node included): a boundary
    # tensor among them reaches the losses through operations between the calls, not only as
    # an input of the calls it enters; those may move or mix its rows (`head(h.roll(1, 0))`,
    # `x + x.mean(0)` in a considered block), which the calls' rows do not show, so its rows are
    # named by the tagged passes. A call's own operations are the nodes created while it ran
    # (after its inputs, before its tap; book-kept modules compute from inputs and parameters).
    after_op = {losses.grad_fn}
    window: dict[Node, tuple[int, int]] = {}  # a call's node: (its inputs' last, its tap's) seq
    skips = False

    def follow(node: Node, numbers: set[int]) -> list[Edge] | None:
        nonlocal skips
        edges = [(node, nr) for nr in numbers]
        if node._sequence_nr() < first_tap and all(edge in candidates for edge in edges):
            boundary.update((edge, candidates[edge]) for edge in edges)
            # (entering several calls, its rows may feed other losses in each: tagged too)
            skips = skips or node in after_op or any(entered[edge] > 1 for edge in edges)
            return []
        out = children(node)
        ours = is_tap(node) and node.hooks is hooks
        lo, hi = window.get(node, (0, 0))
        if ours:
            call: ModuleCall = node.call
            seqs = [t.grad_fn._sequence_nr() for t in call.sources if t.grad_fn is not None]
            lo, hi = max(seqs, default=-1), node._sequence_nr()
        elif node in after_op or not lo < node._sequence_nr() < hi:
            after_op.update(child for child, _ in out)
            lo = hi = 0
        window.update((child, (lo, hi)) for child, _ in out if child not in window and hi)
        if is_tap(node):
            out = out[1:]  # the first edge goes to the tap's anchor
            if ours:
                if not _bookkept(call, batch, plan[call.module].values()):
                    return None
                covered.update(id(p) for p in plan[call.module].values())
                for t in call.sources:
                    if t.grad_fn is not None:
                        edge = (t.grad_fn, t.output_nr)
                        candidates[edge] = t
                        entered[edge] = entered.get(edge, 0) + 1
        for child, _ in out:
            variable = leaf(child)
            if variable is not None:
                if id(variable) not in considered:
                    return None  # a trainable leaf that is not book-kept
                reached_params.add(id(variable))
        return out

    if not latest_first([(losses.grad_fn, losses.output_nr)], follow):
        return None
    if not reached_params <= covered:
        return None  # a considered parameter used outside a hooked call (e.g. compiled code)
    tensors = list(boundary.values())
    if any(t.ndim == 0 or t.shape[0] != batch for t in tensors):
        return None
    if not independent({node for node, _ in boundary}):
        return None  # (a resumed backward from both would count the upper one's paths twice)
    if any(t._backward_hooks or t.retains_grad for t in tensors):
        return None  # (a gradient hook on a boundary tensor would run in both backwards)
    return Resume(tensors, skips=skips)


def _bookkept(call: ModuleCall, batch: int, params: Iterable[Tensor]) -> bool:
    """Whether ``summed_grads`` of ``call``'s rule can give its gradients (``batch`` rows), and
    the walk can order its nodes (created in this thread, not e.g. a ``DataParallel`` replica's).
    Not for sharded (FSDP2 ``DTensor``) parameters ``params``: the book-kept gradients are whole
    plain tensors, and FSDP2 reduce-scatters the gradients of its own unsharded parameters, so
    ``losses.backward(w)`` runs instead."""
    return (
        not any(is_sharded(p) for p in params)
        and rule_for(call.module).bookkeeps(call.module)
        and all(r == batch for r in call.rows)
        and call.thread == threading.get_ident()
    )


class _BookKept(torch.autograd.Function):
    """A scalar whose backward returns book-kept gradients for ``params``, computed inside the
    engine: AccumulateGrad then takes them over (a tensor passed from Python would be copied)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, grads: Callable[[], list[Tensor | None]], *params: Tensor
    ) -> Tensor:
        ctx.grads = grads  # type: ignore[attr-defined]
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> Any:
        return None, *ctx.grads()


def book_kept(grads: Callable[[], list[Tensor | None]], params: Sequence[Tensor]) -> Tensor:
    """A scalar to backward from (cotangent 1): ``params`` get ``grads()`` (same order)."""
    with torch.enable_grad():
        out: Tensor = _BookKept.apply(grads, *params)
    return out
