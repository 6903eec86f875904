"""Per-layer Gramian rules (one file per layer family) behind one registry: the rule kit.

A rule turns a module's recorded calls (:class:`Call`: inputs and output gradients, one row per
objective) into per-sample gradients, a Gramian and summed gradients; register it with
:func:`register_gramian_rule`. The helpers here are the ones the built-in rules use:
:func:`per_sample_vjp` (exact per-sample gradients by re-running the module under ``torch.func``),
:func:`summed_over_calls` and :func:`sum_of_gramians` (sums over calls and parameters), and
:func:`compute_dtype` / :func:`wide` (Gramians accumulate in float32 or wider).
"""

from . import conv, embedding, generic, linear, norm, recurrent  # noqa: F401 (their rules)
from ._registry import (
    Call,
    GramianRule,
    register_gramian_rule,
    sum_of_gramians,
    summed_over_calls,
)
from .generic import GenericRule, per_sample_vjp
from .linear import GroupedLinearRule, compute_dtype, wide

__all__ = [
    "Call",
    "GenericRule",
    "GramianRule",
    "GroupedLinearRule",
    "compute_dtype",
    "per_sample_vjp",
    "register_gramian_rule",
    "sum_of_gramians",
    "summed_over_calls",
    "wide",
]
