"""Registry of per-layer Gramian rules.

A rule knows, for one module type, how to turn the saved calls of a module (inputs ``A`` and
output gradients ``Gy``, one row per sample) into

- ``per_sample_grads``: ``{name: P}`` with ``P[i] = ∇_θ loss_i`` for each considered parameter
  ``θ`` of the module (summed over every call of the module), and
- ``gramian``: ``Σ_θ P_θ P_θᵀ`` (``[B, B]``), which fast rules compute without materialising
  ``P`` (the "ghost" forms, e.g. ``(A Aᵀ + 1) ⊙ (Gy Gyᵀ)`` for a Linear layer), and
- ``summed_grads``: ``Σ_i P[i]``. Called with output gradients whose row ``i`` is scaled by
  ``w_i``, it is the weighted gradient ``Σ_i w_i ∇_θ loss_i`` ("book-keeping"); rules whose
  ``bookkeeps(module)`` holds compute it as one contraction of the saved factors, so the step
  needs no second backward through the module. (docs/internals.md describes the whole step.)

The engine never looks at module types: it asks :func:`rule_for` and falls back to the generic
rule (``torch.func`` per-sample VJPs), which is exact for any module whose samples are independent.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map


@dataclass(frozen=True)
class Call:
    """One call of a module in the forward, as a rule sees it.

    ``args`` and ``kwargs`` are what the module received (tensors detached). Its per-sample
    inputs have one row per objective on dim 0 (the engine moves other batch dims there:
    ``GramianRule.sample_dims``); ``sample_dims[n]`` is the batch dim the module itself expects
    for the ``n``-th tensor among the flattened ``(args, kwargs)``, ``None`` for a tensor shared by
    every sample (empty: every tensor with the objectives' rows on dim 0 is per-sample).
    ``output_grads[k]`` is the gradient of the objectives w.r.t. the module's ``k``-th
    differentiable output (row ``i`` for objective ``i``), ``output_positions[k]`` that output's
    index among the module's flattened outputs and ``output_dims[k]`` its batch dim in the module's
    own layout (empty: 0). ``outputs`` holds the outputs themselves (batch on dim 0) for rules whose
    ``needs_outputs`` holds, and ``precision`` the least precise dtype the forward ran in
    (autocast's, say; ``None``: the outputs'), and ``autocast`` the ``(device type, dtype)`` of
    the autocast the forward ran under (a rule that re-runs the module re-runs it under it).
    """

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    output_grads: tuple[Tensor, ...]
    output_positions: tuple[int, ...] = (0,)
    sample_dims: tuple[int | None, ...] = ()
    output_dims: tuple[int, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    precision: torch.dtype | None = None
    autocast: tuple[tuple[str, torch.dtype], ...] = ()

    @property
    def rows(self) -> int:
        """The number of objectives (rows of the output gradients)."""
        return self.output_grads[0].shape[0]

    def tensors(self) -> list[Tensor]:
        """The tensors among the flattened ``(args, kwargs)``, in order."""
        return [x for x in tree_flatten((self.args, dict(self.kwargs)))[0] if isinstance(x, Tensor)]

    def per_sample(self) -> list[bool]:
        """For each tensor among the flattened ``(args, kwargs)``, whether it is per-sample."""
        if not self.sample_dims:
            return [has_rows(x, self.rows) for x in self.tensors()]
        return [d is not None for d in self.sample_dims]


class GramianRule:
    """Base class of per-layer rules. Subclasses implement at least :meth:`per_sample_grads`.

    ``recursive = True`` means the rule covers the parameters of the module's sub-modules too
    (for modules such as ``MultiheadAttention`` that use their children's parameters without
    calling the children).
    """

    recursive: bool = False
    needs_outputs: bool = False  # the engine keeps the module's outputs in ``Call.outputs``
    # The methods of the module's class the rule's maths stands for: a subclass that overrides
    # one of them (a Conv's ``_conv_forward``, say) gets the generic rule.
    methods: tuple[str, ...] = ("forward",)

    def applies(self, module: nn.Module) -> bool:
        """Whether the rule's maths holds for this instance of its class (default: always);
        where not, the module takes the generic rule."""
        return True

    # The rule re-runs the module by calling it, its forward hooks included: its calls are tapped
    # after the user's forward hooks (what they return is the output); other rules' maths is
    # the bare forward's, tapped before them.
    calls_hooks: bool = False
    # The names of the parameters the rule's maths reads (``None``: any, as a re-run of the
    # forward). A considered parameter of another name (``weight_g`` of the legacy
    # ``torch.nn.utils.weight_norm``, whose ``weight`` is rebuilt outside the forward) is refused.
    parameters: frozenset[str] | None = None

    def covered_children(self, module: nn.Module) -> frozenset[str]:
        """The names of ``module``'s children whose parameters (their whole subtrees) the rule
        covers too (default: every child if :attr:`recursive`, else none)."""
        if not self.recursive:
            return frozenset()
        return frozenset(name for name, _ in module.named_children())

    def batch_dims(self, module: nn.Module) -> tuple[Sequence[int], Sequence[int]]:
        """Dims of the batch in the module's tensor inputs (``args`` then ``kwargs``, flattened)
        and in its differentiable outputs (flattened); the last entry of each repeats for the
        tensors after it (:func:`batch_dim`). Default ``((0,), (0,))``. The engine moves these
        dims to 0 in the calls it gives the rule; a rule that re-runs the module moves them back."""
        return (0,), (0,)

    def sample_dims(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], rows: int
    ) -> tuple[tuple[int | None, ...], tuple[int, ...]]:
        """For one call with ``rows`` samples: the batch dim of each tensor input (flattened
        ``(args, kwargs)``; ``None`` for a tensor shared by every sample) and of each tapped output.
        By default from :meth:`batch_dims`: an input is per-sample when it has ``rows`` entries on
        its declared batch dim. Rules whose modules take shared tensors of any size decide here
        (by argument name, say), or check their choice as the generic rule does."""
        in_dims, out_dims = self.batch_dims(module)
        tensors = [x for x in tree_flatten((args, dict(kwargs)))[0] if isinstance(x, Tensor)]
        dims: list[int | None] = []
        for n, x in enumerate(tensors):
            d = batch_dim(in_dims, n)
            dims.append(d if x.ndim > d and x.shape[d] == rows else None)
        return tuple(dims), tuple(out_dims)

    def couples_batch(self, module: nn.Module) -> bool | None:
        """Whether ``module`` mixes the samples of its batch right now (BatchNorm on batch
        statistics): per-instance steps through it are refused. ``None`` (default): never."""
        return None

    def positionwise(self, module: nn.Module) -> tuple[int, int] | None:
        """``(input feature dims, output feature dims)`` if every position of a call (each index
        of the dims before the trailing feature dims, e.g. each token of ``[B, T, d]``) is computed
        from that position of the input alone with the same parameters: then positions can be the
        rows (per-token objectives). ``None`` (default) where positions interact."""
        return None

    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        """``{name: P}`` with ``P[i] = Σ_calls ∇_θ loss_i`` for each ``θ = params[name]``."""
        raise NotImplementedError

    def gramian(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> Tensor:
        """``Σ_θ P_θ P_θᵀ`` over ``params``; by default from :meth:`per_sample_grads`."""
        grads = self.per_sample_grads(module, calls, params)
        return sum_of_gramians(list(grads.values()))

    def bookkeeps(self, module: nn.Module) -> bool:
        """Whether :meth:`summed_grads` is cheap and gives ``module``'s gradients exactly as
        autograd would (layout included), so the step may use it instead of a backward."""
        return False

    def summed_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        """``{name: Σ_i P[i]}``; by default the sum of :meth:`per_sample_grads`."""
        grads = self.per_sample_grads(module, calls, params)
        return {name: grad.sum(dim=0) for name, grad in grads.items()}


def batch_dim(dims: Sequence[int], position: int) -> int:
    """The batch dim of the ``position``-th tensor given one of :meth:`GramianRule.batch_dims`'s
    sequences (its last entry repeats)."""
    return dims[min(position, len(dims) - 1)]


_K = TypeVar("_K")


def accumulate(total: dict[_K, Tensor], key: _K, value: Tensor) -> None:
    """``total[key] += value`` (set if absent)."""
    total[key] = total[key] + value if key in total else value


def under_autocast(call: Call) -> contextlib.ExitStack:
    """The autocast ``call``'s forward ran under, to re-run the module under it."""
    stack = contextlib.ExitStack()
    for device_type, dtype in call.autocast:
        stack.enter_context(torch.autocast(device_type, dtype=dtype))
    return stack


def summed_over_calls(
    calls: Sequence[Call], per_call: Callable[[Call], Mapping[str, Tensor]]
) -> dict[str, Tensor]:
    """``{name: Σ_calls P}`` from each call's per-sample gradients ``per_call(call)``."""
    total: dict[str, Tensor] = {}
    for call in calls:
        for name, grad in per_call(call).items():
            accumulate(total, name, grad)
    return total


def has_rows(x: object, rows: int) -> bool:
    """Whether ``x`` is a tensor with ``rows`` rows on dim 0 (one per objective)."""
    return isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] == rows


def map_rows(
    call: Call, rows: int, fn: Callable[[Tensor], Tensor], output_grads: tuple[Tensor, ...]
) -> Call:
    """``call`` with ``fn`` applied to every per-sample input (and output), and the given output
    gradients. (``rows``: the call's rows, kept for the signature.)"""
    flags = iter(call.per_sample())

    def apply(x: Any) -> Any:
        return fn(x) if isinstance(x, Tensor) and next(flags) else x

    args, kwargs = tree_map(apply, (call.args, dict(call.kwargs)))
    outputs = tuple(fn(y) for y in call.outputs)
    return replace(call, args=args, kwargs=kwargs, output_grads=output_grads, outputs=outputs)


def sum_of_gramians(per_sample: Sequence[Tensor]) -> Tensor:
    """``Σ_k P_k P_kᵀ`` with each ``P_k`` flattened to ``[B, -1]``, in float32 or wider."""
    flat = [
        p.reshape(p.shape[0], -1).to(torch.promote_types(p.dtype, torch.float32))
        for p in per_sample  # (a 0-d parameter's P is [B])
    ]
    matrix = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
    return matrix @ matrix.T


_RULES: dict[type[nn.Module], GramianRule] = {}
# Rules for optional dependencies, keyed by "module.QualName" so that importing them is not needed.
_RULES_BY_NAME: dict[str, GramianRule] = {}

_M = TypeVar("_M", bound=type[GramianRule])


def register_gramian_rule(*module_types: type[nn.Module] | str) -> Callable[[_M], _M]:
    """Class decorator: use an instance of the decorated rule for ``module_types`` (and subclasses
    that keep their ``forward``). A type may be given by its dotted name, e.g.
    ``"timm.layers.norm.LayerNorm"``, to avoid importing an optional dependency.

    Example::

        @register_gramian_rule(MyLayer)
        class MyLayerRule(GramianRule):
            def per_sample_grads(self, module, calls, params): ...
    """

    def register(rule_class: _M) -> _M:
        rule = rule_class()
        for module_type in module_types:
            table: dict[Any, GramianRule] = (
                _RULES_BY_NAME if isinstance(module_type, str) else _RULES
            )
            previous = table.get(module_type)
            if previous is not None and type(previous) is not rule_class:
                warnings.warn(
                    f"register_gramian_rule: {module_type!r} already had the rule "
                    f"{type(previous).__name__}; {rule_class.__name__} replaces it.",
                    stacklevel=2,
                )
            table[module_type] = rule
        return rule_class

    return register


# Rules for the copies of a class's code (Hugging Face copies a layer into each model's file):
# the reference's dotted name, the methods compared, the rule.
_COPIES: list[tuple[str, tuple[str, ...], GramianRule]] = []


def register_copies_of(reference: str, *methods: str) -> Callable[[_M], _M]:
    """Class decorator: use an instance of the decorated rule for the class named ``reference``
    (as :func:`register_gramian_rule`) and for every class whose ``methods`` (default:
    ``forward``) compile to the same code as the reference's, reading the same global objects
    (line numbers and comments aside). The reference is imported only when its top package
    already is. Exact copies only: any other change to the code takes the generic rule."""

    def register(rule_class: _M) -> _M:
        register_gramian_rule(reference)(rule_class)
        rule = _RULES_BY_NAME[reference]
        rule.methods = methods or ("forward",)
        _COPIES.append((reference, rule.methods, rule))
        _COPIED.clear()
        return rule_class

    return register


def rule_for(module: nn.Module) -> GramianRule:
    """The rule registered for the nearest base class of ``type(module)`` whose ``forward`` (and
    the rule's other ``methods``) the module still uses, or for the class its code copies
    (:func:`register_copies_of`), where the rule :meth:`~GramianRule.applies` to the module. A
    subclass that overrides one of those methods, or a module with one replaced on the instance
    (accelerate's hooks replace ``forward``), gets the generic rule, which re-runs what it runs."""
    rule = _class_rule(type(module))
    if rule is None or any(name in vars(module) for name in rule.methods):
        return _RULES[nn.Module]
    return rule if rule.applies(module) else _RULES[nn.Module]


def _class_rule(klass: type) -> GramianRule | None:
    for base in klass.__mro__:
        rule = _RULES.get(base) or _RULES_BY_NAME.get(f"{base.__module__}.{base.__qualname__}")
        if rule is not None and all(
            getattr(base, name, None) is getattr(klass, name, None) for name in rule.methods
        ):
            return rule
    cached = _COPIED.get(klass)
    if cached is None or any(getattr(klass, n, None) is not f for n, f in cached[1].items()):
        rule = _copied_rule(klass)
        methods = () if rule is None else rule.methods
        cached = _COPIED[klass] = (rule, {n: getattr(klass, n, None) for n in methods})
    return cached[0]


# The classes looked up as copies: their rule, and the methods compared (to see them replaced).
_COPIED: dict[type, tuple[GramianRule | None, dict[str, object]]] = {}


def _copied_rule(klass: type) -> GramianRule | None:
    for reference, methods, rule in _COPIES:
        package, _, name = reference.rpartition(".")
        if package.partition(".")[0] not in sys.modules:
            continue
        try:
            original = getattr(importlib.import_module(package), name)
        except Exception:  # (absent, or not importable with this torch): no copy of it
            continue
        if all(_same_code(getattr(klass, m, None), getattr(original, m, None)) for m in methods):
            return rule
    return None


def _same_code(f: object, g: object) -> bool:
    """Whether two functions compile to the same code and read the same global objects."""
    if not (isinstance(f, types.FunctionType) and isinstance(g, types.FunctionType)):
        return False
    if _code_key(f.__code__) != _code_key(g.__code__):
        return False
    missing = object()
    return all(
        f.__globals__.get(n, missing) is g.__globals__.get(n, missing) for n in f.__code__.co_names
    )


def _code_key(code: types.CodeType) -> tuple[Any, ...]:
    consts = tuple(_code_key(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return (code.co_code, consts, code.co_names, code.co_varnames, code.co_argcount, code.co_flags)
