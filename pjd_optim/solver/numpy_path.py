r"""The NumPy path of the solver, for small float64 problems on the CPU.

Solves the same rows of LCP(q, M) as the pivoting path (``M`` Jacobi-scaled, symmetric positive
definite) by block principal pivoting; rows that stall stop there (no Murty step inside the
block loop) and finish as described below. A NumPy operation costs about a
microsecond, a torch operator 5–10 µs: small problems are dominated by that overhead.

Each step solves, for every remaining row, the system of its free set F. ``m ≤ 32``: one
batched ``[b, m, m]`` primal system ``M_FF x_F = −q_F``, the other indices masked to identity.
Larger ``m``: the smaller of the primal system and the dual one on the active set A
(``H_AA z_A = −p_A`` with ``H = M⁻¹``, ``p = −Hq``, then ``x = p + H_{:A} z_A``), gathered and
padded; UPGrad's conflicting rows usually keep most indices free, so the dual systems are tiny.
Dual feasibility is always checked on ``y = Mx + q`` computed from ``M``.

Block pivoting converges in a few steps on most rows but can stall on rank-deficient Gramians.
For ``m ≤ 32`` the rows that stop improving (or are left after nine steps) take single principal
pivots on their tableaux (:func:`principal_pivoting`: tens of microseconds of NumPy per pivot,
all rows at once), whose free sets one more step solves and verifies. Rows still unsolved finish
with the active-set method (:mod:`.active_set`); problems this path declines (large systems,
ill-conditioning) go to the pivoting path whole.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from . import compiled
from ._common import BPP_STEPS, MAX_KAPPA, MURTY_PATIENCE, Inverse
from .active_set import active_set

Array = NDArray[np.float64]
Mask = NDArray[np.bool_]

_DENSE_MAX_M = 32  # up to this m, masked [b, m, m] systems beat gathering blocks
_PIVOTS_PER_INDEX = 4  # budget of single principal pivots (small problems), per index
_DENSE_STEPS = 9  # block-pivoting steps (small m) before the rows left pivot singly
_LAPACK_MAX_M = 96  # OpenBLAS factorises single-threaded below m·n = 10⁴
_MAX_BLOCK = 48  # larger gathered systems (UPGrad rows without a clear majority) go to torch


# NumPy for the elementwise work (about a microsecond per operation) and for BLAS/LAPACK calls
# small enough to stay in the calling thread; torch for the larger ones: a threaded OpenBLAS call
# from NumPy starts OpenBLAS's own thread pool, whose spinning threads slow torch's next kernels
# down several-fold on a few cores (measured: 2x on a whole training step), and limiting it would
# change a process-wide setting. OpenBLAS runs a GEMM single-threaded up to m·n·k = 2^18.
_SMALL_GEMM = 1 << 17


def _matmul(a: Array, b: Array) -> Array:
    if a.shape[-2] * a.shape[-1] * b.shape[-1] <= _SMALL_GEMM:
        small: Array = a @ b
        return small
    out: Array = torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    return out


def _batched_solve(A: Array, B: Array) -> Array:
    if A.shape[-1] <= _DENSE_MAX_M:  # unblocked LAPACK: single-threaded
        small: Array = np.linalg.solve(A, B).astype(np.float64, copy=False)
        return small
    out: Array = torch.linalg.solve(torch.from_numpy(A), torch.from_numpy(B)).numpy()
    return out


def solve(
    M: Array, Q: Array, P: Array | None, tol: float, max_iter: int, start: Mask | None = None
) -> tuple[Array, Mask]:
    """Rows ``x ≥ 0``, ``Mx + q ≥ 0``, ``xᵀ(Mx + q) = 0`` of ``Q`` (``[k, m]``); ``M`` SPD.

    ``P`` (optional) is ``−M⁻¹Q`` if known exactly (UPGrad: ``−U``). Jacobi-scales the problem
    (unit diagonal) and solves the rows with a conflict (some ``q_j < 0``; the others have
    ``x = 0``). Returns ``X`` and the mask of rows left unsolved (their ``X`` rows are zero):
    all conflicting rows if ``M`` is not numerically positive definite, too ill-conditioned or
    its systems too large for this path. At most ``max_iter`` steps (pivoting, then the
    active-set method), as the pivoting path. ``start``: the first active sets (default: the
    sign guess ``q_j ≥ 0``; :mod:`.compiled` passes DAQP's, which the first step polishes).
    """
    diag = M.diagonal()
    d = 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0))
    M, Q = M * d[:, None] * d, Q * d
    q_scale = np.abs(Q).max(axis=1, keepdims=True)
    rows = (Q + tol * q_scale < 0).any(axis=1).nonzero()[0]
    X = np.zeros_like(Q)
    unsolved = np.zeros(Q.shape[0], dtype=bool)
    if rows.size:
        P = None if P is None else P[rows] / d
        active = Q[rows] >= 0 if start is None else start[rows]
        X_rows, unsolved[rows] = _conflicting(M, Q[rows], P, tol, max_iter, active)
        X[rows] = X_rows * d
    return X, unsolved


def _conflicting(
    M: Array, Q: Array, P: Array | None, tol: float, max_iter: int, active: Mask
) -> tuple[Array, Mask]:
    """:func:`solve` on Jacobi-scaled ``M`` (unit diagonal) and rows that all conflict, from
    the active sets ``active``."""
    b, m = Q.shape
    X = np.zeros((b, m))
    unsolved = np.ones(b, dtype=bool)
    n_active = active.sum(axis=1)
    if m > _DENSE_MAX_M and min(n_active.max(), m - n_active.min()) > _MAX_BLOCK:
        return X, unsolved  # large systems: the batched torch solver is faster
    try:
        system = _Systems(M)
    except np.linalg.LinAlgError:  # not numerically positive definite, or ill-conditioned
        return X, unsolved
    if not system.kappa <= MAX_KAPPA:
        return X, unsolved
    eps = float(np.finfo(np.float64).eps)
    rel = max(tol, 10 * eps * system.kappa)  # round-off bound of x and y, relative to scale
    q_scale = np.abs(Q).max(axis=1, keepdims=True)
    P = None if system.dense else -_matmul(Q, system.H) if P is None else P
    steps = min(max_iter, BPP_STEPS, _DENSE_STEPS if system.dense else BPP_STEPS)
    # Block pivoting from the given active sets (the first step polishes DAQP's exactly).
    pivoting = _BlockPivoting(system, Q, P, q_scale, rel)
    done, x_done, left, x_left = pivoting.run(np.arange(b), active, steps)
    X[done], unsolved[done] = x_done, False
    if left.size and system.dense:  # stalled rows: single principal pivots, one verifying step
        guess = principal_pivoting(M, Q[left], rel * q_scale[left], _PIVOTS_PER_INDEX * m)
        done, x_done, left, x_left = pivoting.run(left, ~guess, 1)
        X[done], unsolved[done] = x_done, False
    if left.size:  # the monotone active-set method, from where the rows stopped

        def solve_passive(index: NDArray[np.int_], passive: Mask) -> tuple[Array, float]:
            picked = left[index]
            return system.solve(Q[picked], None if P is None else P[picked], ~passive), rel

        X_left, not_done = active_set(
            solve_passive, _matmul, np.arange, M, Q[left], x_left, max_iter - steps, np
        )
        X[left] = X_left
        unsolved[left] = not_done
    return X, unsolved


class _BlockPivoting:
    """Block principal pivoting of rows of one problem; a row stops after ``MURTY_PATIENCE``
    steps without fewer infeasible indices (the name of the patience, not Murty's rule here)."""

    def __init__(self, system: _Systems, Q: Array, P: Array | None, q_scale: Array, rel: float):
        self.system, self.Q, self.P, self.q_scale, self.rel = system, Q, P, q_scale, rel

    def run(
        self, rows: NDArray[np.int_], active: Mask, steps: int
    ) -> tuple[NDArray[np.int_], Array, NDArray[np.int_], Array]:
        """From active sets ``active`` of ``rows``, at most ``steps`` steps. Returns the rows
        solved and their ``x``, and the rows that stalled (no fewer infeasible indices for
        ``MURTY_PATIENCE`` steps, or out of steps) with a feasible ``x ≥ 0`` to resume from."""
        system, Q, P, M = self.system, self.Q, self.P, self.system.M
        b = rows.size
        best, patience = np.full(b, M.shape[0] + 1), np.full(b, MURTY_PATIENCE)
        solved, stalled = [rows[:0]], [rows[:0]]
        x_solved, x_stalled = [Q[:0]], [Q[:0]]
        for step in range(steps):
            x = system.solve(Q[rows], None if P is None else P[rows], active)
            bound = (np.abs(x).max(axis=1, keepdims=True) + self.q_scale[rows]) * self.rel
            infeasible = np.where(active, _matmul(x, M) + Q[rows], x) < -bound
            n_infeasible = infeasible.sum(axis=1)
            patience = np.where(n_infeasible < best, MURTY_PATIENCE, patience - 1)
            best = np.minimum(best, n_infeasible)
            done = n_infeasible == 0
            stop = ~done & ((patience <= 0) | (step == steps - 1))
            solved.append(rows[done])
            x_solved.append(x[done].clip(min=0.0))
            stalled.append(rows[stop])
            x_stalled.append(x[stop].clip(min=0.0))
            keep = ~(done | stop)
            if not keep.any():
                break
            rows, best, patience = rows[keep], best[keep], patience[keep]
            active = active[keep] ^ infeasible[keep]
        cat = np.concatenate
        return cat(solved), cat(x_solved), cat(stalled), cat(x_stalled)


def principal_pivoting(M: Array, Q: Array, bound: Array, max_pivots: int) -> Mask:
    """The free sets of rows of LCP(``Q``, ``M``) by single principal pivots, every row in
    lock-step (small ``m``: its ``[b, m, m]`` tableaux are cheap).

    Each row keeps the tableau ``r = q̂ + M̂ z`` of its basis (basic ``r``: ``y_A`` and ``x_F``;
    non-basic ``z``: ``x_A`` and ``y_F``; at first ``r = y``, ``M̂ = M``, ``q̂ = q``). A pivot
    swaps a negative basic variable ``r_j`` with ``z_j`` (``p = M̂_jj > 0``: principal pivot
    transforms of an SPD matrix are P-matrices)::

        q̂_j ← −q̂_j/p,   q̂_i ← q̂_i − M̂_ij q̂_j/p,   M̂_ik ← M̂_ik − M̂_ij M̂_jk/p,
        M̂_ij ← M̂_ij/p,  M̂_jk ← −M̂_jk/p,  M̂_jj ← 1/p                   (i, k ≠ j).

    The most negative ``r_j`` first; after ``m`` pivots a row takes the least such index
    (Murty's rule, finite for P-matrices). Stops when every ``q̂ ≥ −bound`` (the basis solves
    the row) or after ``max_pivots``. Only the free sets are returned: the caller solves and
    verifies them, in the precision of a direct solve.
    """
    b, m = Q.shape
    T = np.zeros((b, m + 1, m + 1))  # index m: a decoupled dummy; pivoting on it is a no-op
    T[:, :m, :m] = M
    T[:, m, m] = 1.0
    q = np.zeros((b, m + 1))
    q[:, :m] = Q
    free = np.zeros((b, m + 1), dtype=bool)
    rows, limit = np.arange(b), -bound
    for pivot in range(max_pivots):
        negative = q < limit
        live = negative.any(axis=1)
        if not live.any():
            break
        j = negative.argmax(axis=1) if pivot >= m else q.argmin(axis=1)
        j = np.where(live, j, m)  # rows already solved pivot on the dummy
        qj = np.where(live, q[rows, j], 0.0)
        inv = 1.0 / T[rows, j, j]
        col, row = T[rows, :, j] * inv[:, None], T[rows, j, :]
        T -= col[:, :, None] * row[:, None, :]
        q -= col * qj[:, None]
        T[rows, j, :], T[rows, :, j], T[rows, j, j] = -row * inv[:, None], col, inv
        q[rows, j] = -qj * inv
        free[rows, j] ^= True
    return free[:, :m]


class _Systems:
    """Batched solves of the per-row systems of a free set F (``x_A = 0``, ``(Mx + q)_F = 0``).

    Dense (small ``m``): primal, masked ``[b, m, m]`` systems, ``κ`` estimated by the Cholesky
    factor of ``M``. Else the smaller of the primal ``M_FF`` and dual ``H_AA`` systems, gathered
    and padded with identity rows; ``κ`` is the exact 1-norm condition number.
    """

    def __init__(self, M: Array) -> None:
        m = M.shape[0]
        self.M = M
        self.dense = m <= _DENSE_MAX_M
        if self.dense:
            L = np.linalg.cholesky(M)  # unblocked LAPACK, single-threaded (raises LinAlgError)
            self.eye = np.eye(m, dtype=bool)
            self.kappa = compiled.condition_estimate(L)
            return
        if m <= _LAPACK_MAX_M:  # NumPy's LAPACK: single-threaded at this size
            np.linalg.cholesky(M)  # raises LinAlgError if not positive definite
            H = np.linalg.inv(M)
            self.H = 0.5 * (H + H.T)
            self.kappa = float(np.abs(M).sum(axis=0).max() * np.abs(self.H).sum(axis=0).max())
        else:
            inverse = Inverse(torch.from_numpy(M), None)
            self.H, self.kappa = inverse.H.numpy(), float(inverse.kappa)
        if not self.kappa <= MAX_KAPPA:
            raise np.linalg.LinAlgError("κ₁ above MAX_KAPPA: the explicit inverse is not trusted")
        self.M_pad = np.zeros((m + 1, m + 1))  # padded copies: index m is a zero row/column
        self.M_pad[:m, :m] = M
        self.H_pad = np.zeros((m + 1, m + 1))
        self.H_pad[:m, :m] = self.H

    def solve(self, Q: Array, P: Array | None, active: Mask) -> Array:
        """``x`` with ``x_A = 0`` and ``(Mx + q)_F = 0``, per row (``P = −QH``, unused if dense)."""
        if self.dense:
            free = ~active
            blocks = np.where(free[:, :, None] & free[:, None, :], self.M, self.eye)
            return _batched_solve(blocks, np.where(free, -Q, 0.0)[:, :, None])[:, :, 0]
        assert P is not None
        n_active = active.sum(axis=1)
        m = Q.shape[1]
        if int(n_active.max()) <= m - int(n_active.min()):  # the smaller largest system
            x = P + _matmul(self._gathered_solve(self.H_pad, -P, active, n_active), self.H)
        else:
            x = self._gathered_solve(self.M_pad, -Q, ~active, m - n_active)
        x[active] = 0.0
        return x

    @staticmethod
    def _gathered_solve(K_pad: Array, R: Array, sel: Mask, counts: NDArray[np.int_]) -> Array:
        """Per row, ``z`` with ``K_SS z_S = R_S`` on the selected set S, zero elsewhere."""
        b, m = R.shape
        s = int(counts.max())
        if s == 0:
            return np.zeros_like(R)
        row, col = sel.nonzero()  # row by row, each row's indices in order
        slot = np.arange(row.size) - np.repeat(np.cumsum(counts) - counts, counts)
        idx = np.full((b, s), m)  # each row's selected indices, padded with index m
        idx[row, slot] = col
        blocks = K_pad.ravel().take(idx[:, :, None] * (m + 1) + idx[:, None, :])
        blocks.reshape(b, s * s)[:, :: s + 1] += idx == m  # identity on the padding
        rhs = np.zeros((b, s))
        rhs[row, slot] = R[row, col]
        z = _batched_solve(blocks, rhs[:, :, None])[:, :, 0]
        out = np.zeros((b, m))
        out[row, col] = z[row, slot]
        return out
