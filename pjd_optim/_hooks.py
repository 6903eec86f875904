"""Forward hooks that leave a *tap* on the autograd graph after every considered module.

A tap is an identity :class:`torch.autograd.Function` on the module's output. Its context keeps
the module's (detached) inputs, so what is saved lives exactly as long as the graph: a forward
whose losses are never stepped frees itself, and ``torch.no_grad`` forwards save nothing.

During a *collection* pass (a backward from the losses to a shared ``anchor`` leaf, which only
walks the part of the graph between the losses and the taps) each tap reports its saved inputs
and the gradient of the losses w.r.t. the module's output. Outside a collection pass, taps pass
gradients through unchanged.

Batch-coupling modules (BatchNorm using batch statistics) get a *marker* instead: if the
collection pass walks through one, the per-sample factorisation is invalid and the engine raises.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.hooks import RemovableHandle


@dataclass(eq=False)
class ModuleCall:
    """One call of a hooked module: its inputs (detached) and, once collected, output gradients.

    ``output_grads[k]`` is the gradient of the collected cotangent pass w.r.t. the ``k``-th tapped
    output; ``tapped`` gives the positions of those outputs among the flattened outputs. The
    graph-side fields (``sources``: the inputs that require grad, not detached; ``rows``: dim 0 of
    the tapped outputs; ``seq``: the tap node's sequence number, and the ``thread`` that created
    it) serve ``_resume``.
    """

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tapped: tuple[int, ...]
    order: int
    versions: tuple[int, ...] = ()
    output_grads: tuple[Tensor, ...] = field(default=())
    sources: tuple[Tensor, ...] = ()
    rows: tuple[int, ...] = ()
    seq: int = -1
    thread: int = 0

    def map_rows(
        self, rows: int, fn: Callable[[Tensor], Tensor], output_grads: tuple[Tensor, ...]
    ) -> ModuleCall:
        """A new call with ``fn`` applied to every saved input whose dim 0 has ``rows`` rows
        (the per-sample ones), and the given output gradients."""

        def apply(x: Any) -> Any:
            return fn(x) if has_rows(x, rows) else x

        return ModuleCall(
            module=self.module,
            args=tree_map(apply, self.args),
            kwargs=tree_map(apply, self.kwargs),
            tapped=self.tapped,
            order=self.order,
            output_grads=output_grads,
        )


def has_rows(x: object, rows: int) -> bool:
    """Whether ``x`` is a tensor with ``rows`` rows on dim 0 (one per sample)."""
    return isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] == rows


class Collector:
    """Receives the taps' reports during one collection pass."""

    def __init__(self) -> None:
        self.calls: list[tuple[ModuleCall, tuple[Tensor, ...]]] = []
        self.coupling: list[nn.Module] = []


_ACTIVE = threading.local()


def _active(token: int) -> Collector | None:
    collectors: dict[int, Collector] = getattr(_ACTIVE, "collectors", {})
    return collectors.get(token)


@contextmanager
def collecting(token: int) -> Iterator[Collector]:
    """Route the reports of the taps owned by ``token`` to a fresh collector."""
    collectors: dict[int, Collector] = getattr(_ACTIVE, "collectors", None) or {}
    _ACTIVE.collectors = collectors
    collector = collectors[token] = Collector()
    try:
        yield collector
    finally:
        del collectors[token]


@contextmanager
def suspended() -> Iterator[None]:
    """Disable every tap and marker (used while rules re-run a module's forward)."""
    previous = getattr(_ACTIVE, "suspended", False)
    _ACTIVE.suspended = True
    try:
        yield
    finally:
        _ACTIVE.suspended = previous


def _recording() -> bool:
    return torch.is_grad_enabled() and not getattr(_ACTIVE, "suspended", False)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, call: ModuleCall, token: int, anchor: Tensor, *outs: Tensor
    ) -> Any:
        ctx.call = call  # type: ignore[attr-defined]
        ctx.token = token  # type: ignore[attr-defined]
        # detach() gives fresh tensors (not views), so in-place activations may follow the tap.
        return tuple(out.detach() for out in outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        collector = _active(ctx.token)
        if collector is not None:
            collector.calls.append((ctx.call, grads))
        return (None, None, None, *grads)


class _Marker(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, module: nn.Module, token: int, out: Tensor) -> Tensor:
        ctx.module = module  # type: ignore[attr-defined]
        ctx.token = token  # type: ignore[attr-defined]
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        collector = _active(ctx.token)
        if collector is not None:
            collector.coupling.append(ctx.module)
        return None, None, grad


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def next(self) -> int:
        self.value += 1
        return self.value


class HookSet:
    """The hooks of one optimizer on one model. Holds no reference to the optimizer.

    ``anchor`` is the leaf every tap depends on: ``autograd.grad(losses, anchor)`` is the
    collection pass. ``token`` identifies this hook set's taps.
    """

    def __init__(self) -> None:
        self.anchor = torch.zeros((), requires_grad=True)
        self.token = id(self)
        self.handles: list[RemovableHandle] = []
        self.live = LiveCalls()
        self._counter = _Counter()

    def tap(self, module: nn.Module) -> None:
        """Save inputs and tap outputs of every grad-enabled call of ``module``."""
        self.handles.append(
            module.register_forward_hook(
                _make_tap_hook(self.anchor, self.token, self._counter, self.live), with_kwargs=True
            )
        )

    def mark(self, module: nn.Module, couples: Callable[[nn.Module], bool]) -> None:
        """Mark outputs of ``module`` whenever ``couples(module)`` holds at call time."""
        self.handles.append(module.register_forward_hook(_make_mark_hook(self.token, couples)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _rows(output: Tensor) -> tuple[int, ...]:
    return (output.shape[0] if output.ndim else -1,)


class LiveCalls:
    """The calls whose tap is still on some graph (weakly held), to bound graph walks."""

    def __init__(self) -> None:
        self.calls: weakref.WeakSet[ModuleCall] = weakref.WeakSet()

    def add(self, call: ModuleCall, outs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        grad_fn = outs[0].grad_fn
        call.seq = -1 if grad_fn is None else grad_fn._sequence_nr()
        call.thread = threading.get_ident()  # sequence numbers are counted per thread
        self.calls.add(call)
        return outs

    def first_seq(self) -> int:
        """Smallest sequence number of a live tap: nodes created before it cannot depend on any
        considered module's output."""
        return min((call.seq for call in list(self.calls)), default=-1)


def _make_tap_hook(
    anchor: Tensor, token: int, counter: _Counter, live: LiveCalls
) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not _recording():
            return None
        if isinstance(output, Tensor) and not kwargs and all(isinstance(a, Tensor) for a in args):
            # Fast path for the common case: tensors in, one tensor out.
            if not (output.requires_grad and output.is_floating_point()):
                return None
            call = ModuleCall(
                module=module,
                args=tuple(a.detach() for a in args),
                kwargs={},
                tapped=(0,),
                order=counter.next(),
                versions=tuple(a._version for a in args),
                sources=tuple(a for a in args if a.requires_grad),
                rows=_rows(output),
            )
            return live.add(call, _Tap.apply(call, token, anchor, output))[0]
        leaves, spec = tree_flatten(output)
        tapped = tuple(
            k
            for k, leaf in enumerate(leaves)
            if isinstance(leaf, Tensor) and leaf.requires_grad and leaf.is_floating_point()
        )
        if not tapped:
            return None
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        call = ModuleCall(
            module=module,
            args=tree_map(_detach, args),
            kwargs=tree_map(_detach, kwargs),
            tapped=tapped,
            order=counter.next(),
            versions=tuple(t._version for t in inputs),
            sources=tuple(t for t in inputs if t.requires_grad),
            rows=tuple(r for k in tapped for r in _rows(leaves[k])),
        )
        outs = live.add(call, _Tap.apply(call, token, anchor, *(leaves[k] for k in tapped)))
        for k, out in zip(tapped, outs, strict=True):
            leaves[k] = out
        return tree_unflatten(leaves, spec)

    return hook


def _make_mark_hook(
    token: int, couples: Callable[[nn.Module], bool]
) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not _recording() or not couples(module):
            return None
        if isinstance(output, Tensor) and output.requires_grad:
            return _Marker.apply(module, token, output)
        return None

    return hook


def input_versions(call: ModuleCall) -> tuple[int, ...]:
    """Current version counters of the tensors saved by ``call`` (to detect in-place edits)."""
    return tuple(
        t._version for t in tree_flatten((call.args, call.kwargs))[0] if isinstance(t, Tensor)
    )


def finalize_with(owner: object, hooks: HookSet) -> None:
    """Remove ``hooks`` from the model when ``owner`` is garbage-collected."""
    weakref.finalize(owner, hooks.remove)
