"""What a step computed (``StepInfo``, public) and what the steps change on the wrapper."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._engine import GramianSource


@dataclass(frozen=True, repr=False)
class StepInfo:
    """What the last :meth:`PartialJDOptimizer.backward` computed (detached).

    ``conflict`` is the fraction of pairs ``i < j`` with a negative cosine ``G_ij < 0`` and
    ``min_cosine`` the smallest ``G_ij / √(G_ii G_jj)`` (both over the considered parameters).
    ``gramian_seconds`` and ``weighting_seconds`` are host wall-clock times of the two stages
    (on CUDA, without synchronisation: they measure launch, not kernel, time). ``resumed``: the
    weighted gradient was book-kept and the trunk's backward resumed at the boundary.
    """

    gramian: Tensor
    weights: Tensor
    gramian_seconds: float = 0.0
    weighting_seconds: float = 0.0
    received_bytes: int = 0
    resumed: bool = False
    check_seconds: float = 0.0

    def __repr__(self) -> str:
        """A summary (the Gramian and the weights are attributes)."""
        m = self.weights.numel()
        total = float(self.weights.double().sum()) if m else 0.0
        return (
            f"StepInfo(m={m}, weights sum {total:.3g}, conflict {self.conflict:.1%}, "
            f"min cosine {self.min_cosine:.3f}, Gramian {1e3 * self.gramian_seconds:.1f} ms "
            f"(check {1e3 * self.check_seconds:.1f} ms), weighting "
            f"{1e3 * self.weighting_seconds:.1f} ms, resumed={self.resumed})"
        )

    @property
    def cosines(self) -> Tensor:
        norms = self.gramian.diagonal().clamp_min(torch.finfo(self.gramian.dtype).tiny).sqrt()
        return self.gramian / norms.unsqueeze(0) / norms.unsqueeze(1)

    @property
    def conflict(self) -> float:
        m = self.gramian.shape[0]
        if m < 2:
            return 0.0
        upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=self.gramian.device), 1)
        return float((self.gramian[upper] < 0).float().mean())

    @property
    def min_cosine(self) -> float:
        return float(self.cosines.min())


@dataclass
class Status:
    """What the steps change on the wrapper, in one object: a proxy of the optimizer (Lightning's
    ``LightningOptimizer`` subclasses the optimizer's class and forwards attribute reads) calling
    these methods then updates the optimizer's own state."""

    source: GramianSource
    last_step: StepInfo | None = None
    skipped_steps: int = 0
    pending: bool = False  # a Jacobian-descent backward since the last step
    backwards: int = 0  # Jacobian-descent backwards so far (a closure may run one)
    cleared: bool = False  # zero_grad() since that pending backward (its gradient is gone)
    weighted: bool = False  # a weighted_loss since the last step (the caller's backward runs)
    weighted_nonfinite: bool = False  # ... with non-finite losses or Gramian (NaN weights)
    warned_plain: bool = False
    read_grads: bool = False  # a plain step reads .grad first (a non-finite backward since)
