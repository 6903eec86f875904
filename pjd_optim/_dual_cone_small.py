r"""Lean NumPy float64 path of the dual-cone solver, for small problems on CPU.

Solves the same LCP(q, M) rows as :func:`~pjd_optim._dual_cone.solve_lcp` (``M`` symmetric
positive definite, Jacobi-scaled to a unit diagonal) with the same method: block principal
pivoting from the sign guess, then, for rows that stop making progress, a monotone
Lawson–Hanson-type active-set method. A NumPy operation costs about a microsecond, a torch
operator 5–10 µs: small problems are dominated by that overhead.

Each step solves, for every remaining row, the system of its free set F. ``m ≤ 32``: one
batched ``[b, m, m]`` primal system ``M_FF x_F = −q_F``, the other indices masked to identity.
Larger ``m``: the smaller of the primal system and the dual one on the active set A
(``H_AA z_A = −p_A`` with ``H = M⁻¹``, ``p = −Hq``, then ``x = p + H_{:A} z_A``), gathered and
padded; UPGrad's conflicting rows usually keep most indices free, so the dual systems are tiny.
Dual feasibility is always checked on ``y = Mx + q`` computed from ``M``. Rows left unsolved
(large systems, ill-conditioning, iteration budget) are returned to the caller (torch solver).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import ThreadpoolController

__all__ = ["solve_lcp_numpy"]

Array = NDArray[np.float64]
Mask = NDArray[np.bool_]

_DENSE_MAX_M = 32  # up to this m, masked [b, m, m] systems beat gathering blocks
_MAX_KAPPA = 1e7  # 1-norm condition number above which the explicit inverse is not trusted
_MAX_BLOCK = 48  # larger gathered systems (UPGrad rows without a clear majority) go to torch
_BPP_STEPS = 12  # pivoting steps before the remaining rows switch to the active-set method
_MURTY_PATIENCE = 3  # pivoting steps without progress before a row is called stalled


_P = ParamSpec("_P")
_R = TypeVar("_R")
_controller: list[ThreadpoolController] = []  # created at first use (it scans loaded libraries)


def _one_blas_thread(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn``'s BLAS/LAPACK calls in the calling thread. NumPy's OpenBLAS keeps a thread pool
    of its own beside torch's OpenMP one; on a few cores the two pools' spinning threads slowed
    torch's next kernels several-fold (measured: 2–4x on the MLP step). The problems here are
    too small for BLAS threads to help anyway."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not _controller:
            _controller.append(ThreadpoolController())
        with _controller[0].limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


@_one_blas_thread
def solve_lcp_numpy(
    M: Array, Q: Array, P: Array | None, rtol: float | None, max_iter: int
) -> tuple[Array, Mask]:
    """Rows ``x ≥ 0``, ``Mx + q ≥ 0``, ``xᵀ(Mx + q) = 0`` of ``Q`` (``[b, m]``); ``M`` SPD.

    ``P`` (optional) is ``−M⁻¹Q`` if known exactly (UPGrad: ``−U``). Returns ``X`` and the mask
    of rows left unsolved (their ``X`` rows are zero), all of them if ``M`` is not numerically
    positive definite, too ill-conditioned or its systems too large for this path. At most
    ``max_iter`` steps (pivoting, then the active-set method), as the torch solver.
    """
    b, m = Q.shape
    X = np.zeros((b, m))
    unsolved = np.zeros(b, dtype=bool)
    diag = M.diagonal()
    if not (diag > 0).all():
        return X, ~unsolved
    d = 1.0 / np.sqrt(diag)
    M = M * d[:, None] * d[None, :]
    Q = Q * d
    eps = float(np.finfo(np.float64).eps)
    tol = 100 * eps if rtol is None else rtol
    q_scale = np.abs(Q).max(axis=1, keepdims=True)
    conflict = (Q + tol * q_scale < 0).any(axis=1)  # the other rows (q ≥ 0) have x = 0
    if not conflict.any():
        return X, unsolved
    n_active = (Q[conflict] >= 0).sum(axis=1)  # sign guess, below
    if m > _DENSE_MAX_M and min(int(n_active.max()), m - int(n_active.min())) > _MAX_BLOCK:
        unsolved[conflict] = True  # large systems: the batched torch solver is faster
        return X, unsolved
    try:
        system = _Systems(M)
    except np.linalg.LinAlgError:  # not numerically positive definite
        return X, ~unsolved
    if not system.kappa <= _MAX_KAPPA:
        return X, ~unsolved
    rel = max(tol, 10 * eps * system.kappa)  # round-off bound of x and y, relative to scale
    rows = np.arange(b)
    if not conflict.all():
        rows = rows[conflict]
        Q, q_scale, P = Q[rows], q_scale[rows], None if P is None else P[rows]
    P = None if system.dense else -(Q @ system.H) if P is None else P / d
    active = Q >= 0  # sign guess: indices of non-conflicting rows stay at x = 0
    best = np.full(rows.size, m + 1)
    patience = np.full(rows.size, _MURTY_PATIENCE)
    x, step = X, 0
    for step in range(min(max_iter, _BPP_STEPS)):
        x = system.solve(Q, P, active)
        bound = (np.abs(x).max(axis=1, keepdims=True) + q_scale) * rel
        infeasible = np.where(active, x @ M + Q, x) < -bound
        n_infeasible = infeasible.sum(axis=1)
        done = n_infeasible == 0
        if done.any():
            X[rows[done]] = x[done].clip(min=0.0)
            if done.all():
                return X * d, unsolved
            keep = ~done
            rows, Q, q_scale, active = rows[keep], Q[keep], q_scale[keep], active[keep]
            x, infeasible, n_infeasible = x[keep], infeasible[keep], n_infeasible[keep]
            best, patience = best[keep], patience[keep]
            P = None if P is None else P[keep]
        if step >= _MURTY_PATIENCE - 1:  # block pivoting until a row stops making progress
            patience = np.where(n_infeasible < best, _MURTY_PATIENCE, patience - 1)
            stall = patience <= 0
            if stall.all():
                break
            infeasible &= ~stall[:, None]
        best = np.minimum(best, n_infeasible)
        active ^= infeasible
    # The rows left (stalled) finish with the monotone active-set method.
    X_rest, left = _primal_active_set(
        system, Q, P, x.clip(min=0.0), q_scale, rel, max(max_iter - step - 1, 0)
    )
    X[rows] = X_rest
    unsolved[rows[left]] = True
    return X * d, unsolved


def _primal_active_set(
    system: _Systems, Q: Array, P: Array | None, x: Array, q_scale: Array, rel: float, max_iter: int
) -> tuple[Array, Mask]:
    """Lawson–Hanson-type primal active-set method from a feasible ``x ≥ 0`` (monotone, finite).

    As the torch version: ``z`` minimises on the passive set; if ``z > 0`` take it and add the
    indices with ``y < 0`` (only the most negative once the objective stalls), else step towards
    ``z`` until a component vanishes and drop it. Returns ``X`` and the rows left unsolved.
    """
    b = Q.shape[0]
    out = np.zeros_like(Q)
    rows = np.arange(b)
    passive = x > 0
    single = np.zeros(b, dtype=bool)
    f_best = np.full(b, np.inf)
    index = np.arange(b)
    for _ in range(max_iter):
        z = system.solve(Q, P, ~passive)
        y = z @ system.M + Q
        bound = (np.abs(z).max(axis=1, keepdims=True) + q_scale) * rel
        interior = (~passive | (z > -bound)).all(axis=1)
        violated = ~passive & (y < -bound)
        done = interior & ~violated.any(axis=1)
        out[rows[done]] = z[done].clip(min=0.0)
        f = 0.5 * np.einsum("ij,ij->i", z, y + Q)
        single |= interior & ~(f < f_best)
        f_best = np.where(interior, f, f_best)
        most = np.zeros_like(passive)
        most[index[: rows.size], np.where(violated, y, 0.0).argmin(axis=1)] = True
        add = violated & (most | ~single[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(passive & (z <= -bound), x / (x - z), np.inf)
        alpha = ratio.min(axis=1, keepdims=True).clip(0.0, 1.0)
        blocking = np.zeros_like(passive)
        blocking[index[: rows.size], ratio.argmin(axis=1)] = True
        stepped = (x + alpha * (z - x)).clip(min=0.0)
        x = np.where(interior[:, None], z.clip(min=0.0), stepped)
        passive = np.where(interior[:, None], passive | add, passive & ~blocking & (stepped > 0))
        keep = ~done
        if not keep.any():
            return out, np.zeros(b, dtype=bool)
        rows, Q, x, passive, q_scale = rows[keep], Q[keep], x[keep], passive[keep], q_scale[keep]
        P = None if P is None else P[keep]
        single, f_best = single[keep], f_best[keep]
    left = np.zeros(b, dtype=bool)
    left[rows] = True
    return out, left


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
        L = np.linalg.cholesky(M)  # raises LinAlgError unless positive definite
        if self.dense:
            self.eye = np.eye(m, dtype=bool)
            self.kappa = float((L.diagonal().max() / L.diagonal().min()) ** 2)
            return
        H = np.linalg.inv(M)
        self.H = 0.5 * (H + H.T)
        self.kappa = float(np.abs(M).sum(axis=0).max() * np.abs(H).sum(axis=0).max())
        self.M_pad = np.zeros((m + 1, m + 1))  # padded copies: index m is a zero row/column
        self.M_pad[:m, :m] = M
        self.H_pad = np.zeros((m + 1, m + 1))
        self.H_pad[:m, :m] = self.H

    def solve(self, Q: Array, P: Array | None, active: Mask) -> Array:
        """``x`` with ``x_A = 0`` and ``(Mx + q)_F = 0``, per row (``P = −QH``, unused if dense)."""
        if self.dense:
            free = ~active
            blocks = np.where(free[:, :, None] & free[:, None, :], self.M, self.eye)
            return np.linalg.solve(blocks, np.where(free, -Q, 0.0)[:, :, None])[:, :, 0]
        assert P is not None
        n_active = active.sum(axis=1)
        m = Q.shape[1]
        if int(n_active.max()) <= m - int(n_active.min()):  # the smaller largest system
            x = P + self._gathered_solve(self.H_pad, -P, active, n_active) @ self.H
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
        order = np.argsort(~sel, axis=1, kind="stable")[:, :s]  # selected indices first
        pad = np.arange(s) >= counts[:, None]
        idx = np.where(pad, m, order)
        blocks = K_pad[idx[:, :, None], idx[:, None, :]]
        blocks[:, np.arange(s), np.arange(s)] += pad
        rhs = np.where(pad, 0.0, np.take_along_axis(R, order, axis=1))
        z = np.linalg.solve(blocks, rhs[:, :, None])[:, :, 0]
        out = np.zeros((b, m + 1))
        np.put_along_axis(out, idx, z, axis=1)
        return out[:, :m]
