r"""The DAQP path of small float64 problems on the host: each row by DAQP, a compiled dual
active-set QP solver (Arnström, Bemporad & Axehill 2022; PyPI ``daqp``), one row at a time.

DAQP's answer is accurate to its tolerances only (about 1e-12), so each row is verified against
the KKT conditions (stationarity included) to the tolerance, or where it fails that, to the exact
loop's bound (the condition number is estimated only then); a row that fails takes one exact
solve on DAQP's free sets (the polish) and is verified again, and the rows that still fail go on
to the pivoting loop (:mod:`.pivoting`) from DAQP's active sets (at once where ``M`` is not
numerically positive definite or ``κ > MAX_KAPPA``). DAQP is single-threaded
C (no OpenMP), a few microseconds per row at ``m = 16``: small problems stay steady on a busy
CPU.

Each row of LCP(q, M) is the QP ``min ½xᵀMx + qᵀx`` s.t. ``x ≥ 0``; ``M`` is factorised once
per call (:meth:`daqp.Model.setup` or ``update``), and each row changes only ``q`` (scaled to
unit largest entry, so DAQP's absolute tolerances are relative ones).

:func:`upgrad` and :func:`dualproj` are the weightings' shortcut on small CPU problems: the same
rows, verification and fall-back as :func:`solve`, without forming ``Q = UM`` (UPGrad's rows of
``Q``, Jacobi-scaled to unit largest entry, are ``±`` rows of the scaled ``M``) nor ``V``.
"""

from __future__ import annotations

import threading
from typing import Any

import daqp  # type: ignore[import-not-found, unused-ignore]  # stubs: typings/daqp
import numpy as np
import torch
from numpy.typing import NDArray

from . import pivoting
from ._common import MAX_KAPPA, SolverOptions, not_finite

Array = NDArray[np.float64]
Mask = NDArray[np.bool_]
Index = NDArray[np.intp]

# DAQP's tolerances on rows scaled to unit largest |q| (defaults: primal 1e-6, dual 1e-12): a
# constraint violated by more than PRIMAL_TOL is still added, so the active set is the exact one
# on well-conditioned rows (measured: all 2304 rows of bench_weighting's Gramians, m = 16–96,
# three kinds, three seeds, verify without fallback).
PRIMAL_TOL = 1e-10
_EPS = float(np.finfo(np.float64).eps)
_NONE: Index = np.zeros(0, dtype=np.intp)  # no row
_cache = threading.local()  # this thread's DAQP model (see _model)
# OpenBLAS runs a GEMM in the calling thread up to m·n·k = 2^18, and factorises (getrf) in it
# below m·n = 10⁴; larger calls start its thread pool, whose spinning threads slow the next torch
# kernels down several-fold on a few cores (and on a busy machine, these calls themselves).
# Limiting its threads would change a process-wide setting: products are split into row blocks
# instead, and the DAQP path's batched solves (m ≤ 96) stay below the factorisation's bound.
_SMALL_GEMM = 1 << 18


def matmul(a: Array, b: Array) -> Array:
    """``a @ b`` in the calling thread (row blocks of at most ``_SMALL_GEMM`` multiply-adds)."""
    rows = max(1, _SMALL_GEMM // (a.shape[1] * b.shape[1]))
    if a.shape[0] <= rows:
        small: Array = a @ b
        return small
    return np.concatenate([a[i : i + rows] @ b for i in range(0, a.shape[0], rows)])


def solve(M: Array, Q: Array, P: Array | None, options: SolverOptions) -> Array:
    """Rows ``x ≥ 0``, ``Mx + q ≥ 0``, ``xᵀ(Mx + q) = 0`` of ``Q`` (``[k, m]``, ``M`` SPD; ``P``:
    ``−M⁻¹Q`` if known), by DAQP's answers where they verify (:func:`_rows`); the other rows go
    to the pivoting loop from DAQP's active sets (its first step polishes them exactly), and
    problems with a diagonal entry not positive to it whole."""
    tol = options.tolerance(torch.float64)
    if not (np.isfinite(M).all() and np.isfinite(Q).all()):
        raise not_finite()
    scaled = _scaled(M, 0.0)
    if scaled is None:
        return pivoting.solve_on_host(M, Q, P, options)
    d, Ms = scaled
    Qs = Q * d
    q_scale = np.abs(Qs).max(axis=1, keepdims=True)
    X = np.zeros_like(Q)
    rows = (Qs + tol * q_scale < 0).any(axis=1).nonzero()[0]  # the others have x = 0
    if rows.size == 0:
        return X
    scale = q_scale[rows]
    x, free, bad = _rows(Ms, Qs[rows] / scale, tol)  # unit largest |q| per row
    X[rows] = x * scale * d
    if bad.size:
        left = rows[bad]
        P_left = None if P is None else P[left] / d
        X[left] = _exact(Ms, d, Qs[left], P_left, options, ~free[bad])
    return X


def upgrad(G: Array, shift: float, pref: Array, options: SolverOptions) -> Array | None:
    """UPGrad's weights ``Σᵢ vᵢ`` for ``M = G + shift·I`` and the rows ``uᵢ = pᵢeᵢ`` of
    ``U = diag(pref)``, by :func:`solve`'s rows, verification and fall-back (the weightings'
    ``G/tr(G) + reg·I`` is ``M/tr(G)`` with ``shift = reg·tr(G)``, and the weights do not change
    under a positive factor of ``M``). ``None`` where a diagonal entry is not positive: the
    caller then takes :func:`pjd_optim.solver.project_dual_cone`.

    Row ``i`` of ``Q = UM``, Jacobi-scaled, is ``(pᵢ/dᵢ) M̃ᵢ`` (``M̃ = DMD``, ``D = diag(d)``);
    for positive definite ``M``, ``|M̃ᵢⱼ| < 1 = M̃ᵢᵢ``, so at unit largest ``|q|`` it is
    ``sign(pᵢ) M̃ᵢ``, of scale ``|pᵢ|/dᵢ``; and ``Σᵢ vᵢ = p + Σᵢ xᵢ``."""
    tol = options.tolerance(torch.float64)
    scaled = _scaled(G, shift)
    if scaled is None:
        return None
    d, Ms = scaled
    positive = pref.min() > 0  # the usual case: F = M̃
    F = Ms if positive else Ms * np.sign(pref)[:, None]
    rows = (F.min(axis=1) < -tol).nonzero()[0]  # the others have x = 0
    if rows.size == 0:
        return pref.copy()
    every = rows.size == pref.size
    x, free, bad = _rows(Ms, F if every else F[rows], tol)
    scale = pref / d if positive else np.abs(pref) / d  # each row's largest |q̃|
    scale = scale if every else scale[rows]
    if bad.size == 0:
        return pref + d * (scale @ x)
    x[bad] = 0.0
    w = pref + d * (scale @ x)
    left = rows[bad]  # the exact loop, from DAQP's active sets: q̃ᵢ = (pᵢ/dᵢ) M̃ᵢ, p̃ᵢ = −(pᵢ/dᵢ) eᵢ
    u = pref[left] / d[left]
    P = np.zeros((left.size, pref.size))
    P[np.arange(left.size), left] = -u
    X = _exact(Ms, d, u[:, None] * Ms[left], P, options, ~free[bad])
    out: Array = w + X.sum(axis=0)
    return out


def dualproj(G: Array, shift: float, pref: Array, options: SolverOptions) -> Array | None:
    """DualProj's weights ``v`` (one row ``u = pref``) as :func:`upgrad`: ``q = Mp``, whose
    Jacobi scaling is ``M̃ D⁻¹p``."""
    tol = options.tolerance(torch.float64)
    scaled = _scaled(G, shift)
    if scaled is None:
        return None
    d, Ms = scaled
    q = Ms @ (pref / d)
    q_scale = float(np.abs(q).max())
    if not (q + tol * q_scale < 0).any():
        return pref.copy()
    x, free, bad = _rows(Ms, (q / q_scale)[None], tol)
    if bad.size == 0:
        v: Array = pref + x[0] * q_scale * d
        return v
    X = _exact(Ms, d, q[None], -(pref / d)[None], options, ~free)
    out: Array = pref + X[0]
    return out


def _exact(
    Ms: Array, d: Array, Qs: Array, Ps: Array | None, options: SolverOptions, active: Mask
) -> Array:
    """The rows DAQP's answers do not settle, on the pivoting loop from DAQP's active sets, in
    the Jacobi-scaled problem DAQP solved (``M̃ = DMD``, symmetric; ``q̃ = Dq``, ``p̃ = D⁻¹p``);
    returns their unscaled ``x = Dx̃``."""
    return pivoting.solve_on_host(Ms, Qs, Ps, options, active) * d


def _scaled(G: Array, shift: float) -> tuple[Array, Array] | None:
    """For ``M = G + shift·I``: ``d = diag(M)^-½`` and the Jacobi-scaled ``M̃ = DMD`` (its
    diagonal set to exactly 1), or ``None`` where a diagonal entry is not positive."""
    diag = G.diagonal() + shift if shift else G.diagonal()
    if not diag.min() > 0:
        return None
    d = diag**-0.5
    Ms = G * d
    Ms *= d[:, None]  # Jacobi scaling: unit diagonal
    Ms += Ms.T  # the symmetric part (a Gramian computed in float32 is symmetric to 1e-7 only)
    Ms *= 0.5
    np.fill_diagonal(Ms, 1.0)
    return d, Ms


def _bound(M: Array, tol: float) -> float | None:
    """The exact paths' round-off bound ``max(tol, 10·eps·κ)`` for the unit-diagonal ``M``, or
    ``None`` where DAQP's answers are not polished: ``M`` not numerically positive definite, or
    ``κ > MAX_KAPPA``. Computed only when a row fails the tightest bound ``tol``."""
    try:
        L = np.linalg.cholesky(M)  # unblocked LAPACK at this size: single-threaded
    except np.linalg.LinAlgError:
        return None
    kappa = condition_estimate(L)
    return max(tol, 10 * _EPS * kappa) if kappa <= MAX_KAPPA else None


def condition_estimate(L: NDArray[np.floating[Any]]) -> float:
    """``(max Lᵢᵢ / min Lᵢᵢ)²`` from the Cholesky factor ``L`` of ``M``: a lower estimate of
    κ₂(M) (each ``Lᵢᵢ²`` is a diagonal entry of a Schur complement, between λ_min and λ_max)."""
    diag = L.diagonal()
    return float((diag.max() / diag.min()) ** 2)


def _rows(M: Array, F: Array, tol: float) -> tuple[Array, Mask, Index]:
    """Rows of LCP(``F``, ``M``) by DAQP (``M``: SPD, unit diagonal; every row conflicts and
    has unit largest ``|f|``, so DAQP's absolute tolerances are relative ones). Returns ``x``
    (DAQP's, zero on its active sets and clipped at 0), the free sets (DAQP's; the sign guess
    where it failed) and the rows (indices) that fail verification, which checks ``x``:
    ``|y_F| ≈ 0`` and ``y_A ≥ 0`` for ``y = Mx + f``, each to the row's scale times ``tol``,
    or where a row fails that, the exact paths' bound (:func:`_bound`). Rows that fail it
    take one exact solve on DAQP's free sets (DAQP's own answers are accurate to about
    1e-12), verified again; where ``_bound`` declines, they go to the exact loop as they are."""
    model = _model(M, F[0])
    if model is None:  # every row to the exact loop, from the sign guess
        return np.zeros_like(F), F < 0, np.arange(F.shape[0])
    update, solve = model.update, model.solve
    xs, lams, failed = [], [], []
    for r, f in enumerate(F):
        if r:
            update(f=f)
        x_r, _, flag, info = solve()
        xs.append(x_r)
        lams.append(info["lam"])
        if flag < 1:
            failed.append(r)
    x, lam = np.array(xs), np.array(lams)
    if failed:  # x = 0 and the sign guess
        x[failed], lam[failed] = 0.0, F[failed] >= 0
    free = lam == 0.0
    x = np.where(free, x, 0.0)
    np.maximum(x, 0.0, out=x)  # the answer returned, whose KKT conditions are checked
    bad = _unverified(M, F, x, free, tol)
    rel = _bound(M, tol) if bad.size else tol
    if rel is not None and rel > tol:
        bad = bad[_unverified(M, F[bad], x[bad], free[bad], rel)]
    if failed:
        bad = np.union1d(bad, failed)
    if rel is None:
        return x, free, bad
    if bad.size:  # the polish: the exact solve on DAQP's free sets, verified again
        x[bad] = _free_solve(M, F[bad], free[bad]).clip(min=0.0)
        bad = bad[_unverified(M, F[bad], x[bad], free[bad], rel)]
    return x, free, bad


def _unverified(M: Array, F: Array, x: Array, free: Mask, rel: float) -> Index:
    """The rows (indices) whose ``x`` breaks ``|y_F| ≤ bound`` or ``y_A ≥ −bound``
    (``y = Mx + f``, ``bound = rel·(max x + 1)``, unit largest ``|f|``)."""
    y = matmul(x, M)
    y += F
    excess = np.negative(y)
    np.abs(y, out=excess, where=free)
    if excess.max() <= rel:  # within every row's bound (at least rel)
        return _NONE
    verified = excess.max(axis=1) <= (x.max(axis=1) + 1.0) * rel  # (False where NaN)
    unverified: Index = (~verified).nonzero()[0]
    return unverified


def _free_solve(M: Array, F: Array, free: Mask) -> Array:
    """Per row, ``x_F = −M_FF⁻¹ f_F`` and ``x_A = 0``: one batched solve of the ``[b, m, m]``
    blocks masked to the identity off ``F`` (in the calling thread, see ``_SMALL_GEMM``)."""
    blocks = np.where(free[:, :, None] & free[:, None, :], M, np.eye(M.shape[0]))
    x: Array = np.linalg.solve(blocks, np.where(free, -F, 0.0)[:, :, None])[:, :, 0]
    return x


def _model(M: Array, q: Array) -> daqp.Model | None:
    """A DAQP model of ``min ½xᵀMx + qᵀx`` s.t. ``x ≥ 0`` (``None``: its setup failed, e.g.
    ``M`` not numerically positive definite: the exact path decides). One model per thread is
    kept for the last ``m`` (a new one's setup costs 12 µs at ``m = 16``, an update 3 µs); the
    update resets its working set (``sense``), so answers never depend on earlier calls."""
    m = M.shape[0]
    M = np.ascontiguousarray(M)
    model: daqp.Model | None = getattr(_cache, "model", None)
    if model is not None and _cache.key == (m, PRIMAL_TOL):  # (its settings are kept)
        if model.update(H=M, f=q, sense=np.zeros(m, dtype=np.int32)) >= 0:
            return model
        _cache.model = None  # a failed update leaves no usable factorisation
        return None
    model = daqp.Model()
    model.settings = {"primal_tol": PRIMAL_TOL, "eps_prox": 0.0, "iter_limit": 100 + 10 * m}
    flag, _ = model.setup(M, q, np.zeros((0, m)), np.full(m, np.inf), np.zeros(m))
    if flag < 0:
        return None
    _cache.model, _cache.key = model, (m, PRIMAL_TOL)
    return model
