"""The lock-step path of the solver: a bounded number of host synchronisations per solve.

Every row advances together in fixed-shape tensors, and no Python decision depends on a value
computed on the device between two *checks*:

1. sync 1: whether any row conflicts, and the largest active set of the sign guess (free where
   ``q < 0``). When that is at most ``m/4`` (UPGrad on Gramians of real losses) and ``M⁻¹`` is
   trusted, the rows start from the sign guess and solve the dual systems ``H_AA`` (size
   ``|A|``, see ``_common.Inverse``);
2. otherwise a FISTA warm start (fixed iteration count), and sync 2: the largest free and active
   sets of the free sets it identifies; the smaller kind of system is solved (also when the sign
   guess proves far off: at the first check, the rows left restart from FISTA's free sets);
3. ``checks`` rounds of ``steps_per_check`` block-pivoting steps (a row that stops improving
   continues with Murty's single pivots, which terminate), each step solving every row's
   system gathered into a ``[rows, s, s]`` batch (``s``: the largest system plus slack; a row
   whose system outgrows ``s`` waits, unchanged); a row is *done* when its candidate
   satisfies the KKT conditions (``x_F ≥ 0``, ``y_A ≥ 0``, ``y_F ≈ 0``), and stays so;
4. one sync per round: how many rows are left and their largest system (``s`` grows to fit);
   the rows done are then dropped (their count is known on the host: no further sync), so the
   later rounds solve only the rows left (on UPGrad's rows of real Gramians most rows are done
   after a few steps).

At most ``2 + checks`` synchronisations (``1 + checks`` from a sign guess that is not far
off), whatever the number of steps. Rows not done after the last round are returned as such;
the caller finishes them with the exact pivoting path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    MURTY_PATIENCE,
    REFINE_STEPS,
    Inverse,
    SolverOptions,
    chol_solve,
    far_off,
    gather_blocks,
    identity_padded,
    infeasible,
    low_dtype,
    pivots,
    sign_guess_close,
    use_mixed,
)
from .first_order import fista, free_guess


def solve(
    M: Tensor, Q: Tensor, P: Tensor | None, lam: Tensor, options: SolverOptions
) -> tuple[Tensor, Tensor, int]:
    """Rows of LCP(``Q``, ``M``) (``M`` Jacobi-scaled, SPD, ``lam ≥ λ_max``; ``P``: ``−M⁻¹Q``
    if known exactly). Returns ``X``, the rows verified done (``X`` is zero on the others) and
    how many are not."""
    b, m = Q.shape
    eps = torch.finfo(M.dtype).eps
    tol = options.tolerance(M.dtype)
    q_scale = Q.abs().amax(dim=1, keepdim=True)
    conflict = (Q + tol * q_scale < 0).any(dim=1)
    free = Q < 0  # the sign guess
    dual = Inverse(M, P)
    n_active = torch.where(conflict, m - free.sum(dim=1), 0).amax()
    # Sync 1: whether anything conflicts, the sign guess's largest active set, whether H is
    # trusted.
    stats = torch.stack([conflict.sum(), n_active, dual.trusted.long()]).tolist()
    n_conflict, largest, trusted = stats
    X = torch.zeros_like(Q)
    done = ~conflict  # rows with q ≥ 0 are solved by x = 0
    if n_conflict == 0:
        return X, done, 0
    sign_guess = bool(trusted) and sign_guess_close(largest, m) and options.warm_start_iter is None
    use_dual = sign_guess
    if not sign_guess:  # FISTA's free sets instead (sync 2)
        free, use_dual, largest = _fista_guess(M, Q, lam, conflict, bool(trusted), options)
    # A sign guess far off (the first step swaps more than m/8 indices per row): at the first
    # check the rows left restart from FISTA's free sets (one more sync), as on the pivoting path.
    restart = sign_guess and options.warm_start(m, lockstep=True) > 0

    def padded(largest: int, use_dual: bool) -> tuple[_PaddedSystems, bool]:
        s = min(m, max(largest, 1) + max(8, m // 16))  # the largest system, plus slack
        use_low = use_mixed(M, s, options)
        K = dual.H if use_dual else M  # the matrix of the systems
        return _PaddedSystems(K, s, low_dtype(M.dtype) if use_low else None, options), use_low

    solver, use_low = padded(largest, use_dual)
    R = dual.rhs(Q) if use_dual else Q
    res_tol = 1e3 * eps * lam.clamp_min(1.0)
    best = torch.full((b,), m + 1, device=M.device, dtype=torch.long)
    patience = torch.full((b,), MURTY_PATIENCE, device=M.device, dtype=torch.long)
    murty = torch.zeros(b, device=M.device, dtype=torch.bool)
    position = torch.arange(1, m + 1, device=M.device)
    rows = torch.arange(b, device=M.device)  # the rows still in the batch
    X_rows, left, first_swaps = X, n_conflict, torch.zeros((), device=M.device, dtype=torch.long)
    for check in range(options.checks):
        for step in range(options.steps_per_check):
            if use_dual:  # x = p + H_{:A} z_A with H_AA z_A = −p_A
                z, fits, cond = solver.solve(R, ~free)
                x, cond = dual.candidate(R, z, free, cond)
            else:
                x, fits, cond = solver.solve(Q, free)
            y = x @ M + Q
            wrong, scale = infeasible(x, y, free, q_scale, cond, tol)
            # A float32 factorisation refined to float64: its residual must be float64-small
            # (a row failing this is left to the exact pivoting path).
            exact = (~free | (y.abs() <= res_tol * scale)).all(dim=1) | (not use_low)
            n_infeasible = wrong.sum(dim=1)
            now = (n_infeasible == 0) & fits & exact & ~done
            X_rows = torch.where(now.unsqueeze(1), x.clamp_min(0.0), X_rows)
            done = done | now
            # Block pivoting; a row whose infeasible count has not decreased for MURTY_PATIENCE
            # steps switches to Murty's single pivot (the largest infeasible index) for good,
            # which terminates for positive definite M.
            # Rows that did not fit wait: no pivot, no change of their pivoting rule.
            active = ~done & fits
            better = (n_infeasible < best) & active
            best = torch.where(better, n_infeasible, best)
            full = (better | (patience > 0)) & ~murty
            patience = torch.where(better, MURTY_PATIENCE, patience - (full & active).long())
            murty = murty | (~full & active)
            swaps = pivots(wrong, full, position) & active.unsqueeze(1)
            free = free ^ swaps
            if check == step == 0:
                first_swaps = swaps.sum()
        # The sync of this round: rows left, and their largest system (the padded size grows
        # to fit it; rows that did not fit waited, unchanged).
        n_selected = (~free if use_dual else free).sum(dim=1)
        stats = [(~done).sum(), torch.where(done, 0, n_selected).amax(), first_swaps]
        left, largest, n_swaps = torch.stack(stats).tolist()
        X = X.index_copy(0, rows, X_rows)
        if left == 0:
            return X, torch.ones_like(conflict), 0
        if left < rows.numel():  # drop the rows done: the `left` first after a stable sort
            keep = torch.argsort(done.to(torch.int8), stable=True)[:left]
            rows, Q, R, free, q_scale = rows[keep], Q[keep], R[keep], free[keep], q_scale[keep]
            best, patience, murty, done = best[keep], patience[keep], murty[keep], done[keep]
            X_rows = X_rows[keep]
        if restart and check == 0 and far_off(n_swaps, n_conflict, m):
            free, use_dual, largest = _fista_guess(M, Q, lam, ~done, True, options)
            R = dual.rhs(Q, rows) if use_dual else Q
            best, patience = torch.full_like(best, m + 1), torch.full_like(patience, MURTY_PATIENCE)
            murty = torch.zeros_like(murty)
            solver, use_low = padded(largest, use_dual)
        elif largest > solver.s:
            solver, use_low = padded(largest, use_dual)
    finished = torch.ones_like(conflict).index_fill(0, rows, False)
    return X, finished, left


def _fista_guess(
    M: Tensor, Q: Tensor, lam: Tensor, conflict: Tensor, trusted: bool, options: SolverOptions
) -> tuple[Tensor, bool, int]:
    """The free sets of a FISTA warm start (a fixed number of iterations) on rows ``Q``, and
    whether their dual systems (if ``M⁻¹`` is trusted) or primal ones are the smaller, with the
    largest such system over the conflicting rows (one sync)."""
    m, low = M.shape[0], low_dtype(M.dtype)
    x = fista(M.to(low), Q.to(low), lam.to(low), options.warm_start(m, lockstep=True))
    free = free_guess(M, Q, x.to(M.dtype), lam)
    n_free = free.sum(dim=1)
    sizes = [torch.where(conflict, n_free, 0).amax(), torch.where(conflict, m - n_free, 0).amax()]
    largest_free, largest_active = torch.stack(sizes).tolist()
    use_dual = trusted and largest_active < largest_free
    return free, use_dual, largest_active if use_dual else largest_free


class _PaddedSystems:
    """Per row, ``x_S = −M_SS⁻¹ q_S`` on its selected set S, zero elsewhere (primal: ``M`` and
    S = F; dual: ``H`` and S = A), every block gathered into a fixed ``[rows, s, s]`` batch
    (selected indices first, padded with an identity block appended to ``M``). With ``low``,
    factorised in that dtype and refined in ``M``'s."""

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
