"""Partial Jacobian descent as a one-line change: wrap any ``torch.optim`` optimizer.

>>> optimizer = PartialJDOptimizer(base, model)   # groups flagged "considered": True
>>> optimizer.step(losses)                        # per-instance losses, shape [B]
"""

from ._info import StepInfo
from .amp import JDScaler
from .gramian import Call, GramianRule, register_gramian_rule
from .optimizer import Distributed, GramianMode, NonFinite, PartialJDOptimizer
from .weightings import MGDA, DualProj, Mean, UPGrad, Weighting

__all__ = [
    "MGDA",
    "Call",
    "Distributed",
    "DualProj",
    "GramianMode",
    "GramianRule",
    "JDScaler",
    "Mean",
    "NonFinite",
    "PartialJDOptimizer",
    "StepInfo",
    "UPGrad",
    "Weighting",
    "register_gramian_rule",
]
