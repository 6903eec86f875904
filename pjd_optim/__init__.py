"""Partial Jacobian descent as a one-line change: wrap any ``torch.optim`` optimizer.

>>> optimizer = PartialJDOptimizer(base, model)   # groups flagged "considered": True
>>> optimizer.step(losses)                        # per-instance losses, shape [B]
"""

from importlib.metadata import PackageNotFoundError, version

from ._hooks import replaying
from ._info import StepInfo
from .amp import JDScaler
from .gramian import Call, GramianRule, register_gramian_rule
from .optimizer import Distributed, GramianMode, NonFinite, PartialJDOptimizer
from .solver import SolverOptions
from .weightings import MGDA, DualProj, Mean, UPGrad, Weighting

try:
    __version__ = version("pjd_optim")
except PackageNotFoundError:  # (a source tree that was never installed)
    __version__ = "0+unknown"

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
    "SolverOptions",
    "StepInfo",
    "UPGrad",
    "Weighting",
    "__version__",
    "register_gramian_rule",
    "replaying",
]
