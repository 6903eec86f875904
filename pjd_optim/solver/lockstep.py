"""The lock-step path of the solver: a bounded number of host synchronisations per solve.

Every row advances together in fixed-shape tensors, and no Python decision depends on a value
computed on the device between two *checks*:

1. FISTA warm start (fixed iteration count) and the free-set guess it identifies;
2. one sync: the padded system size ``s`` (the largest guessed ``|F|`` plus slack);
3. ``checks`` rounds of ``steps_per_check`` block-pivoting steps (a row that stops improving
   continues with Murty's single pivots, which terminate), each step
   solving every row's free system gathered into a ``[rows, s, s]`` batch (rows whose free set
   outgrows ``s`` stop there); a row is *done* when its candidate satisfies the KKT conditions
   (``x_F ≥ 0``, ``y_A ≥ 0``, ``y_F ≈ 0``), and stays as it is from then on;
4. one sync per round: how many rows are left.

At most ``1 + checks`` synchronisations, whatever the number of steps. Rows not done after the
last round are returned as such; the caller finishes them with the exact pivoting path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    MURTY_PATIENCE,
    REFINE_STEPS,
    SolverOptions,
    chol_solve,
    gather_blocks,
    identity_padded,
    infeasible,
    low_dtype,
    pivots,
    use_mixed,
)
from .first_order import fista, free_guess


def solve(M: Tensor, Q: Tensor, lam: Tensor, options: SolverOptions) -> tuple[Tensor, Tensor, int]:
    """Rows of LCP(``Q``, ``M``) (``M`` Jacobi-scaled, SPD, ``lam ≥ λ_max``). Returns ``X``, the
    rows verified done (``X`` is zero on the others) and how many are not."""
    b, m = Q.shape
    low = low_dtype(M.dtype)
    x = fista(M.to(low), Q.to(low), lam.to(low), options.warm_start(m, lockstep=True))
    x = x.to(M.dtype)
    free = free_guess(M, Q, x, lam)
    eps = torch.finfo(M.dtype).eps
    tol = options.tolerance(M.dtype)
    q_scale = Q.abs().amax(dim=1, keepdim=True)
    conflict = (Q + tol * q_scale < 0).any(dim=1)
    # Sync 1: the padded size, and whether anything conflicts at all.
    largest, n_conflict = torch.stack([free.sum(dim=1).amax(), conflict.sum()]).tolist()
    X = torch.zeros_like(Q)
    done = ~conflict  # rows with q ≥ 0 are solved by x = 0
    if n_conflict == 0:
        return X, done, 0
    s = min(m, max(largest, 1) + max(8, m // 8))
    use_low = use_mixed(M.dtype, s, options)
    solver = _PaddedSystems(M, s, low if use_low else None, options)
    res_tol = 1e3 * eps * lam.clamp_min(1.0)
    best = torch.full((b,), m + 1, device=M.device, dtype=torch.long)
    patience = torch.full((b,), MURTY_PATIENCE, device=M.device, dtype=torch.long)
    murty = torch.zeros(b, device=M.device, dtype=torch.bool)
    position = torch.arange(1, m + 1, device=M.device)
    left = n_conflict
    for _ in range(options.checks):
        for _ in range(options.steps_per_check):
            x, fits, cond = solver.solve(Q, free)
            y = x @ M + Q
            wrong, scale = infeasible(x, y, free, q_scale, cond, tol)
            # A float32 factorisation refined to float64: its residual must be float64-small
            # (a row failing this is left to the exact pivoting path).
            exact = (~free | (y.abs() <= res_tol * scale)).all(dim=1) | (not use_low)
            n_infeasible = wrong.sum(dim=1)
            now = (n_infeasible == 0) & fits & exact & ~done
            X = torch.where(now.unsqueeze(1), x.clamp_min(0.0), X)
            done = done | now
            # Block pivoting; a row whose infeasible count has not decreased for MURTY_PATIENCE
            # steps switches to Murty's single pivot (the largest infeasible index) for good,
            # which terminates for positive definite M.
            active = ~done & fits
            better = n_infeasible < best
            best = torch.where(better, n_infeasible, best)
            full = (better | (patience > 0)) & ~murty
            patience = torch.where(better, MURTY_PATIENCE, patience - full.long())
            murty = murty | ~full
            free = free ^ (pivots(wrong, full, position) & active.unsqueeze(1))
        left = int((~done).sum())  # the sync of this round
        if left == 0:
            break
    return X, done, left


class _PaddedSystems:
    """Per row, ``x_F = −M_FF⁻¹ q_F``, ``x_A = 0``, with every free block gathered into a fixed
    ``[rows, s, s]`` batch (free indices first, padded with an identity block appended to ``M``).
    With ``low``, factorised in that dtype and refined in ``M``'s."""

    def __init__(self, M: Tensor, s: int, low: torch.dtype | None, options: SolverOptions) -> None:
        m = M.shape[0]
        self.M, self.m, self.s, self.low = M, m, s, low
        self.flat = identity_padded(M, s, low)
        self.position = torch.arange(s, device=M.device)
        budget = options.max_chunk_bytes or 1 << (22 if M.device.type == "cpu" else 30)
        self.chunk = max(1, budget // (s * s * 8))

    def solve(self, Q: Tensor, free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x``, whether each row's free set fit (and its factorisation succeeded), and the
        condition estimate ``(max Lᵢᵢ / min Lᵢᵢ)²`` of its free block."""
        m, s = self.m, self.s
        counts = free.sum(dim=1)
        order = torch.argsort((~free).to(torch.int8), dim=1, stable=True)[:, :s]
        idx = torch.where(self.position < counts.unsqueeze(1), order, m + self.position)
        q_ext = torch.nn.functional.pad(Q, (0, s))
        rhs = -q_ext.gather(1, idx)
        parts = []
        for start in range(0, Q.shape[0], self.chunk):  # a fixed schedule: no sync
            rows = slice(start, start + self.chunk)
            block = gather_blocks(self.flat, idx[rows])
            factor, info = torch.linalg.cholesky_ex(block)
            diag = factor.diagonal(dim1=1, dim2=2).abs()
            sol = chol_solve(factor, rhs[rows].to(block.dtype)).to(Q.dtype)
            if self.low is not None:
                for _ in range(REFINE_STEPS):
                    x_rows = torch.zeros_like(q_ext[rows]).scatter_(1, idx[rows], sol)
                    product = (x_rows[:, :m] @ self.M).gather(1, idx[rows].clamp_max(m - 1))
                    residual = torch.where(idx[rows] < m, rhs[rows] - product, 0.0)
                    sol = sol + chol_solve(factor, residual.to(block.dtype)).to(Q.dtype)
            parts.append((sol, info == 0, (diag.amax(1) / diag.amin(1)).square()))
        sol = torch.cat([p[0] for p in parts])
        ok = torch.cat([p[1] for p in parts]) & (counts <= s)
        cond = torch.cat([p[2] for p in parts]).to(Q.dtype).nan_to_num(nan=1.0, posinf=1.0)
        x = torch.zeros_like(q_ext).scatter_(1, idx, sol)[:, :m]
        return torch.where(ok.unsqueeze(1), x, 0.0), ok, cond
