r"""The solver of UPGrad's dual-cone projections (and of MGDA's LCP), in one unit.

For a symmetric positive definite ``G`` (``[m, m]``) and rows ``u`` of ``lower`` (``[k, m]``)::

    v = argmin_v  vᵀ G v   subject to  v ≥ u.

With ``x = v − u`` and ``q = G u`` this is the linear complementarity problem LCP(q, G)::

    x ≥ 0,   y = G x + q ≥ 0,   xᵀ y = 0          (KKT: v ≥ u, G v ≥ 0, (v − u) ⊙ G v = 0)

All ``k`` rows share ``G`` and are solved together, after a Jacobi scaling (unit diagonal), by
one algorithm: block principal pivoting with Murty's backup rule (:mod:`.pivoting`), whose
batched free-set solves are :mod:`.systems`. Every answer is exact: its KKT conditions hold to
a tolerance set by the dtype and the conditioning of the free blocks, or the solver raises.
:func:`plan` picks how it runs (``SolverOptions(path=...)`` forces one):

- ``"daqp"`` (float64, ``m ≤ DAQP_MAX_M``, on the host): each row's answer from DAQP, a
  compiled single-threaded QP solver (:mod:`.compiled`), verified per row against the KKT
  conditions; the rows that fail continue on the pivoting loop from DAQP's active sets;
- ``"pivoting"`` (the CPU otherwise): the loop, synchronising with the device at every step;
- ``"lockstep"`` (accelerators, ``m > host_max_m``; smaller problems are copied to the host):
  the same loop with at most ``2 + checks`` host synchronisations before the rows left, if
  any, continue one sync per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import compiled, pivoting
from ._common import DAQP_MAX_M, HOST_PATHS, PATHS, SolverOptions

__all__ = ["SolverOptions", "plan", "project_dual_cone", "solve_lcp"]

_DEFAULT = SolverOptions()


def project_dual_cone(
    gramian: Tensor, lower: Tensor, options: SolverOptions | None = None
) -> Tensor:
    r"""Row-wise minimiser of ``vᵀ G v`` subject to ``v ≥ u``, for every row ``u`` of ``lower``.

    ``v`` holds the weights of the projection of ``Jᵀu`` onto the dual cone of the rows of ``J``
    when ``G = J Jᵀ`` (Proposition 1 of arXiv:2406.16232). ``gramian``: ``[m, m]`` symmetric
    positive definite (already normalised and regularised; its symmetric part is used: one
    computed in low precision is symmetric to that precision only); ``lower``: ``[k, m]``. Returns
    ``V`` (``[k, m]``, ``V ≥ lower``) on ``gramian``'s device, in ``gramian``'s dtype.
    """
    options = options or _DEFAULT
    _check_shapes(gramian, lower, "lower")
    k, m = lower.shape
    path = plan(gramian.device, options.dtype, m, options)
    if path in HOST_PATHS and k and m:  # all in NumPy: a microsecond per operation
        G_np = gramian.detach().to("cpu", options.dtype).numpy()
        G_np = 0.5 * (G_np + G_np.T)
        U_np = lower.detach().to("cpu", options.dtype).numpy()
        # (the unconstrained minimiser is −U; compiled.matmul keeps U @ G in this thread)
        V = U_np + compiled.solve(G_np, compiled.matmul(U_np, G_np), -U_np, options)
        return torch.from_numpy(V).to(gramian.device, gramian.dtype, non_blocking=True)
    G = gramian.detach().to(options.dtype)
    G = 0.5 * (G + G.mT)
    U = lower.detach().to(device=gramian.device, dtype=options.dtype)
    X = pivoting.solve(G, U @ G, -U, options, lockstep=path == "lockstep")
    return (U + X).to(gramian.dtype)


def solve_lcp(matrix: Tensor, q: Tensor, options: SolverOptions | None = None) -> Tensor:
    r"""Solve LCP(q, M) row-wise: ``x ≥ 0``, ``M x + q ≥ 0``, ``xᵀ(M x + q) = 0``.

    Equivalently ``x = argmin_{x ≥ 0} ½ xᵀ M x + qᵀ x``. ``matrix`` (``[m, m]``) must be
    symmetric positive definite, ``q`` is ``[k, m]``; computes in ``matrix``'s dtype and device.
    Returns ``[k, m]``, exactly zero on active sets.
    """
    options = options or _DEFAULT
    _check_shapes(matrix, q, "q")
    M, Q = matrix.detach(), q.detach().to(matrix.dtype)
    path = plan(M.device, M.dtype, M.shape[0], options)
    if path in HOST_PATHS and Q.numel():
        X = compiled.solve(M.cpu().numpy(), Q.cpu().numpy(), None, options)
        return torch.from_numpy(X).to(M.device, non_blocking=True)
    return pivoting.solve(M, Q, None, options, lockstep=path == "lockstep")


def plan(device: torch.device, dtype: torch.dtype, m: int, options: SolverOptions) -> str:
    """How a problem of size ``m`` in ``dtype`` on ``device`` is solved: ``options.path`` if
    set (``"daqp"`` computes in float64 on the host only: other dtypes take ``"pivoting"``),
    else ``"daqp"`` up to ``DAQP_MAX_M`` on the host (accelerators' problems up to
    ``host_max_m`` are copied there), ``"pivoting"`` on the CPU and ``"lockstep"`` on
    accelerators."""
    host = device.type == "cpu" or m <= options.host_max_m
    path = options.path
    if path is None:
        path = "lockstep" if not host else "daqp" if m <= DAQP_MAX_M else "pivoting"
    if path not in PATHS:
        raise ValueError(f"Unknown solver path {path!r}; expected one of {PATHS}.")
    if path in HOST_PATHS and dtype != torch.float64:
        return "pivoting"
    return path


def _check_shapes(matrix: Tensor, rows: Tensor, name: str) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"The gramian must be a square [m, m] matrix, got {tuple(matrix.shape)}.")
    if rows.ndim != 2 or rows.shape[1] != matrix.shape[0]:
        raise ValueError(
            f"`{name}` must have shape [k, {matrix.shape[0]}], got {tuple(rows.shape)}."
        )
    if not (matrix.is_floating_point() and rows.is_floating_point()):
        raise ValueError("The gramian and the bounds must be floating-point tensors.")
