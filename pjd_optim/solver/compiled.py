r"""The DAQP path of small float64 problems on the host: each row by DAQP, a compiled dual
active-set QP solver (Arnström, Bemporad & Axehill 2022; PyPI ``daqp``), one row at a time.

DAQP's answer is accurate to its tolerances only, so each row is verified against the KKT
conditions (stationarity included) to the exact loop's bound; rows that fail go on to the
pivoting loop (:mod:`.pivoting`) from DAQP's active sets, whose first step solves their free
systems exactly (the polish). DAQP is single-threaded C (no OpenMP), a few microseconds per row
at ``m = 16``: small problems stay steady on a busy CPU.

Each row of LCP(q, M) is the QP ``min ½xᵀMx + qᵀx`` s.t. ``x ≥ 0``; ``M`` is factorised once
per call (:meth:`daqp.Model.setup` or ``update``), and each row changes only ``q`` (scaled to
unit largest entry, so DAQP's absolute tolerances are relative ones).
"""

from __future__ import annotations

import threading
from typing import Any

import daqp  # type: ignore[import-not-found, unused-ignore]  # stubs: typings/daqp
import numpy as np
import torch
from numpy.typing import NDArray

from . import pivoting
from ._common import MAX_KAPPA, SolverOptions

Array = NDArray[np.float64]
Mask = NDArray[np.bool_]

# DAQP's tolerances on rows scaled to unit largest |q| (defaults: primal 1e-6, dual 1e-12): a
# constraint violated by more than PRIMAL_TOL is still added, so the active set is the exact one
# on well-conditioned rows (measured: all 2304 rows of bench_weighting's Gramians, m = 16–96,
# three kinds, three seeds, verify without fallback).
PRIMAL_TOL = 1e-10
_cache = threading.local()  # this thread's DAQP model (see _model)
# NumPy for small GEMMs (a microsecond), torch for larger ones: a threaded OpenBLAS call from
# NumPy starts OpenBLAS's own thread pool, whose spinning threads slow torch's next kernels
# down several-fold on a few cores (measured: 2x on a whole training step), and limiting it
# would change a process-wide setting. OpenBLAS runs a GEMM single-threaded up to m·n·k = 2^18.
_SMALL_GEMM = 1 << 17


def matmul(a: Array, b: Array) -> Array:
    """``a @ b`` in the calling thread: NumPy if small, else torch (see ``_SMALL_GEMM``)."""
    if a.shape[-2] * a.shape[-1] * b.shape[-1] <= _SMALL_GEMM:
        small: Array = a @ b
        return small
    out: Array = torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    return out


def solve(M: Array, Q: Array, P: Array | None, options: SolverOptions) -> Array:
    """Rows ``x ≥ 0``, ``Mx + q ≥ 0``, ``xᵀ(Mx + q) = 0`` of ``Q`` (``[k, m]``, ``M`` SPD; ``P``:
    ``−M⁻¹Q`` if known), by DAQP's answers where they verify (:func:`_rows`); the other rows go
    to the pivoting loop from DAQP's active sets (its first step polishes them exactly), and
    problems DAQP cannot take (not positive definite, ``κ > MAX_KAPPA``) to it whole."""
    diag = M.diagonal()
    if not (diag > 0).all():
        return pivoting.solve_on_host(M, Q, P, options)
    d = 1.0 / np.sqrt(diag)
    Ms, Qs = M * d[:, None] * d, Q * d  # Jacobi scaling: unit diagonal
    try:
        L = np.linalg.cholesky(Ms)  # unblocked LAPACK at this size: single-threaded
    except np.linalg.LinAlgError:
        return pivoting.solve_on_host(M, Q, P, options)
    kappa = condition_estimate(L)
    if not kappa <= MAX_KAPPA:
        return pivoting.solve_on_host(M, Q, P, options)
    tol = options.tolerance(torch.float64)
    rel = max(tol, 10 * float(np.finfo(np.float64).eps) * kappa)  # as the pivoting loop's
    q_scale = np.abs(Qs).max(axis=1, keepdims=True)
    X = np.zeros_like(Q)
    rows = (Qs + tol * q_scale < 0).any(axis=1).nonzero()[0]  # the others have x = 0
    if rows.size == 0:
        return X
    x, active, verified = _rows(Ms, Qs[rows], q_scale[rows], rel)
    X[rows] = x * d
    left = rows[~verified]
    if left.size:
        P_left = None if P is None else P[left]
        X[left] = pivoting.solve_on_host(M, Q[left], P_left, options, active[~verified])
    return X


def condition_estimate(L: NDArray[np.floating[Any]]) -> float:
    """``(max Lᵢᵢ / min Lᵢᵢ)²`` from the Cholesky factor ``L`` of ``M``: a lower estimate of
    κ₂(M) (each ``Lᵢᵢ²`` is a diagonal entry of a Schur complement, between λ_min and λ_max)."""
    diag = L.diagonal()
    return float((diag.max() / diag.min()) ** 2)


def _rows(M: Array, Q: Array, q_scale: Array, rel: float) -> tuple[Array, Mask, Mask]:
    """Rows of LCP(``Q``, ``M``) by DAQP (``M``: SPD, unit diagonal; every row conflicts;
    ``q_scale``: each row's largest ``|q|``, ``[b, 1]``). Returns ``x`` (zero on the active
    sets), the active sets, and the rows *verified*: ``x_F ≥ 0``, ``|y_F| ≈ 0``, ``y_A ≥ 0`` for
    ``y = Mx + q``, each to ``rel`` times the row's scale (the exact paths' bound)."""
    b, m = Q.shape
    F = Q / q_scale  # unit largest |q| per row: DAQP's absolute tolerances become relative
    model = _model(M, F[0])
    xs, lams = [np.zeros(m)] * b, [F[0]] * b  # failed rows: x = 0 and the sign guess
    solved = np.zeros(b, dtype=bool)
    for r in range(b):
        if model is None:
            break
        if r:
            model.update(f=F[r])
        x_r, _, flag, info = model.solve()
        if flag >= 1:
            xs[r], lams[r] = x_r, info["lam"]
            solved[r] = True
    x, lam = np.stack(xs), np.stack(lams)
    active = np.where(solved[:, None], lam != 0.0, Q >= 0)
    x = np.where(active, 0.0, x * q_scale)
    y = matmul(x, M) + Q  # (in torch where large: OpenBLAS threads would spin)
    bound = (np.abs(x).max(axis=1, keepdims=True) + q_scale) * rel
    wrong = np.where(active, y < -bound, (x < -bound) | (np.abs(y) > bound))
    return x.clip(min=0.0), active, solved & ~wrong.any(axis=1)


def _model(M: Array, q: Array) -> daqp.Model | None:
    """A DAQP model of ``min ½xᵀMx + qᵀx`` s.t. ``x ≥ 0`` (``None``: its setup failed, e.g.
    ``M`` not numerically positive definite: the exact path decides). One model per thread is
    kept for the last ``m`` (a new one's setup costs 12 µs at ``m = 16``, an update 3 µs); the
    update resets its working set (``sense``), so answers never depend on earlier calls."""
    m = M.shape[0]
    M = np.ascontiguousarray(M)
    model: daqp.Model | None = getattr(_cache, "model", None)
    if model is not None and _cache.m == m:
        if model.update(H=M, f=q, sense=np.zeros(m, dtype=np.int32)) >= 0:
            return model
        _cache.model = None  # a failed update leaves no usable factorisation
        return None
    model = daqp.Model()
    model.settings = {"primal_tol": PRIMAL_TOL, "eps_prox": 0.0, "iter_limit": 100 + 10 * m}
    flag, _ = model.setup(M, q, np.zeros((0, m)), np.full(m, np.inf), np.zeros(m))
    if flag < 0:
        return None
    _cache.model, _cache.m = model, m
    return model
