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

All ``k`` problems share ``G`` and are solved together, after a Jacobi scaling (unit diagonal):
rows with ``q ≥ 0`` (no conflict) get ``x = 0`` after one matrix product; the others are
warm-started by FISTA (float32, rows frozen once their active set stops moving), then every
pivoting step solves all remaining rows at once with a batched Cholesky factorisation of their
free blocks (gathered, padded to the largest free set with identity rows, chunked to bound
memory). Large blocks are factorised in float32 and refined to float64 accuracy; a row whose
refinement does not reach the tolerance is redone in float64. Converged rows are dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_dual_cone", "solve_lcp"]

_MURTY_PATIENCE = 3  # full exchanges allowed without progress before Murty's single pivot
_MIXED_MIN_SIZE = 160  # free-set size from which float32 factorisation + refinement pays off
_REFINE_STEPS = 3


def project_dual_cone(
    gramian: Tensor,
    lower: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    warm_start_iter: int = 200,
    max_iter: int | None = None,
    rtol: float | None = None,
    mixed_precision: bool | None = None,
    max_chunk_bytes: int | None = None,
) -> Tensor:
    r"""Row-wise minimiser of ``vᵀ G v`` subject to ``v ≥ u``, for every row ``u`` of ``lower``.

    ``v`` holds the weights of the projection of ``Jᵀu`` onto the dual cone of the rows of ``J``
    when ``G = J Jᵀ`` (Proposition 1 of arXiv:2406.16232).

    Args:
        gramian: ``[m, m]`` symmetric positive definite matrix (already normalised/regularised).
        lower: ``[k, m]`` lower bounds ``u``, one problem per row.
        dtype: computation dtype (``float64`` by default; ``float32`` is faster but looser).
        warm_start_iter: maximum number of FISTA iterations used to guess the active sets.
        max_iter: bound on pivoting steps (default ``100 + 10 m``); exceeding it raises.
        rtol: relative KKT tolerance (default ``1e4 · eps(dtype)``).
        mixed_precision: factorise large float64 blocks in float32 and refine (default: auto).
        max_chunk_bytes: memory bound of one batch of ``[chunk, s, s]`` systems.

    Returns:
        ``V`` (``[k, m]``, ``V ≥ lower``) on ``gramian``'s device, in ``gramian``'s dtype.
    """
    _check_shapes(gramian, lower, "lower")
    G = gramian.detach().to(dtype)
    U = lower.detach().to(device=gramian.device, dtype=dtype)
    X = solve_lcp(
        G,
        U @ G,  # rows of (G Uᵀ)ᵀ, G symmetric
        warm_start_iter=warm_start_iter,
        max_iter=max_iter,
        rtol=rtol,
        mixed_precision=mixed_precision,
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
    mixed_precision: bool | None = None,
    max_chunk_bytes: int | None = None,
) -> Tensor:
    r"""Solve LCP(q, M) row-wise: ``x ≥ 0``, ``M x + q ≥ 0``, ``xᵀ(M x + q) = 0``.

    Equivalently ``x = argmin_{x ≥ 0} ½ xᵀ M x + qᵀ x``. ``matrix`` (``[m, m]``) must be
    symmetric positive definite, ``q`` is ``[k, m]``; computes in ``matrix``'s dtype and device.
    Options as in :func:`project_dual_cone`. Returns ``[k, m]``, exactly zero on active sets.
    """
    _check_shapes(matrix, q, "q")
    k, m = q.shape
    X = torch.zeros(k, m, dtype=matrix.dtype, device=matrix.device)
    if k == 0 or m == 0:
        return X
    # Jacobi scaling M̃ = DMD, q̃ = Dq, x = Dx̃ with D = diag(M)^(-1/2).
    diag = matrix.detach().diagonal()
    d = torch.where(diag > 0, diag.rsqrt(), 1.0)
    M = matrix.detach() * d.unsqueeze(1) * d.unsqueeze(0)
    Q = q.detach().to(M.dtype) * d
    tol = (1e4 * torch.finfo(M.dtype).eps) if rtol is None else rtol
    iters = (100 + 10 * m) if max_iter is None else max_iter
    if max_chunk_bytes is None:  # CPU: stay below glibc's mmap threshold (32 MiB)
        max_chunk_bytes = 1 << (24 if M.device.type == "cpu" else 28)
    low = torch.float32 if M.dtype == torch.float64 else M.dtype
    M_low = M.to(low)

    # Rows with q ≥ 0 are solved by x = 0; keep the others (one host sync).
    q_scale = Q.abs().amax(dim=1, keepdim=True)
    rows = (Q + tol * q_scale < 0).any(dim=1).nonzero().squeeze(1)
    b = rows.numel()
    if b == 0:
        return X
    Qc = Q.index_select(0, rows)
    q_scale = q_scale.index_select(0, rows)
    lam = _max_eigenvalue(M_low)
    free = _warm_start(M_low, Qc.to(low), lam, warm_start_iter)
    res_tol = tol * lam.to(M.dtype).clamp_min(1.0)

    best = torch.full((b,), m + 1, device=M.device, dtype=torch.long)
    patience = torch.full((b,), _MURTY_PATIENCE, device=M.device, dtype=torch.long)
    precise = torch.zeros(b, device=M.device, dtype=torch.bool)
    position = torch.arange(1, m + 1, device=M.device)
    s, n_precise = int(free.sum(dim=1).amax()), 0
    for _ in range(iters):
        mixed = low != M.dtype and (
            s >= _MIXED_MIN_SIZE if mixed_precision is None else mixed_precision
        )
        if not mixed:
            x, failed = _solve_free(M, None, Qc, free, s, max_chunk_bytes)
        else:  # float32 factorisation for rows not yet flagged `precise`, float64 for the others
            order = torch.argsort(precise.to(torch.int8), stable=True)
            x = torch.empty_like(Qc)
            n_low = b - n_precise
            x_low, failed = _solve_free(
                M_low, M, Qc[order[:n_low]], free[order[:n_low]], s, max_chunk_bytes
            )
            x_hi, failed_hi = _solve_free(
                M, None, Qc[order[n_low:]], free[order[n_low:]], s, max_chunk_bytes
            )
            x[order] = torch.cat([x_low, x_hi])
            failed = failed + failed_hi
        y = x @ M + Qc  # rows of (M x + q), M symmetric
        scale = x.abs().amax(dim=1, keepdim=True) + q_scale
        infeasible = torch.where(free, x < -tol * scale, y < -tol * scale)
        # In mixed precision, a row whose refinement fell short is not pivoted but redone in
        # float64 (rows are flagged at most once, so this cannot loop).
        inexact = ~precise & (free & (y.abs() > res_tol * scale)).any(dim=1) if mixed else None
        if inexact is not None:
            precise = precise | inexact
            infeasible = infeasible & ~inexact.unsqueeze(1)
        n_infeasible = infeasible.sum(dim=1)
        done = n_infeasible == 0 if inexact is None else (n_infeasible == 0) & ~inexact
        X.index_copy_(0, rows, torch.where(done.unsqueeze(1), x.clamp_min(0.0) * d, 0.0))

        # Block pivoting with Murty's backup rule, vectorised over rows.
        better = n_infeasible < best if inexact is None else (n_infeasible < best) & ~inexact
        best = torch.where(better, n_infeasible, best)
        full = better | (patience > 0)
        hold = full if inexact is None else full & ~inexact
        patience = torch.where(better, _MURTY_PATIENCE, torch.where(hold, patience - 1, patience))
        last = (infeasible * position).argmax(dim=1, keepdim=True)
        single = torch.zeros_like(infeasible).scatter_(1, last, True) & infeasible
        free = free ^ torch.where(full.unsqueeze(1), infeasible, single)

        stats = [(~done).sum(), (free & ~done.unsqueeze(1)).sum(dim=1).amax(), failed]
        stats.append((precise & ~done).sum())
        n_keep, s, n_failed, n_precise = torch.stack(stats).tolist()  # the one sync per step
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
            best, patience, precise = best[keep], patience[keep], precise[keep]
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


def _max_eigenvalue(M: Tensor, n_iter: int = 16) -> Tensor:
    """Estimate of λ_max(M) (power iteration, with margin, capped by ‖M‖_F); a device scalar."""
    v = 1.0 + 0.1 * torch.sin(torch.arange(M.shape[0], device=M.device, dtype=M.dtype))
    for _ in range(n_iter):
        v = M @ v
        v = v / v.norm().clamp_min(torch.finfo(M.dtype).tiny)
    rayleigh = v @ (M @ v)
    frobenius = torch.linalg.matrix_norm(M)
    return torch.minimum(1.25 * rayleigh, frobenius).clamp_min(torch.finfo(M.dtype).tiny)


def _warm_start(M: Tensor, Q: Tensor, lam: Tensor, max_iter: int, check: int = 20) -> Tensor:
    """Free-set guesses from FISTA (adaptive restart) on ½xᵀMx + qᵀx, x ≥ 0, step 1/lam.

    The guess is the identification rule of a projected-gradient step, ``x_j − y_j / lam > 0``.
    Every ``check`` iterations the rows whose guess did not change are frozen (dropped).
    """
    guess = Q < 0
    rows = torch.arange(Q.shape[0], device=Q.device)
    x, z, g = torch.zeros_like(Q), torch.zeros_like(Q), torch.empty_like(Q)
    t = torch.ones(Q.shape[0], 1, device=Q.device, dtype=Q.dtype)
    inv = 1.0 / lam
    done = 0
    while done < max_iter:
        for _ in range(min(check, max_iter - done)):
            torch.matmul(z, M, out=g)
            g.add_(Q).mul_(inv)  # gradient step
            x_new = torch.sub(z, g).clamp_min_(0.0)
            g.copy_(x_new).sub_(x)  # g <- step x_new - x
            restart = ((z - x_new) * g).sum(dim=1, keepdim=True) > 0
            t_new = torch.where(restart, 1.0, 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t)))
            beta = torch.where(restart, 0.0, (t - 1.0) / t_new)
            torch.addcmul(x_new, beta, g, out=z)
            x, t = x_new, t_new
        done += check
        new_guess = (x - (x @ M + Q) * inv) > 0
        moving = (new_guess != guess.index_select(0, rows)).any(dim=1)
        guess.index_copy_(0, rows, new_guess)
        n_moving = int(moving.sum())  # one sync per `check` iterations
        if n_moving == 0:
            break
        if n_moving < rows.numel():
            keep = torch.argsort((~moving).to(torch.int8), stable=True)[:n_moving]
            rows, Q, x, z, t = rows[keep], Q[keep], x[keep], z[keep], t[keep]
            g = torch.empty_like(x)
    return guess


def _solve_free(
    M: Tensor, M_ref: Tensor | None, Q: Tensor, free: Tensor, s: int, max_chunk_bytes: int
) -> tuple[Tensor, Tensor]:
    """``x`` with ``x_F = −M_FF⁻¹ q_F``, ``x_A = 0`` per row (free set ``F``); and #failures.

    Each row's free indices come first, padded to ``s`` with indices of an identity block
    appended to ``M``, so the systems are ``[b, s, s]`` (batched Cholesky, chunk by chunk).
    With ``M_ref`` (higher precision), the solution is refined: ``x += M_FF⁻¹(−q_F − (M_ref x)_F)``.
    """
    b, m = Q.shape
    dtype = Q.dtype if M_ref is None else M_ref.dtype
    x = torch.zeros(b, m + s, device=Q.device, dtype=dtype)
    failed = torch.zeros((), device=Q.device, dtype=torch.long)
    if s == 0 or b == 0:
        return x[:, :m], failed
    M_ext = torch.zeros(m + s, m + s, device=M.device, dtype=M.dtype)
    M_ext[:m, :m] = M
    M_ext.diagonal()[m:] = 1.0
    Q_ext = torch.cat([Q, torch.zeros(b, s, device=Q.device, dtype=Q.dtype)], dim=1)
    position = torch.arange(s, device=Q.device)
    order = torch.argsort((~free).to(torch.int8), dim=1, stable=True)[:, :s]  # free first
    index = torch.where(position < free.sum(dim=1, keepdim=True), order, m + position)
    flat_M = M_ext.view(-1)
    chunk = max(1, min(b, max_chunk_bytes // (s * s * 8)))
    flat = torch.empty(chunk, s, s, device=Q.device, dtype=torch.long)
    for start in range(0, b, chunk):
        idx = index[start : start + chunk]
        c = idx.shape[0]
        q_ext = Q_ext[start : start + chunk]
        # Gather the [c, s, s] blocks through flat indices (much faster than 2-D indexing).
        torch.add((idx * (m + s)).unsqueeze(2), idx.unsqueeze(1), out=flat[:c])
        block = flat_M.index_select(0, flat[:c].view(-1)).view(c, s, s)
        factor, info = torch.linalg.cholesky_ex(block.mT)  # symmetric: column-major view
        failed = failed + (info != 0).sum()
        sol = _chol_solve(factor, -q_ext.gather(1, idx).to(M.dtype)).to(dtype)
        x_chunk = x[start : start + chunk]
        x_chunk.scatter_(1, idx, sol)
        if M_ref is not None:
            for _ in range(_REFINE_STEPS):
                residual = -q_ext - torch.nn.functional.pad(x_chunk[:, :m] @ M_ref, (0, s))
                sol = sol + _chol_solve(factor, residual.gather(1, idx).to(M.dtype)).to(dtype)
                x_chunk.scatter_(1, idx, sol)
    return x[:, :m], failed


def _chol_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``L Lᵀ z = rhs`` for a batch of lower Cholesky factors; ``rhs`` is ``[c, s]``."""
    z = torch.linalg.solve_triangular(factor, rhs.unsqueeze(2), upper=False)
    return torch.linalg.solve_triangular(factor.mT, z, upper=True).squeeze(2)
