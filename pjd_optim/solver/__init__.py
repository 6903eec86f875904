r"""The solver of UPGrad's dual-cone projections (and of MGDA's LCP), in one unit.

For a symmetric positive definite ``G`` (``[m, m]``) and rows ``u`` of ``lower`` (``[k, m]``)::

    v = argmin_v  vᵀ G v   subject to  v ≥ u.

With ``x = v − u`` and ``q = G u`` this is the linear complementarity problem LCP(q, G)::

    x ≥ 0,   y = G x + q ≥ 0,   xᵀ y = 0          (KKT: v ≥ u, G v ≥ 0, (v − u) ⊙ G v = 0)

All ``k`` rows share ``G`` and are solved together, after a Jacobi scaling (unit diagonal). Every
path is exact: it returns rows whose KKT conditions hold to a tolerance set by the dtype and the
conditioning of the free blocks, or raises. :func:`plan` picks the path (or
``SolverOptions(path=...)`` forces one):

- ``"daqp"`` (float64, ``m ≤ DAQP_MAX_M``, on the host): each row's active set from DAQP, a
  compiled single-threaded QP solver (:mod:`.compiled`); answers verified per row against the
  KKT conditions; rows that fail go on to the NumPy loop from DAQP's active sets.
- ``"numpy"`` (float64, ``m ≤ NUMPY_MAX_M``, on the host): block pivoting in NumPy
  (:mod:`.numpy_path`), for its low per-operation overhead, then the active-set method for
  rows that stall; problems it declines go to the pivoting path.
- ``"pivoting"`` (the CPU otherwise): block pivoting in torch, warm-started by FISTA, with
  Murty's backup and a monotone active-set method for stalling rows (:mod:`.pivoting`;
  host-synchronising).
- ``"lockstep"`` (accelerators, ``m > host_max_m``; smaller problems are copied to the host):
  at most ``2 + checks`` host synchronisations, whatever the number of iterations
  (:mod:`.lockstep`); its unfinished rows, if any, the pivoting path finishes.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from . import compiled, numpy_path, pivoting
from . import lockstep as lockstep_path
from ._common import (
    DAQP_MAX_M,
    HOST_PATHS,
    NUMPY_MAX_M,
    PATHS,
    SolverOptions,
    low_dtype,
    sign_guess_close,
)
from .first_order import fista, free_guess, max_eigenvalue

__all__ = ["SolverOptions", "plan", "project_dual_cone", "project_on_host", "solve_lcp"]

_DEFAULT = SolverOptions()
Array = NDArray[np.float64]


def project_dual_cone(
    gramian: Tensor, lower: Tensor, options: SolverOptions | None = None
) -> Tensor:
    r"""Row-wise minimiser of ``vᵀ G v`` subject to ``v ≥ u``, for every row ``u`` of ``lower``.

    ``v`` holds the weights of the projection of ``Jᵀu`` onto the dual cone of the rows of ``J``
    when ``G = J Jᵀ`` (Proposition 1 of arXiv:2406.16232). ``gramian``: ``[m, m]`` symmetric
    positive definite (already normalised and regularised); ``lower``: ``[k, m]``. Returns
    ``V`` (``[k, m]``, ``V ≥ lower``) on ``gramian``'s device, in ``gramian``'s dtype.
    """
    options = options or _DEFAULT
    _check_shapes(gramian, lower, "lower")
    k, m = lower.shape
    path = plan(gramian.device, options.dtype, m, options)
    if path in HOST_PATHS and k and m:  # all in NumPy: a microsecond per operation
        G_np = gramian.detach().to("cpu", options.dtype).numpy()
        U_np = lower.detach().to("cpu", options.dtype).numpy()
        V = project_on_host(G_np, U_np, path, options)
        return torch.from_numpy(V).to(gramian.device, gramian.dtype, non_blocking=True)
    G = gramian.detach().to(options.dtype)
    U = lower.detach().to(device=gramian.device, dtype=options.dtype)
    X = _solve(G, U @ G, -U, options)
    return (U + X).to(gramian.dtype)


def solve_lcp(matrix: Tensor, q: Tensor, options: SolverOptions | None = None) -> Tensor:
    r"""Solve LCP(q, M) row-wise: ``x ≥ 0``, ``M x + q ≥ 0``, ``xᵀ(M x + q) = 0``.

    Equivalently ``x = argmin_{x ≥ 0} ½ xᵀ M x + qᵀ x``. ``matrix`` (``[m, m]``) must be
    symmetric positive definite, ``q`` is ``[k, m]``; computes in ``matrix``'s dtype and device.
    Returns ``[k, m]``, exactly zero on active sets.
    """
    _check_shapes(matrix, q, "q")
    return _solve(matrix.detach(), q.detach().to(matrix.dtype), None, options or _DEFAULT)


def plan(device: torch.device, dtype: torch.dtype, m: int, options: SolverOptions) -> str:
    """The path of a problem of size ``m`` in ``dtype`` on ``device``: ``options.path`` if set
    (the host paths, ``"daqp"`` and ``"numpy"``, compute in float64 only: other dtypes take the
    pivoting path), else by the measured crossovers of :mod:`._common` (docs/solver.md)."""
    host = device.type == "cpu" or m <= options.host_max_m
    path = options.path
    if path is None:
        if not host:
            return "lockstep"
        path = "daqp" if m <= DAQP_MAX_M else "numpy"
        path = path if m <= NUMPY_MAX_M else "pivoting"
    if path not in PATHS:
        raise ValueError(f"Unknown solver path {path!r}; expected one of {PATHS}.")
    if path in HOST_PATHS and dtype != torch.float64:
        return "pivoting"
    return path


def _solve(M: Tensor, Q: Tensor, P: Tensor | None, options: SolverOptions) -> Tensor:
    """Run the planned path. The host paths on an accelerator's problem copy it to the host
    (one copy each way); rows they leave unsolved finish on the pivoting path."""
    k, m = Q.shape
    if k == 0 or m == 0:
        return torch.zeros_like(Q)
    device = M.device
    path = plan(device, M.dtype, m, options)
    if path == "lockstep" or path == "pivoting":
        return _scaled(M, Q, P, options, lockstep=path == "lockstep")
    P_np = None if P is None else P.cpu().numpy()
    X = _on_host(M.cpu().numpy(), Q.cpu().numpy(), P_np, path, options)
    return torch.from_numpy(X).to(device, non_blocking=True)


def project_on_host(G: Array, U: Array, path: str, options: SolverOptions) -> Array:
    """:func:`project_dual_cone` on float64 host arrays by a host path (``"daqp"`` or
    ``"numpy"``, see :func:`plan`); the weightings call it directly on small CPU problems, where
    each torch operation would cost more than the solve."""
    # (the unconstrained minimiser is −U; a large U @ G goes to torch, see numpy_path._matmul)
    return U + _on_host(G, numpy_path._matmul(U, G), -U, path, options)


def _on_host(M: Array, Q: Array, P: Array | None, path: str, options: SolverOptions) -> Array:
    """A host path (``"daqp"`` or ``"numpy"``) on float64 arrays; the rows it leaves unsolved
    (declined: large systems, ill-conditioning; unfinished) finish on the pivoting path."""
    tol, iters = options.tolerance(torch.float64), options.iterations(M.shape[0])
    host = compiled.solve if path == "daqp" else numpy_path.solve
    X, unsolved = host(M, Q, P, tol, iters)
    if unsolved.any():
        left = unsolved.nonzero()[0]
        P_left = None if P is None else torch.from_numpy(P[left])
        M_t, Q_left = torch.from_numpy(M), torch.from_numpy(Q[left])
        X_left = _scaled(M_t, Q_left, P_left, options, lockstep=False, conflicts=True)
        X[left] = X_left.numpy()
    return X


def _scaled(
    M: Tensor,
    Q: Tensor,
    P: Tensor | None,
    options: SolverOptions,
    lockstep: bool,
    conflicts: bool = False,
) -> Tensor:
    """The torch paths after a Jacobi scaling ``M̃ = DMD``, ``q̃ = Dq``, ``x = Dx̃``
    (``D = diag(M)^-½``). ``conflicts``: every row of ``Q`` is known to have a conflict."""
    diag = M.diagonal()
    d = torch.where(diag > 0, diag.rsqrt(), 1.0)
    M, Q = M * d.unsqueeze(1) * d.unsqueeze(0), Q * d
    P = None if P is None else P / d
    if lockstep:
        lam = max_eigenvalue(M)
        X, done, n_left = lockstep_path.solve(M, Q, P, lam, options)
        if n_left:  # rows the lock-step path could not finish: the exact pivoting path
            left = (~done).nonzero().squeeze(1)
            X[left] = _pivot(M, Q[left], None if P is None else P[left], options, lam)
        return X * d
    if conflicts:
        return _pivot(M, Q, P, options) * d
    # Only rows with a conflict (some q_j < 0) have x ≠ 0.
    tol = options.tolerance(M.dtype)
    rows = (Q + tol * Q.abs().amax(dim=1, keepdim=True) < 0).any(dim=1).nonzero().squeeze(1)
    X = torch.zeros_like(Q)
    if rows.numel():
        X[rows] = _pivot(M, Q[rows], None if P is None else P[rows], options)
    return X * d


def _pivot(
    M: Tensor, Q: Tensor, P: Tensor | None, options: SolverOptions, lam: Tensor | None = None
) -> Tensor:
    """The pivoting path on rows ``Q`` (all with a conflict). It starts from the sign guess (free
    where ``q < 0``) when that leaves at most a quarter of the indices active in every row (the
    dual systems are then small, and the guess is often right: UPGrad on real Gramians), else
    from the free sets FISTA identifies (also when the sign guess proves far off)."""
    lam_ = max_eigenvalue(M) if lam is None else lam
    m = Q.shape[1]
    low = low_dtype(M.dtype)
    iters = options.warm_start(m, lockstep=False)

    def warm_start(Q: Tensor) -> tuple[Tensor, Tensor]:
        x = fista(M.to(low), Q.to(low), lam_.to(low), iters, freeze_every=20).to(M.dtype)
        return free_guess(M, Q, x, lam_), x

    guess = Q < 0
    if options.warm_start_iter is None and sign_guess_close(int((m - guess.sum(dim=1)).amax()), m):
        x_start = torch.zeros_like(Q)
        return pivoting.solve(M, Q, P, guess, x_start, lam_, options, warm_start)
    free, x_start = warm_start(Q)
    return pivoting.solve(M, Q, P, free, x_start, lam_, options)


def _check_shapes(matrix: Tensor, rows: Tensor, name: str) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"The gramian must be a square [m, m] matrix, got {tuple(matrix.shape)}.")
    if rows.ndim != 2 or rows.shape[1] != matrix.shape[0]:
        raise ValueError(
            f"`{name}` must have shape [k, {matrix.shape[0]}], got {tuple(rows.shape)}."
        )
    if not (matrix.is_floating_point() and rows.is_floating_point()):
        raise ValueError("The gramian and the bounds must be floating-point tensors.")
