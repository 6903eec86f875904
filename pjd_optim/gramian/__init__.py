"""Per-layer Gramian rules (one file per layer family) behind one registry."""

from . import conv, embedding, generic, linear, norm, recurrent
from ._registry import (
    Call,
    GramianRule,
    accumulate,
    batch_dim,
    has_rows,
    map_rows,
    register_gramian_rule,
    rule_for,
    sum_of_gramians,
    summed_over_calls,
)
from .norm import couples_batch

__all__ = [
    "Call",
    "GramianRule",
    "accumulate",
    "batch_dim",
    "conv",
    "couples_batch",
    "embedding",
    "generic",
    "has_rows",
    "linear",
    "map_rows",
    "norm",
    "recurrent",
    "register_gramian_rule",
    "rule_for",
    "sum_of_gramians",
    "summed_over_calls",
]
