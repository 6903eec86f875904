r"""Batched exact solver for the dual-cone projection QPs of UPGrad.

For a symmetric positive definite ``G`` (``[m, m]``) and rows ``u`` of ``lower`` (``[k, m]``)::

    v = argmin_v  vᵀ G v   subject to  v ≥ u.

With ``x = v − u`` and ``q = G u`` this is the linear complementarity problem LCP(q, G)::

    x ≥ 0,   y = G x + q ≥ 0,   xᵀ y = 0          (KKT: v ≥ u, G v ≥ 0, (v − u) ⊙ G v = 0)

For a partition of the indices into a free set F (``y_F = 0``) and an active set A (``x_A = 0``)
the candidate is ``x_F = −G_FF⁻¹ q_F``, ``y_A = G_AF x_F + q_A``. Block principal pivoting
(Júdice & Pires 1994; Kim & Park 2011) swaps every infeasible index (``x_F < 0`` or ``y_A < 0``)
between F and A; when the number of infeasible indices has not decreased for 3 consecutive
steps it uses Murty's single pivot (swap the largest infeasible index), finite for positive
definite ``G``. Murty's paths can be very long on ill-conditioned rows, so once every remaining
row has stalled (or after 12 steps) they finish with a monotone Lawson–Hanson-type primal
active-set method started from the warm start (also exact and finite).

All ``k`` problems share ``G`` and are solved together, after a Jacobi scaling (unit diagonal);
rows with ``q ≥ 0`` (no conflict) get ``x = 0``. Small float64 CPU problems (``m ≤ 160``) go to
a lean NumPy implementation of the same method (:mod:`._dual_cone_small`; rows it declines
come back here). Otherwise rows are warm-started by FISTA (float32) and each pivoting step
solves all remaining rows at once: sorted by ``|F|`` and chunked, free blocks gathered and
padded with identity rows, one batched Cholesky per chunk (large blocks in float32, refined to
float64 accuracy). Converged rows are dropped; two host syncs per step.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from . import _dual_cone_small as _small
from ._dual_cone_warm import max_eigenvalue as _max_eigenvalue
from ._dual_cone_warm import warm_start as _warm_start

__all__ = ["project_dual_cone", "solve_lcp"]

_MURTY_PATIENCE = 3  # full exchanges allowed without progress before Murty's single pivot
_MIXED_MIN_SIZE = 192  # free-set size from which float32 factorisation + refinement pays off
_REFINE_STEPS = 3
_BPP_STEPS = 12  # pivoting steps before the remaining rows switch to the primal active-set method
_NUMPY_MAX_M = 160  # float64 CPU problems up to this size go to the NumPy path


_Options = tuple[int | None, int | None, float | None, bool | None, int | None]


def project_dual_cone(
    gramian: Tensor,
    lower: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    warm_start_iter: int | None = None,
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
        warm_start_iter: maximum number of FISTA iterations used to guess the active sets
            (default: 0 below 32 rows, else 200).
        max_iter: bound on pivoting steps (default ``100 + 10 m``); exceeding it raises.
        rtol: relative KKT tolerance (default ``100 · eps(dtype)``).
        mixed_precision: factorise large float64 blocks in float32 and refine (default: auto).
        max_chunk_bytes: memory bound of one batch of ``[chunk, s, s]`` systems.

    Returns:
        ``V`` (``[k, m]``, ``V ≥ lower``) on ``gramian``'s device, in ``gramian``'s dtype.
    """
    _check_shapes(gramian, lower, "lower")
    G = gramian.detach().to(dtype)
    U = lower.detach().to(device=gramian.device, dtype=dtype)
    options = (warm_start_iter, max_iter, rtol, mixed_precision, max_chunk_bytes)
    X = _solve(G, U @ G, -U, options)  # rows of (G Uᵀ)ᵀ; the unconstrained minimiser is −U
    return (U + X).to(gramian.dtype)


def solve_lcp(
    matrix: Tensor,
    q: Tensor,
    *,
    warm_start_iter: int | None = None,
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
    options = (warm_start_iter, max_iter, rtol, mixed_precision, max_chunk_bytes)
    return _solve(matrix, q, None, options)


def _solve(matrix: Tensor, q: Tensor, p: Tensor | None, options: _Options) -> Tensor:
    """Dispatch: small float64 CPU problems to NumPy (rows it leaves go on in torch)."""
    k, m = q.shape
    if not (_use_numpy(matrix) and matrix.dtype == q.dtype == torch.float64 and k > 0):
        return _solve_torch(matrix, q, *options)
    steps = (100 + 10 * m) if options[1] is None else options[1]
    M, Q = matrix.detach(), q.detach()
    P = None if p is None else p.detach().numpy()
    X_np, unsolved = _small.solve_lcp_numpy(M.numpy(), Q.numpy(), P, options[2], steps)
    X = torch.from_numpy(X_np)
    if unsolved.any():
        rows = torch.from_numpy(unsolved.nonzero()[0])
        X[rows] = _solve_torch(M, Q[rows], *options)
    return X


def _use_numpy(matrix: Tensor) -> bool:
    m = matrix.shape[0]
    return matrix.device.type == "cpu" and 0 < m <= _NUMPY_MAX_M


def _solve_torch(
    matrix: Tensor,
    q: Tensor,
    warm_start_iter: int | None,
    max_iter: int | None,
    rtol: float | None,
    mixed_precision: bool | None,
    max_chunk_bytes: int | None,
) -> Tensor:
    k, m = q.shape
    X = torch.zeros(k, m, dtype=matrix.dtype, device=matrix.device)
    if k == 0 or m == 0:
        return X
    # Jacobi scaling M̃ = DMD, q̃ = Dq, x = Dx̃ with D = diag(M)^(-1/2).
    diag = matrix.detach().diagonal()
    d = torch.where(diag > 0, diag.rsqrt(), 1.0)
    M = matrix.detach() * d.unsqueeze(1) * d.unsqueeze(0)
    Q = q.detach().to(M.dtype) * d
    tol = (100 * torch.finfo(M.dtype).eps) if rtol is None else rtol
    iters = (100 + 10 * m) if max_iter is None else max_iter
    if max_chunk_bytes is None:  # CPU: small, cache-friendly chunks (no mmap page faults)
        max_chunk_bytes = 1 << (22 if M.device.type == "cpu" else 28)
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
    lam = float(_max_eigenvalue(M_low))  # one sync
    if warm_start_iter is None:  # below 32 rows, pivoting from scratch is cheaper than FISTA
        warm_start_iter = 0 if m < 32 else 200
    free, x_start = _warm_start(M_low, Qc.to(low), lam, warm_start_iter)
    eps = torch.finfo(M.dtype).eps
    res_tol = 1e3 * eps * max(lam, 1.0)

    best = torch.full((b,), m + 1, device=M.device, dtype=torch.long)
    patience = torch.full((b,), _MURTY_PATIENCE, device=M.device, dtype=torch.long)
    precise = torch.zeros(b, device=M.device, dtype=torch.bool)
    position = torch.arange(1, m + 1, device=M.device)
    s, n_hopeful = int(free.sum(dim=1).amax()), b
    for step in range(iters):
        if step == _BPP_STEPS or n_hopeful == 0:  # all rows stalled: monotone fallback
            x_rows = _primal_active_set(M, Qc, x_start.to(M.dtype), q_scale, tol, iters - step)
            X.index_copy_(0, rows, x_rows * d)
            return X
        use_low = low != M.dtype and (
            s >= _MIXED_MIN_SIZE if mixed_precision is None else mixed_precision
        )
        x, failed, failed_low, cond = _solve_free(
            M, M_low if use_low else None, Qc, free, ~precise, max_chunk_bytes
        )
        y = x @ M + Qc  # rows of (M x + q), M symmetric
        scale = x.abs().amax(dim=1, keepdim=True) + q_scale
        # Per-row tolerance: round-off in x_F grows like eps·κ(M_FF) (estimated by the factor).
        bound = scale * torch.clamp(eps * cond, min=tol).unsqueeze(1)
        infeasible = torch.where(free, x < -bound, y < -bound)
        # A float32 factorisation that failed or whose refinement fell short: no pivot, the row
        # is redone in float64 (rows are flagged at most once, so this cannot loop).
        inexact = failed_low | (free & (y.abs() > res_tol * scale)).any(dim=1)
        inexact = inexact & ~precise & use_low
        precise = precise | inexact
        infeasible = infeasible & ~inexact.unsqueeze(1)
        n_infeasible = infeasible.sum(dim=1)
        done = (n_infeasible == 0) & ~inexact
        X.index_copy_(0, rows, torch.where(done.unsqueeze(1), x.clamp_min(0.0) * d, 0.0))

        # Block pivoting with Murty's backup rule, vectorised over rows.
        better = (n_infeasible < best) & ~inexact
        best = torch.where(better, n_infeasible, best)
        full = better | (patience > 0)
        patience = torch.where(
            better, _MURTY_PATIENCE, torch.where(full & ~inexact, patience - 1, patience)
        )
        last = (infeasible * position).argmax(dim=1, keepdim=True)
        single = torch.zeros_like(infeasible).scatter_(1, last, True) & infeasible
        free = free ^ torch.where(full.unsqueeze(1), infeasible, single)

        stats = [(~done).sum(), (free & ~done.unsqueeze(1)).sum(dim=1).amax(), failed.sum()]
        stats.append((~done & (patience > 0)).sum())  # rows not yet reduced to Murty's rule
        n_keep, s, n_failed, n_hopeful = torch.stack(stats).tolist()  # the one sync per step
        if n_failed:
            raise _not_positive_definite()
        if n_keep == 0:
            return X
        if n_keep < b:
            keep = torch.argsort(done.to(torch.int8), stable=True)[:n_keep]
            rows, Qc, free, q_scale = rows[keep], Qc[keep], free[keep], q_scale[keep]
            x_start = x_start[keep]
            best, patience, precise = best[keep], patience[keep], precise[keep]
            b = n_keep
    raise _no_convergence(iters, b, k)


def _no_convergence(iters: int, b: int, k: int) -> RuntimeError:
    message = f"Dual-cone projection did not converge in {iters} steps for {b} of {k} rows"
    return RuntimeError(message + "; the matrix is probably not positive definite.")


def _not_positive_definite() -> ValueError:
    message = "The matrix is not numerically positive definite (a Cholesky factorisation failed)"
    return ValueError(message + "; regularise it, e.g. with reg_eps > 0.")


def _primal_active_set(
    M: Tensor, Q: Tensor, x: Tensor, q_scale: Tensor, tol: float, max_iter: int
) -> Tensor:
    """Lawson–Hanson-type primal active-set method for the rows left, from a feasible ``x ≥ 0``.

    Keeps ``x`` feasible and supported on the passive set P. If the minimiser ``z`` on P is
    positive, take it and add the indices with ``y = Mz + q < 0`` (done if none); else step from
    ``x`` towards ``z`` until a component vanishes and drop it. The objective never increases;
    a row whose objective stalls at such a point adds only its most negative index from then on
    (classic Lawson–Hanson), where it strictly decreases: this terminates.
    """
    eps = torch.finfo(M.dtype).eps
    out = torch.zeros_like(Q)
    rows = torch.arange(Q.shape[0], device=Q.device)
    passive = x > 0
    single = torch.zeros_like(passive[:, :1])
    f_best = torch.full_like(Q[:, :1], torch.inf)
    for _ in range(max_iter):
        no_low = torch.zeros_like(passive[:, 0])
        z, failed, _, cond = _solve_free(M, None, Q, passive, no_low, 1 << 22)
        y = z @ M + Q
        bound = (z.abs().amax(dim=1, keepdim=True) + q_scale) * torch.clamp(
            eps * cond, min=tol
        ).unsqueeze(1)
        interior = (~passive | (z > -bound)).all(dim=1, keepdim=True)
        violated = ~passive & (y < -bound)
        done = interior.squeeze(1) & ~violated.any(dim=1)
        out.index_copy_(0, rows, torch.where(done.unsqueeze(1), z.clamp_min(0.0), 0.0))
        f = 0.5 * torch.linalg.vecdot(z, y + Q).unsqueeze(1)  # objective at z
        single = single | (interior & ~(f < f_best))
        f_best = torch.where(interior, f, f_best)
        most = torch.zeros_like(passive).scatter_(
            1, torch.where(violated, y, 0.0).argmin(1, True), True
        )
        add = violated & (most | ~single)
        ratio = torch.where(passive & (z <= -bound), x / (x - z), torch.inf)
        alpha = ratio.amin(dim=1, keepdim=True).clamp(0.0, 1.0)
        blocking = torch.zeros_like(passive).scatter_(1, ratio.argmin(dim=1, keepdim=True), True)
        stepped = (x + alpha * (z - x)).clamp_min(0.0)
        x = torch.where(interior, z.clamp_min(0.0), stepped)
        passive = torch.where(interior, passive | add, passive & ~blocking & (stepped > 0))
        n_keep, n_failed = torch.stack([(~done).sum(), failed.sum()]).tolist()
        if n_failed:
            raise _not_positive_definite()
        if n_keep == 0:
            return out
        keep = torch.argsort(done.to(torch.int8), stable=True)[:n_keep]
        rows, Q, x, passive, q_scale = rows[keep], Q[keep], x[keep], passive[keep], q_scale[keep]
        single, f_best = single[keep], f_best[keep]
    raise _no_convergence(max_iter, rows.numel(), out.shape[0])


def _check_shapes(matrix: Tensor, rows: Tensor, name: str) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"The gramian must be a square [m, m] matrix, got {tuple(matrix.shape)}.")
    if rows.ndim != 2 or rows.shape[1] != matrix.shape[0]:
        raise ValueError(
            f"`{name}` must have shape [k, {matrix.shape[0]}], got {tuple(rows.shape)}."
        )
    if not (matrix.is_floating_point() and rows.is_floating_point()):
        raise ValueError("The gramian and the bounds must be floating-point tensors.")


def _solve_free(
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
        ext = torch.zeros(m + s, m + s, device=mat.device, dtype=mat.dtype)
        ext[:m, :m] = mat
        ext.diagonal()[m:] = 1.0
        extended[mat.dtype] = ext.view(-1)
    order = torch.argsort((~free).to(torch.int8), dim=1, stable=True)[:, :s]  # free first
    position = torch.arange(s, device=Q.device)
    chunks, start = [], 0
    while start < b and sizes[start] > 0:  # rows with F = ∅ keep x = 0
        end = start + max(1, max_chunk_bytes // (sizes[start] * sizes[start] * 8))
        end = start + flags[start:end].count(flags[start])  # one precision per chunk
        chunks.append((perm[start:end], sizes[start], bool(flags[start])))
        start = end

    def solve_chunk(rows: Tensor, sc: int, use_low: bool) -> tuple[Tensor, ...]:
        flat_M = extended[M_low.dtype if use_low and M_low is not None else M.dtype]
        idx = torch.where(
            position[:sc] < counts[rows].unsqueeze(1), order[rows, :sc], m + position[:sc]
        )
        # Gather the [c, sc, sc] blocks through flat indices (much faster than 2-D indexing).
        flat = (idx * (m + s)).unsqueeze(2) + idx.unsqueeze(1)
        block = flat_M.index_select(0, flat.view(-1)).view(-1, sc, sc)
        factor, info = torch.linalg.cholesky_ex(block.mT)  # symmetric: column-major view
        diag = factor.diagonal(dim1=1, dim2=2).abs()
        q_ext = torch.nn.functional.pad(Q[rows], (0, s))
        sol = _chol_solve(factor, -q_ext.gather(1, idx).to(block.dtype)).to(Q.dtype)
        x_rows = torch.zeros(rows.numel(), m + s, device=Q.device, dtype=Q.dtype)
        x_rows.scatter_(1, idx, sol)
        for _ in range(_REFINE_STEPS if use_low else 0):
            residual = -q_ext - torch.nn.functional.pad(x_rows[:, :m] @ M, (0, s))
            sol = sol + _chol_solve(factor, residual.gather(1, idx).to(block.dtype)).to(Q.dtype)
            x_rows.scatter_(1, idx, sol)
        return rows, x_rows[:, :m], info != 0, (diag.amax(1) / diag.amin(1)).square()

    threads = torch.get_num_threads()
    if Q.device.type == "cpu" and threads > 1 and len(chunks) > 1:
        # Batched LAPACK factorises one small matrix after another; with several threads it
        # runs them poorly. Rather: single-threaded kernels, chunks spread over threads.
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(min(threads, len(chunks))) as pool:
                results = list(pool.map(lambda chunk: solve_chunk(*chunk), chunks))
        finally:
            torch.set_num_threads(threads)
    else:
        results = [solve_chunk(*chunk) for chunk in chunks]
    for rows, x_rows, failed_rows, cond_rows in results:
        x[rows], failed[rows], cond[rows] = x_rows, failed_rows, cond_rows.to(Q.dtype)
    cond = cond.nan_to_num(nan=1.0, posinf=1.0)
    return x, failed & ~low, failed & low, cond


def _chol_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``L Lᵀ z = rhs`` for a batch of lower Cholesky factors; ``rhs`` is ``[c, s]``."""
    z: Tensor = torch.linalg.solve_triangular(factor, rhs.unsqueeze(2), upper=False)
    z = torch.linalg.solve_triangular(factor.mT, z, upper=True)
    return z.squeeze(2)
