r"""Batched exact solver for the dual-cone projection QPs of UPGrad.

For a symmetric positive definite ``G`` (``[m, m]``) and rows ``u`` of ``lower`` (``[k, m]``)::

    v = argmin_v  vᵀ G v   subject to  v ≥ u.

With ``x = v − u`` and ``q = G u`` this is the linear complementarity problem LCP(q, G)::

    x ≥ 0,   y = G x + q ≥ 0,   xᵀ y = 0          (KKT: v ≥ u, G v ≥ 0, (v − u) ⊙ G v = 0)

For a partition of the indices into a free set F (``y_F = 0``) and an active set A (``x_A = 0``)
the candidate is ``x_F = −G_FF⁻¹ q_F``, ``y_A = G_AF x_F + q_A``. Block principal pivoting
(Júdice & Pires 1994; Kim & Park 2011) swaps every infeasible index (``x_F < 0`` or ``y_A < 0``)
between F and A; when the number of infeasible indices has not decreased for ``3`` consecutive
steps it falls back to Murty's single pivot (swap only the largest infeasible index), which
terminates finitely for any P-matrix, hence for positive definite ``G``.

All ``k`` problems share ``G`` and are solved together: rows with ``q ≥ 0`` (no conflict) are
answered by ``x = 0`` after one matrix product; the others are warm-started by a few projected
accelerated-gradient (FISTA) steps, and every pivoting step solves all remaining rows at once
with a batched Cholesky factorisation of their free blocks (gathered and padded to the largest
free set, chunked to bound memory). Rows are dropped as soon as they satisfy the KKT conditions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["project_dual_cone", "solve_lcp"]

_MURTY_PATIENCE = 3  # full exchanges allowed without progress before Murty's single pivot


def project_dual_cone(
    gramian: Tensor,
    lower: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    warm_start_iter: int = 200,
    max_iter: int | None = None,
    rtol: float | None = None,
    max_chunk_bytes: int = 1 << 28,
) -> Tensor:
    r"""Row-wise minimiser of ``vᵀ G v`` subject to ``v ≥ u``, for every row ``u`` of ``lower``.

    ``v`` is the weight vector of the projection of ``Jᵀu`` onto the dual cone of the rows of
    ``J`` where ``G = J Jᵀ`` (Proposition 1 of arXiv:2406.16232).

    Args:
        gramian: ``[m, m]`` symmetric positive definite matrix (already normalised/regularised).
        lower: ``[k, m]`` lower bounds, one problem per row.
        dtype: computation dtype (``float64`` by default, ``float32`` is faster but looser).
        warm_start_iter: FISTA iterations used to guess the active sets.
        max_iter: bound on pivoting steps (default ``100 + 10 m``); exceeding it raises.
        rtol: relative feasibility tolerance (default ``1e4 · eps(dtype)``).
        max_chunk_bytes: memory bound for the batched ``[chunk, s, s]`` free-set systems.

    Returns:
        ``[k, m]`` tensor ``V`` with ``V ≥ lower``, on ``gramian``'s device and dtype.
    """
    _check_shapes(gramian, lower, "lower")
    G = gramian.detach().to(dtype)
    U = lower.detach().to(device=gramian.device, dtype=dtype)
    X = solve_lcp(
        G,
        U @ G,  # rows of (G U^T)^T = U G, G symmetric
        warm_start_iter=warm_start_iter,
        max_iter=max_iter,
        rtol=rtol,
        max_chunk_bytes=max_chunk_bytes,
    )
    return (U + X).to(gramian.dtype)


def solve_lcp(
    matrix: Tensor,
    q: Tensor,
    *,
    warm_start_iter: int = 200,
    max_iter: int | None = None,
    rtol: float | None = None,
    max_chunk_bytes: int = 1 << 28,
) -> Tensor:
    r"""Solve LCP(q, M) row-wise: ``x ≥ 0``, ``M x + q ≥ 0``, ``xᵀ(M x + q) = 0``.

    ``matrix`` (``M``, ``[m, m]``) must be symmetric positive definite; ``q`` is ``[k, m]``.
    Equivalently ``x = argmin_{x ≥ 0} ½ xᵀ M x + qᵀ x``. Computes in ``matrix``'s dtype and
    device; returns ``[k, m]`` with exact zeros on the active set.
    """
    _check_shapes(matrix, q, "q")
    k, m = q.shape
    X = torch.zeros_like(q, dtype=matrix.dtype, device=matrix.device)
    if k == 0 or m == 0:
        return X
    # Jacobi scaling M̃ = DMD, q̃ = Dq, x = Dx̃ with D = diag(M)^(-1/2): unit diagonal.
    diag = matrix.detach().diagonal()
    d = torch.where(diag > 0, diag.rsqrt(), 1.0)
    M = matrix.detach() * d.unsqueeze(1) * d.unsqueeze(0)
    Q = q.detach().to(M.dtype) * d
    tol = (1e4 * torch.finfo(M.dtype).eps) if rtol is None else rtol
    iters = (100 + 10 * m) if max_iter is None else max_iter

    # Rows with q ≥ 0 are solved by x = 0; keep the others (one host sync).
    q_scale = Q.abs().amax(dim=1, keepdim=True)
    conflict = (Q < -tol * q_scale).any(dim=1)
    rows = conflict.nonzero().squeeze(1)
    b = rows.numel()
    if b == 0:
        return X
    Qc = Q.index_select(0, rows)
    q_scale = q_scale.index_select(0, rows)
    free = _warm_start(M, Qc, warm_start_iter)

    best = torch.full((b,), m + 1, device=M.device, dtype=torch.long)
    patience = torch.full((b,), _MURTY_PATIENCE, device=M.device, dtype=torch.long)
    position = torch.arange(1, m + 1, device=M.device)
    s = int(free.sum(dim=1).amax())
    for _ in range(iters):
        x, failed = _solve_free(M, Qc, free, s, max_chunk_bytes)
        y = x @ M + Qc  # rows of (M x + q), M symmetric
        bound = -tol * (x.abs().amax(dim=1, keepdim=True) + q_scale)
        infeasible = torch.where(free, x < bound, y < bound)
        n_infeasible = infeasible.sum(dim=1)
        done = n_infeasible == 0
        X.index_copy_(0, rows, torch.where(done.unsqueeze(1), x.clamp_min(0.0) * d, 0.0))

        # Block pivoting with Murty's backup rule, vectorised over rows.
        better = n_infeasible < best
        best = torch.minimum(best, n_infeasible)
        full = better | (patience > 0)
        patience = torch.where(better, _MURTY_PATIENCE, torch.where(full, patience - 1, patience))
        last = (infeasible * position).argmax(dim=1, keepdim=True)
        single = torch.zeros_like(infeasible).scatter_(1, last, True)
        free = free ^ torch.where(full.unsqueeze(1), infeasible, single & infeasible)

        keep_count = (~done).sum()
        next_s = torch.where(done.unsqueeze(1), False, free).sum(dim=1).amax()
        n_keep, s, n_failed = torch.stack([keep_count, next_s, failed]).tolist()  # the one sync
        if n_failed:
            raise ValueError(
                "The matrix is not numerically positive definite (a Cholesky factorisation "
                "failed); regularise it, e.g. with reg_eps > 0."
            )
        if n_keep == 0:
            return X
        if n_keep < b:
            keep = torch.argsort(done.to(torch.int8), stable=True)[:n_keep]
            rows, Qc, free, q_scale = rows[keep], Qc[keep], free[keep], q_scale[keep]
            best, patience = best[keep], patience[keep]
            b = n_keep
    raise RuntimeError(
        f"Dual-cone projection did not converge in {iters} pivoting steps for {b} of {k} rows; "
        "the matrix is probably not positive definite or badly conditioned."
    )


def _check_shapes(matrix: Tensor, rows: Tensor, name: str) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"The gramian must be a square [m, m] matrix, got {tuple(matrix.shape)}.")
    if rows.ndim != 2 or rows.shape[1] != matrix.shape[0]:
        raise ValueError(
            f"`{name}` must have shape [k, {matrix.shape[0]}], got {tuple(rows.shape)}."
        )
    if not (matrix.is_floating_point() and rows.is_floating_point()):
        raise ValueError("The gramian and the bounds must be floating-point tensors.")


def _warm_start(M: Tensor, Q: Tensor, max_iter: int, check: int = 20) -> Tensor:
    """Free-set guesses from FISTA (adaptive restart) on ½xᵀMx + qᵀx, x ≥ 0.

    The guess is the identification rule of a projected-gradient step, ``x_j − y_j / L > 0``.
    Every ``check`` iterations the rows whose guess did not change are frozen (dropped).
    """
    guess = Q < 0
    if max_iter <= 0:
        return guess
    L = _lipschitz(M)
    rows = torch.arange(Q.shape[0], device=Q.device)
    Qr = Q
    x = torch.zeros_like(Q)
    z = x
    t = torch.ones(Q.shape[0], 1, device=Q.device, dtype=Q.dtype)
    done = 0
    while done < max_iter:
        for _ in range(min(check, max_iter - done)):
            x_new = (z - (z @ M + Qr) / L).clamp_min(0.0)
            t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
            step = x_new - x
            restart = ((z - x_new) * step).sum(dim=1, keepdim=True) > 0
            t_new = torch.where(restart, 1.0, t_new)
            z = x_new + torch.where(restart, 0.0, (t - 1.0) / t_new) * step
            x, t = x_new, t_new
        done += check
        new_guess = (x - (x @ M + Qr) / L) > 0
        moving = (new_guess != guess.index_select(0, rows)).any(dim=1)
        guess.index_copy_(0, rows, new_guess)
        n_moving = int(moving.sum())  # one sync per `check` iterations
        if n_moving == 0:
            break
        if n_moving < rows.numel():
            keep = torch.argsort((~moving).to(torch.int8), stable=True)[:n_moving]
            rows, Qr, x, z, t = rows[keep], Qr[keep], x[keep], z[keep], t[keep]
    return guess


def _lipschitz(M: Tensor, n_iter: int = 16) -> Tensor:
    """Estimate of λ_max(M) (power iteration, with margin, capped by ‖M‖_F); a device scalar."""
    m = M.shape[0]
    v = 1.0 + 0.1 * torch.sin(torch.arange(m, device=M.device, dtype=M.dtype))
    for _ in range(n_iter):
        v = M @ v
        v = v / v.norm().clamp_min(torch.finfo(M.dtype).tiny)
    rayleigh = v @ (M @ v)
    frobenius = torch.linalg.matrix_norm(M)
    return torch.minimum(1.25 * rayleigh, frobenius).clamp_min(torch.finfo(M.dtype).tiny)


def _solve_free(
    M: Tensor, Q: Tensor, free: Tensor, s: int, max_chunk_bytes: int
) -> tuple[Tensor, Tensor]:
    """x with x_F = −M_FF⁻¹ q_F and x_A = 0 for each row's free set F; also a failure flag.

    Each row's free indices are gathered first and padded to ``s`` with identity rows, so the
    systems are ``[b, s, s]`` and are factorised with a batched Cholesky, ``chunk`` rows at a time.
    """
    b, m = Q.shape
    x = torch.zeros_like(Q)
    failed = torch.zeros((), device=Q.device, dtype=torch.long)
    if s == 0:
        return x, failed
    order = torch.argsort((~free).to(torch.int8), dim=1, stable=True)[:, :s]  # free first
    valid = torch.arange(s, device=Q.device) < free.sum(dim=1, keepdim=True)
    eye = torch.eye(s, device=Q.device, dtype=torch.bool)
    chunk = max(1, min(b, max_chunk_bytes // (s * s * Q.element_size() * 3)))
    for start in range(0, b, chunk):
        idx = order[start : start + chunk]
        ok = valid[start : start + chunk]
        block = M[idx.unsqueeze(2), idx.unsqueeze(1)]
        pair = ok.unsqueeze(2) & ok.unsqueeze(1)
        block = torch.where(pair, block, eye.to(block.dtype))
        rhs = torch.where(ok, -Q[start : start + chunk].gather(1, idx), 0.0).unsqueeze(2)
        factor, info = torch.linalg.cholesky_ex(block)
        sol = torch.cholesky_solve(rhs, factor).squeeze(2)
        x[start : start + chunk].scatter_(1, idx, torch.where(ok, sol, 0.0))
        failed = failed + (info != 0).sum()
    return x, failed
