"""Registry of per-layer Gramian rules.

A rule knows, for one module type, how to turn the saved calls of a module (inputs ``A`` and
output gradients ``Gy``, one row per sample) into

- ``per_sample_grads``: ``{name: P}`` with ``P[i] = ∇_θ loss_i`` for each considered parameter
  ``θ`` of the module (summed over every call of the module), and
- ``gramian``: ``Σ_θ P_θ P_θᵀ`` (``[B, B]``), which fast rules compute without materialising
  ``P`` (the "ghost" forms of DESIGN.md §3), and
- ``summed_grads``: ``Σ_i P[i]``. Called with output gradients whose row ``i`` is scaled by
  ``w_i``, it is the weighted gradient ``Σ_i w_i ∇_θ loss_i`` (the "book-keeping" of DESIGN.md
  §3); rules whose ``bookkeeps(module)`` holds compute it as one contraction of the saved factors,
  so the step needs no second backward through the module.

The engine never looks at module types: it asks :func:`rule_for` and falls back to the generic
rule (``torch.func`` per-sample VJPs), which is exact for any module whose samples are independent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from .._hooks import ModuleCall


class GramianRule:
    """Base class of per-layer rules. Subclasses implement at least :meth:`per_sample_grads`.

    ``recursive = True`` means the rule covers the parameters of the module's sub-modules too
    (for modules such as ``MultiheadAttention`` that use their children's parameters without
    calling the children).
    """

    recursive: bool = False

    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[ModuleCall], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        """``{name: P}`` with ``P[i] = Σ_calls ∇_θ loss_i`` for each ``θ = params[name]``."""
        raise NotImplementedError

    def gramian(
        self, module: nn.Module, calls: Sequence[ModuleCall], params: Mapping[str, nn.Parameter]
    ) -> Tensor:
        """``Σ_θ P_θ P_θᵀ`` over ``params``; by default from :meth:`per_sample_grads`."""
        grads = self.per_sample_grads(module, calls, params)
        return sum_of_gramians(list(grads.values()))

    def bookkeeps(self, module: nn.Module) -> bool:
        """Whether :meth:`summed_grads` is cheap and gives ``module``'s gradients exactly as
        autograd would (layout included), so the step may use it instead of a backward."""
        return False

    def summed_grads(
        self, module: nn.Module, calls: Sequence[ModuleCall], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        """``{name: Σ_i P[i]}``; by default the sum of :meth:`per_sample_grads`."""
        grads = self.per_sample_grads(module, calls, params)
        return {name: grad.sum(dim=0) for name, grad in grads.items()}


def sum_of_gramians(per_sample: Sequence[Tensor]) -> Tensor:
    """``Σ_k P_k P_kᵀ`` with each ``P_k`` flattened to ``[B, -1]``."""
    flat = [p.flatten(start_dim=1) for p in per_sample]
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
            if isinstance(module_type, str):
                _RULES_BY_NAME[module_type] = rule
            else:
                _RULES[module_type] = rule
        return rule_class

    return register


def rule_for(module: nn.Module) -> GramianRule:
    """The rule registered for the nearest base class of ``type(module)`` whose ``forward`` the
    module still uses; a subclass that overrides ``forward`` gets the generic rule."""
    forward = type(module).forward
    for klass in type(module).__mro__:
        rule = _RULES.get(klass) or _RULES_BY_NAME.get(f"{klass.__module__}.{klass.__qualname__}")
        if rule is not None and getattr(klass, "forward", None) is forward:
            return rule
    return _RULES[nn.Module]
