r"""The exact pivoting path of the solver, in torch (any device; host-synchronising).

Each row is an LCP ``x ≥ 0``, ``y = Mx + q ≥ 0``, ``xᵀy = 0`` (``M`` Jacobi-scaled, SPD). For a
free set F (``y_F = 0``) and active set A (``x_A = 0``) the candidate is ``x_F = −M_FF⁻¹ q_F``.
Block principal pivoting (Júdice & Pires 1994; Kim & Park 2011) swaps every infeasible index
(``x_F < 0`` or ``y_A < 0``) between F and A; when a row's infeasible count has not decreased for
``MURTY_PATIENCE`` steps it takes Murty's single pivot (the largest infeasible index), finite for
positive definite ``M``. Once every row left has stalled, or after ``BPP_STEPS`` steps, the rows
finish with the monotone active-set method of :mod:`.active_set` (also exact and finite).

Each step solves all remaining rows at once: sorted by system size and chunked, blocks gathered
and padded with identity rows, one batched Cholesky per chunk (on accelerators, large blocks in
float32, refined to float64 accuracy). The systems are the primal ``M_FF`` or, when smaller,
the dual ``H_AA`` (:class:`Dual`). Converged rows are dropped; about two host syncs per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._common import (
    BPP_STEPS,
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
    no_convergence,
    pivots,
    use_mixed,
)
from ._common import not_positive_definite as _not_pd
from .active_set import active_set as _active_set


def solve(
    M: Tensor,
    Q: Tensor,
    P: Tensor | None,
    free: Tensor,
    x_start: Tensor,
    lam: Tensor,
    options: SolverOptions,
    warm_start: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """Rows of LCP(``Q``, ``M``) by block pivoting from the free-set guess ``free``, then the
    active-set method from ``x_start`` (feasible) for rows that stall. ``lam ≥ λ_max(M)``;
    ``P``: ``−M⁻¹Q`` if known exactly (UPGrad), else computed when the dual systems are used.

    ``warm_start`` (rows ``Q`` → free sets and feasible iterates) is called when the first step
    swapped more than ``m/8`` indices per row on average (the guess was far off): the rows left
    restart from its free sets.
    """
    b, m = Q.shape
    X = torch.zeros_like(Q)
    if b == 0:
        return X
    tol = options.tolerance(M.dtype)
    iters = options.iterations(m)
    chunk_bytes = options.max_chunk_bytes or 1 << (22 if M.device.type == "cpu" else 28)
    eps = torch.finfo(M.dtype).eps
    M_low = M.to(low_dtype(M.dtype))
    rows = torch.arange(b, device=M.device)
    q_scale = Q.abs().amax(dim=1, keepdim=True)
    res_tol = 1e3 * eps * lam.clamp_min(1.0)  # residual bound of a refined float32 solution
    best = torch.full((b,), m + 1, device=M.device, dtype=torch.long)
    patience = torch.full((b,), MURTY_PATIENCE, device=M.device, dtype=torch.long)
    precise = torch.zeros(b, device=M.device, dtype=torch.bool)
    position = torch.arange(1, m + 1, device=M.device)
    s, s_dual = largest_systems(free)
    n_hopeful, dual = b, Dual(M, Q, P)
    for step in range(iters):
        if step == BPP_STEPS or n_hopeful == 0:  # all rows stalled: monotone fallback
            X[rows] = active_set(M, Q, x_start, tol, iters - step, chunk_bytes)
            return X
        if s_dual < s and dual.usable():  # the dual systems are the smaller ones
            use_low = use_mixed(M, s_dual, options)
            x, failed, failed_low, cond = dual.solve(rows, free, use_low, ~precise, chunk_bytes)
        else:
            use_low = use_mixed(M, s, options)
            x, failed, failed_low, cond = solve_free(
                M, M_low if use_low else None, Q, free, ~precise, chunk_bytes
            )
        y = x @ M + Q  # rows of (M x + q), M symmetric
        wrong, scale = infeasible(x, y, free, q_scale, cond, tol)
        # A float32 factorisation that failed or whose refinement fell short: no pivot, the row
        # is redone in float64 (rows are flagged at most once, so this cannot loop).
        inexact = failed_low | (free & (y.abs() > res_tol * scale)).any(dim=1)
        inexact = inexact & ~precise & use_low
        precise = precise | inexact
        wrong = wrong & ~inexact.unsqueeze(1)
        n_infeasible = wrong.sum(dim=1)
        done = (n_infeasible == 0) & ~inexact
        X.index_copy_(0, rows, torch.where(done.unsqueeze(1), x.clamp_min(0.0), 0.0))
        # Block pivoting with Murty's backup rule, vectorised over rows.
        better = (n_infeasible < best) & ~inexact
        best = torch.where(better, n_infeasible, best)
        full = better | (patience > 0)
        patience = torch.where(
            better, MURTY_PATIENCE, torch.where(full & ~inexact, patience - 1, patience)
        )
        swaps = pivots(wrong, full, position)
        free = free ^ swaps
        n_free = free.sum(dim=1)
        stats = [(~done).sum(), torch.where(done, 0, n_free).amax(), failed.sum()]
        stats.append((~done & (patience > 0)).sum())  # rows not yet reduced to Murty's rule
        stats += [torch.where(done, 0, m - n_free).amax(), swaps.sum()]
        n_keep, s, n_failed, n_hopeful, s_dual, n_swaps = torch.stack(stats).tolist()  # one sync
        if n_failed:
            raise _not_pd()
        if n_keep == 0:
            return X
        if n_keep < len(rows):
            keep = torch.argsort(done.to(torch.int8), stable=True)[:n_keep]
            rows, Q, free, q_scale = rows[keep], Q[keep], free[keep], q_scale[keep]
            x_start, best, patience = x_start[keep], best[keep], patience[keep]
            precise = precise[keep]
        if warm_start is not None and far_off(n_swaps, len(swaps), m):  # restart
            free, x_start = warm_start(Q)
            best, patience = torch.full_like(best, m + 1), torch.full_like(patience, MURTY_PATIENCE)
            (s, s_dual), n_hopeful = largest_systems(free), n_keep
        warm_start = None
    raise no_convergence(iters, len(rows), b)


def largest_systems(free: Tensor) -> tuple[int, int]:
    """The largest primal (``|F|``) and dual (``|A|``) systems over the rows (one sync)."""
    n_free = free.sum(dim=1)
    largest = torch.stack([n_free.amax(), free.shape[1] - n_free.amin()]).tolist()
    return int(largest[0]), int(largest[1])


class Dual:
    """The dual systems (see :class:`._common.Inverse`) of the pivoting steps: ``H`` is computed
    on first use (one sync), and used while trusted."""

    def __init__(self, M: Tensor, Q: Tensor, P: Tensor | None) -> None:
        self.M, self.Q, self.P = M, Q, P
        self.inverse: Inverse | None = None
        self.H_low: Tensor | None = None  # H in the low dtype, made on first use

    def usable(self) -> bool:
        if self.inverse is None:
            self.inverse = Inverse(self.M, self.P)
            self.P = self.inverse.rhs(self.Q)
        return bool(self.inverse.trusted)

    def solve(
        self, rows: Tensor, free: Tensor, use_low: bool, low: Tensor, chunk_bytes: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """As :func:`solve_free`, for the rows ``rows`` of the problem."""
        assert self.inverse is not None and self.P is not None
        H, P = self.inverse.H, self.P[rows]
        if use_low and self.H_low is None:
            self.H_low = H.to(low_dtype(H.dtype))
        H_low = self.H_low if use_low else None
        z, failed, failed_low, cond = solve_free(H, H_low, P, ~free, low, chunk_bytes)
        x, cond = self.inverse.candidate(P, z, free, cond)
        return x, failed, failed_low, cond


def active_set(
    M: Tensor, Q: Tensor, x: Tensor, tol: float, max_iter: int, chunk_bytes: int
) -> Tensor:
    """The active-set method (:mod:`.active_set`) on rows of LCP(``Q``, ``M``), from the
    feasible ``x``, with this path's batched solves."""
    eps = torch.finfo(M.dtype).eps

    def solve_passive(rows: Tensor, passive: Tensor) -> tuple[Tensor, Tensor]:
        no_low = torch.zeros_like(passive[:, 0])
        z, failed, _, cond = solve_free(M, None, Q[rows], passive, no_low, chunk_bytes)
        if bool(failed.any()):
            raise _not_pd()
        return z, torch.clamp(eps * cond, min=tol).unsqueeze(1)

    def arange(n: int) -> Tensor:
        return torch.arange(n, device=Q.device)

    X, left = _active_set(solve_passive, torch.matmul, arange, M, Q, x, max_iter, torch)
    if bool(left.any()):
        raise no_convergence(max_iter, int(left.sum()), Q.shape[0])
    out: Tensor = X
    return out


def solve_free(
    M: Tensor, M_low: Tensor | None, Q: Tensor, free: Tensor, low: Tensor, max_chunk_bytes: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x`` with ``x_F = −M_FF⁻¹ q_F``, ``x_A = 0`` per row (free set ``F``).

    Rows flagged ``low`` are factorised with ``M_low`` (float32) and refined with ``M``:
    ``x += M_FF⁻¹(−q_F − (M x)_F)``. Also returns per row whether the Cholesky factorisation
    failed (in ``M``'s dtype; in float32) and ``(max Lᵢᵢ / min Lᵢᵢ)²``, a cheap lower estimate
    of the condition number of ``M_FF``. Rows are sorted by ``|F|`` and chunked; in a chunk each
    row's free indices come first, padded to the chunk's largest ``|F|`` with indices of an
    identity block appended to ``M``: one batched Cholesky per chunk.
    """
    b, m = Q.shape
    low = low & (M_low is not None)
    x = torch.zeros_like(Q)
    failed, cond = torch.zeros_like(low), torch.ones_like(Q[:, 0])
    counts = free.sum(dim=1)
    key = torch.where(counts > 0, counts + (m + 1) * low, 0)  # float32 rows first, F = ∅ last
    perm = torch.argsort(key, descending=True)
    sizes, flags = torch.stack([counts[perm], low[perm].long()]).tolist()  # one sync
    s = max(sizes, default=0)
    if s == 0:
        return x, failed, failed.clone(), cond
    extended = {}
    for mat in (M, M_low) if any(flags) else (M,):
        assert mat is not None
        extended[mat.dtype] = identity_padded(mat, s)
    order = torch.argsort((~free).to(torch.int8), dim=1, stable=True)[:, :s]  # free first
    position = torch.arange(s, device=Q.device)
    start = 0
    while start < b and sizes[start] > 0:  # rows with F = ∅ keep x = 0
        end = start + max(1, max_chunk_bytes // (sizes[start] * sizes[start] * 8))
        end = start + flags[start:end].count(flags[start])  # one precision per chunk
        rows, sc, use_low = perm[start:end], sizes[start], bool(flags[start])
        start = end
        flat_M = extended[M_low.dtype if use_low and M_low is not None else M.dtype]
        idx = torch.where(
            position[:sc] < counts[rows].unsqueeze(1), order[rows, :sc], m + position[:sc]
        )
        block = gather_blocks(flat_M, idx)
        factor, info = torch.linalg.cholesky_ex(block.mT)  # symmetric: column-major view
        diag = factor.diagonal(dim1=1, dim2=2).abs()
        q_ext = torch.nn.functional.pad(Q[rows], (0, s))
        sol = chol_solve(factor, -q_ext.gather(1, idx).to(block.dtype)).to(Q.dtype)
        x_rows = torch.zeros(rows.numel(), m + s, device=Q.device, dtype=Q.dtype)
        x_rows.scatter_(1, idx, sol)
        for _ in range(REFINE_STEPS if use_low else 0):
            residual = -q_ext - torch.nn.functional.pad(x_rows[:, :m] @ M, (0, s))
            sol = sol + chol_solve(factor, residual.gather(1, idx).to(block.dtype)).to(Q.dtype)
            x_rows.scatter_(1, idx, sol)
        x[rows], failed[rows] = x_rows[:, :m], info != 0
        cond[rows] = (diag.amax(1) / diag.amin(1)).square().to(Q.dtype)
    cond = cond.nan_to_num(nan=1.0, posinf=1.0)
    return x, failed & ~low, failed & low, cond
