r"""The one batched free-set solve of the solver: per row, ``K_SS z_S = r_S`` on its selected
set ``S`` (``z`` zero elsewhere), for every row at once.

The primal systems of a pivoting step are ``K = M`` with ``S = F`` (the free set) and
``r = −q``; the dual ones are ``K = H = M⁻¹`` with ``S = A`` and ``r = −p``
(:class:`._common.Inverse`). Each row's selected indices come first, padded to the chunk's
size ``s`` with the indices of an identity block appended to ``K``, so that a chunk is one
``[c, s, s]`` batch: one gather (flat indices) and one batched Cholesky factorisation, then two
triangular solves. With a low dtype the blocks are factorised in it and the solutions refined
in ``K``'s (``z += K_SS⁻¹(r_S − K_SS z_S)``).

Two schedules, the only difference between the host and the lock-step loop:

- ``s=None`` (host): rows sorted by ``|S|`` and chunked so that each chunk is padded to its own
  largest row (one host sync for the sizes);
- ``s`` given (lock-step): every row padded to ``s`` in fixed chunks, no sync; a row whose
  ``|S|`` exceeds ``s`` is returned not ``ok`` (it waits).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import CHUNK_BYTES_CPU, CHUNK_BYTES_DEVICE, REFINE_STEPS


class Systems:
    """Batched solves on the selected sets of ``K`` (``[m, m]`` SPD), factorised in ``low`` if
    given (refined to ``K``'s precision)."""

    def __init__(self, K: Tensor, low: torch.dtype | None, max_chunk_bytes: int | None) -> None:
        self.K, self.low, self.m = K, low, K.shape[0]
        default = CHUNK_BYTES_CPU if K.device.type == "cpu" else CHUNK_BYTES_DEVICE
        self.chunk_bytes = max_chunk_bytes or default
        self.flat = torch.empty(0, dtype=low or K.dtype, device=K.device)

    def solve(self, R: Tensor, sel: Tensor, s: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``z`` (``[b, m]``), whether each row's system was solved (factorised; ``|S| ≤ s``)
        and ``(max Lᵢᵢ / min Lᵢᵢ)²``, a lower estimate of the condition number of ``K_SS``."""
        b, m = R.shape
        counts = sel.sum(dim=1)
        z = torch.zeros_like(R)
        ok = torch.ones(b, dtype=torch.bool, device=R.device)
        cond = torch.ones_like(R[:, 0])
        if s is None:
            perm = torch.argsort(counts, descending=True)
            sizes = counts[perm].tolist()  # the host sync of this schedule
            chunks = []
            start = 0
            while start < b and sizes[start] > 0:  # rows with S = ∅ keep z = 0
                end = min(b, start + max(1, self.chunk_bytes // (8 * sizes[start] ** 2)))
                chunks.append((perm[start:end], sizes[start]))
                start = end
            s = max(sizes, default=0)
        else:
            step = max(1, self.chunk_bytes // (8 * max(s, 1) ** 2))
            rows = torch.arange(b, device=R.device)
            chunks = [(rows[i : i + step], s) for i in range(0, b, step)] if s else []
            ok = counts <= s
        if not chunks:
            return z, ok, cond
        flat = self._padded(s)
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :s]  # selected first
        position = torch.arange(s, device=R.device)
        r_ext = torch.nn.functional.pad(R, (0, s))
        for rows, sc in chunks:
            pos = position[:sc]
            idx = torch.where(pos < counts[rows].unsqueeze(1), order[rows, :sc], m + pos)
            sol, solved, cond[rows] = self._factor_solve(flat, idx, r_ext[rows].gather(1, idx))
            z[rows] = torch.zeros_like(r_ext[rows]).scatter_(1, idx, sol)[:, :m]
            ok[rows] &= solved
        return torch.where(ok.unsqueeze(1), z, 0.0), ok, cond.nan_to_num(nan=1.0, posinf=1.0)

    def _padded(self, s: int) -> Tensor:
        """``K`` in the factorisation dtype with an identity block of at least ``s`` appended,
        flattened (kept for later calls with ``s`` no larger)."""
        m, n = self.m, math.isqrt(self.flat.numel())
        if n - m < s:
            extended = torch.zeros(m + s, m + s, dtype=self.flat.dtype, device=self.K.device)
            extended[:m, :m] = self.K
            extended.diagonal()[m:] = 1.0
            self.flat = extended.view(-1)
        return self.flat

    def _factor_solve(self, flat: Tensor, idx: Tensor, rhs: Tensor) -> tuple[Tensor, ...]:
        """Gather the ``[c, s, s]`` blocks ``K[idx_r, idx_r]``, factorise, solve (and refine)."""
        n, s = math.isqrt(flat.numel()), idx.shape[1]
        blocks = flat.index_select(0, ((idx * n).unsqueeze(2) + idx.unsqueeze(1)).view(-1))
        factor, info = torch.linalg.cholesky_ex(blocks.view(-1, s, s))
        diag = factor.diagonal(dim1=1, dim2=2).abs()
        sol = _chol_solve(factor, rhs.to(factor.dtype)).to(rhs.dtype)
        if self.low is not None:
            K = self.K
            for _ in range(REFINE_STEPS):
                x = torch.zeros(idx.shape[0], n, dtype=K.dtype, device=K.device)
                x = x.scatter_(1, idx, sol)[:, : self.m]
                product = (x @ K).gather(1, idx.clamp_max(self.m - 1))
                residual = torch.where(idx < self.m, rhs - product, 0.0)
                sol = sol + _chol_solve(factor, residual.to(factor.dtype)).to(rhs.dtype)
        return sol, info == 0, (diag.amax(1) / diag.amin(1)).square().to(rhs.dtype)


def _chol_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``L Lᵀ z = rhs`` for a batch of lower Cholesky factors; ``rhs`` is ``[c, s]``."""
    z: Tensor = torch.linalg.solve_triangular(factor, rhs.unsqueeze(2), upper=False)
    z = torch.linalg.solve_triangular(factor.mT, z, upper=True)
    return z.squeeze(2)
