"""Forward hooks that leave a *tap* on the autograd graph after every considered module.

A tap is an identity :class:`torch.autograd.Function` on the module's output. Its context keeps
the module's (detached) inputs, so what is saved lives exactly as long as the graph: a forward
whose losses are never stepped frees itself, and ``torch.no_grad`` forwards save nothing.

During a *collection* pass (a backward from the losses to the hook set's ``anchor`` leaf, which
only walks the part of the graph between the losses and the taps) each tap reports its saved
inputs and the gradient of the objectives w.r.t. the module's output to the hook set's collector.
Outside a collection pass, taps pass gradients through unchanged. A pass is recognised by its
autograd graph task, which a *probe* on the losses (the first node the pass runs) records: a
backward that another thread runs meanwhile through the same taps reports nothing.

Batch-coupling modules (BatchNorm using batch statistics) get a *marker* instead: if the
collection pass walks through one, the per-sample factorisation is invalid and the engine raises.

Threads: autograd runs the backward of a CUDA graph on a per-device worker thread, so what a
tap or marker reads during a backward (the collector) lives on its :class:`HookSet`, never in
thread-local storage. The only per-thread state is :func:`suspended`, which forward hooks read in
the thread that runs the forward. An optimizer's hook set serves one step at a time.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.hooks import RemovableHandle

from .gramian._registry import rule_for


@dataclass(eq=False)
class ModuleCall:
    """One recorded call of a hooked module (the engine's record; rules see a ``Call``).

    ``tapped``: positions of the tapped outputs among the flattened outputs. ``versions``: the
    saved inputs' version counters at call time (in-place edits are detected). The graph-side
    fields serve ``_resume``: ``sources`` (the inputs that require grad, not detached), ``rows``
    (dim 0 of the tapped outputs), ``seq`` (the tap node's sequence number) and the ``thread``
    that created it (sequence numbers are counted per thread). ``outputs``: the tapped outputs
    (detached), kept for rules that check their re-run of the module; ``dtypes``: those of the
    tapped outputs and, under autocast, the autocast dtype (the precision of the gradients).
    """

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tapped: tuple[int, ...]
    order: int
    versions: tuple[int, ...] = ()
    sources: tuple[Tensor, ...] = ()
    rows: tuple[int, ...] = ()
    seq: int = -1
    thread: int = 0
    outputs: tuple[Tensor, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()
    output_versions: tuple[int, ...] = ()
    autocast: tuple[tuple[str, torch.dtype], ...] = ()

    def saved_tensors(self) -> list[Tensor]:
        if not self.kwargs and all(isinstance(a, Tensor) for a in self.args):  # the common case
            return list(self.args)
        return [t for t in tree_flatten((self.args, self.kwargs))[0] if isinstance(t, Tensor)]

    def modified_in_place(self) -> bool:
        """Whether a saved input was modified in place after the call (its values are stale)."""
        return tuple(t._version for t in self.saved_tensors()) != self.versions

    def output_modified_in_place(self) -> bool:
        """Whether a kept output was modified in place after the call."""
        return tuple(y._version for y in self.outputs) != self.output_versions


@dataclass
class Collector:
    """Receives the taps' reports during one collection pass (graph task ``task``)."""

    calls: list[tuple[ModuleCall, tuple[Tensor, ...]]] = field(default_factory=list)
    coupling: list[nn.Module] = field(default_factory=list)
    task: int | None = None

    def accepts(self) -> bool:
        """Whether the backward running now (in whatever thread) is this collector's pass."""
        return self.task is not None and self.task == torch._C._current_graph_task_id()


class _Probe(torch.autograd.Function):
    """Identity on the losses; its backward, the root of a collection pass, names the pass."""

    @staticmethod
    def forward(ctx: FunctionCtx, collector: Collector, losses: Tensor) -> Tensor:
        ctx.collector = collector  # type: ignore[attr-defined]
        return losses.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        ctx.collector.task = torch._C._current_graph_task_id()
        return None, grad


class HookSet:
    """The hooks of one optimizer on one model. Holds no reference to the optimizer.

    ``anchor`` is the leaf every tap depends on: ``autograd.grad(losses, anchor)`` is the
    collection pass. ``collector`` is set during :meth:`collecting` only.
    """

    def __init__(self) -> None:
        self.anchor = torch.zeros((), requires_grad=True)
        self.handles: list[RemovableHandle] = []
        self.live = LiveCalls()
        self.collector: Collector | None = None
        self.order = itertools.count()

    @contextmanager
    def collecting(self) -> Iterator[Collector]:
        """Route the reports of this set's taps (from whatever thread runs them) to a fresh
        collector, for the pass whose root is :meth:`probe`."""
        self.collector = collector = Collector()
        try:
            yield collector
        finally:
            self.collector = None

    def probe(self, losses: Tensor) -> Tensor:
        """``losses``, through the probe that marks the collection pass run from them."""
        assert self.collector is not None, "probe() belongs inside collecting()"
        with torch.enable_grad():
            out: Tensor = _Probe.apply(self.collector, losses)
        return out

    def tap(self, module: nn.Module) -> None:
        """Save inputs and tap outputs of every grad-enabled call of ``module``: before the user's
        forward hooks (one that returns another output acts outside the rule's maths), after
        them for rules that re-run the module with its hooks (``GramianRule.calls_hooks``)."""
        hook = _TapHook(self, module)
        first = not rule_for(module).calls_hooks
        self.handles.append(module.register_forward_hook(hook, with_kwargs=True, prepend=first))

    def mark(self, module: nn.Module, couples: Callable[[nn.Module], bool]) -> None:
        """Mark outputs of ``module`` whenever ``couples(module)`` holds at call time."""
        self.handles.append(module.register_forward_hook(_MarkHook(self, module, couples)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


_FORWARD = threading.local()


@contextmanager
def suspended() -> Iterator[None]:
    """Disable every tap and marker in this thread (while rules re-run a module's forward)."""
    previous = getattr(_FORWARD, "suspended", False)
    _FORWARD.suspended = True
    try:
        yield
    finally:
        _FORWARD.suspended = previous


def replaying() -> bool:
    """Whether this thread runs inside a step's re-run of a considered module (the generic rule
    re-runs modules per example, with their forward hooks): a hook with side effects, such as
    keeping features, can skip those calls (``if not pjd_optim.replaying(): ...``)."""
    return bool(getattr(_FORWARD, "suspended", False))


def _recording() -> bool:
    return torch.is_grad_enabled() and not getattr(_FORWARD, "suspended", False)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, call: ModuleCall, hooks: HookSet, anchor: Tensor, *outs: Tensor
    ) -> Any:
        ctx.call = call  # type: ignore[attr-defined]
        ctx.hooks = hooks  # type: ignore[attr-defined]
        # detach() gives fresh tensors (not views), so in-place activations may follow the tap.
        return tuple(out.detach() for out in outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        collector: Collector | None = ctx.hooks.collector
        if collector is not None and collector.accepts():
            collector.calls.append((ctx.call, grads))
        return (None, None, None, *grads)


class _Marker(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, module: nn.Module, hooks: HookSet, out: Tensor) -> Tensor:
        ctx.module = module  # type: ignore[attr-defined]
        ctx.hooks = hooks  # type: ignore[attr-defined]
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        collector: Collector | None = ctx.hooks.collector
        if collector is not None and collector.accepts():
            collector.coupling.append(ctx.module)
        return None, None, grad


def is_tap(node: object) -> bool:
    """Whether an autograd node is the backward of a tap."""
    return issubclass(type(node), _Tap._backward_cls)


class _Inert:
    """What a hook becomes in a copy of its module (``copy.deepcopy``, pickling): nothing."""

    def __call__(self, *args: object) -> None:
        return None


class _Hook:
    """A forward hook of one hook set on one module. A copy or a pickle of the module gets an
    inert hook (its calls are not this optimizer's business), and calls of any other module that
    shares the hook dict (a shallow copy, a ``DataParallel`` replica) are ignored."""

    def __init__(self, hooks: HookSet, module: nn.Module) -> None:
        self.hooks = hooks
        self.module = weakref.ref(module)

    def __reduce__(self) -> tuple[type[_Inert], tuple[()]]:
        return _Inert, ()

    def active(self, module: nn.Module) -> bool:
        return module is self.module() and _recording()


class _TapHook(_Hook):
    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if not self.active(module):
            return None
        if torch.compiler.is_compiling():  # graph break: the tap runs eagerly
            return _tap_eagerly(self.hooks, module, args, kwargs, output)
        return _tap(self.hooks, module, args, kwargs, output)


class _MarkHook(_Hook):
    def __init__(
        self, hooks: HookSet, module: nn.Module, couples: Callable[[nn.Module], bool]
    ) -> None:
        super().__init__(hooks, module)
        self.couples = couples

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not (self.active(module) and self.couples(module)):
            return None
        if isinstance(output, Tensor) and output.requires_grad:
            return _Marker.apply(module, self.hooks, output)
        return None


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def _rows(output: Tensor) -> tuple[int, ...]:
    return (output.shape[0] if output.ndim else -1,)


def _differentiable(x: object) -> bool:
    return isinstance(x, Tensor) and x.requires_grad and x.is_floating_point()


def _kept(module: nn.Module, outputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The outputs, detached, if the module's rule checks its re-run against them."""
    return tuple(y.detach() for y in outputs) if rule_for(module).needs_outputs else ()


def _dtypes(outputs: Sequence[Tensor]) -> tuple[torch.dtype, ...]:
    """The outputs' dtypes, and the autocast dtype where autocast is on for their device."""
    return (*(y.dtype for y in outputs), *(dtype for _, dtype in _autocast(outputs)))


def _autocast(outputs: Sequence[Tensor]) -> tuple[tuple[str, torch.dtype], ...]:
    """``(device type, dtype)`` of the autocast on for the outputs' devices (rules that re-run
    the module re-run it under the same)."""
    kinds = sorted({y.device.type for y in outputs})
    return tuple((k, torch.get_autocast_dtype(k)) for k in kinds if torch.is_autocast_enabled(k))


def _positional(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Keyword arguments naming the forward's next positional parameters, moved into ``args``
    (``Linear(input=x)`` recorded as ``Linear(x)``: rules read their inputs by position)."""
    cached = "forward" not in vars(module)  # (a forward of the instance's own: read each time)
    names = _POSITIONAL.get(type(module)) if cached else None
    if names is None:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        try:
            parameters = inspect.signature(module.forward).parameters.values()
        except (TypeError, ValueError):  # (no signature to read: kept as called)
            return args, kwargs
        names = tuple(p.name for p in parameters if p.kind in kinds)
        if cached:
            _POSITIONAL[type(module)] = names
    moved, rest = list(args), dict(kwargs)
    for name in names[len(args) :]:
        if name not in rest:
            break
        moved.append(rest.pop(name))
    return tuple(moved), rest


_POSITIONAL: dict[type, tuple[str, ...]] = {}  # per module class, its forward's positional names


def _tap(
    hooks: HookSet, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    if kwargs:
        args, kwargs = _positional(module, args, kwargs)
    if isinstance(output, Tensor) and not kwargs and all(isinstance(a, Tensor) for a in args):
        # Fast path for the common case: tensors in, one tensor out.
        if not _differentiable(output):
            return None
        call = ModuleCall(
            module=module,
            args=tuple(a.detach() for a in args),
            kwargs={},
            tapped=(0,),
            order=next(hooks.order),
            versions=tuple(a._version for a in args),
            sources=tuple(a for a in args if a.requires_grad),
            rows=_rows(output),
            outputs=_kept(module, (output,)),
            dtypes=_dtypes((output,)),
            autocast=_autocast((output,)),
        )
        call.output_versions = tuple(y._version for y in call.outputs)
        return hooks.live.add(call, _Tap.apply(call, hooks, hooks.anchor, output))[0]
    leaves, spec = tree_flatten(output)
    tapped = tuple(k for k, leaf in enumerate(leaves) if _differentiable(leaf))
    if not tapped:
        return None
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
    call = ModuleCall(
        module=module,
        args=tree_map(_detach, args),
        kwargs=tree_map(_detach, kwargs),
        tapped=tapped,
        order=next(hooks.order),
        versions=tuple(t._version for t in inputs),
        sources=tuple(t for t in inputs if t.requires_grad),
        rows=tuple(r for k in tapped for r in _rows(leaves[k])),
        outputs=_kept(module, [leaves[k] for k in tapped]),
        dtypes=_dtypes([leaves[k] for k in tapped]),
        autocast=_autocast([leaves[k] for k in tapped]),
    )
    call.output_versions = tuple(y._version for y in call.outputs)
    outs = hooks.live.add(call, _Tap.apply(call, hooks, hooks.anchor, *(leaves[k] for k in tapped)))
    for k, out in zip(tapped, outs, strict=True):
        leaves[k] = out
    return tree_unflatten(leaves, spec)


# Under torch.compile the tap cannot be traced (it records Python objects on the graph): the
# compiler breaks the graph around the considered module's call and runs it, and its tap, eagerly.
_tap_eagerly = cast(Callable[..., Any], torch.compiler.disable)(_tap)


class LiveCalls:
    """The calls whose tap is still on some graph (weakly held), to bound graph walks."""

    def __init__(self) -> None:
        self.calls: weakref.WeakSet[ModuleCall] = weakref.WeakSet()

    def add(self, call: ModuleCall, outs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        grad_fn = outs[0].grad_fn
        call.seq = -1 if grad_fn is None else grad_fn._sequence_nr()
        call.thread = threading.get_ident()
        self.calls.add(call)
        return outs

    def dtypes(self) -> set[torch.dtype]:
        """The dtypes the live calls ran in (their outputs', and autocast's)."""
        return {d for call in list(self.calls) for d in call.dtypes}

    def first_seq(self) -> int:
        """Smallest sequence number of a live tap: nodes created before it cannot depend on any
        considered module's output."""
        return min((call.seq for call in list(self.calls)), default=-1)


def finalize_with(owner: object, hooks: HookSet) -> None:
    """Remove ``hooks`` from the model when ``owner`` is garbage-collected."""
    weakref.finalize(owner, hooks.remove)
