"""Per-layer Gramian rules (one file per layer family) behind one registry."""

from . import conv, embedding, generic, linear, norm
from ._registry import GramianRule, register_gramian_rule, rule_for, sum_of_gramians
from .norm import couples_batch

__all__ = [
    "GramianRule",
    "conv",
    "couples_batch",
    "embedding",
    "generic",
    "linear",
    "norm",
    "register_gramian_rule",
    "rule_for",
    "sum_of_gramians",
]
