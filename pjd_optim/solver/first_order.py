"""First-order helpers of the solver: a spectral bound and FISTA warm starts. No host syncs."""

from __future__ import annotations

import torch
from torch import Tensor


def max_eigenvalue(M: Tensor, n_iter: int = 16) -> Tensor:
    """Estimate of λ_max(M) (power iteration, with margin, capped by ‖M‖_F); a device scalar."""
    v = 1.0 + 0.1 * torch.sin(torch.arange(M.shape[0], device=M.device, dtype=M.dtype))
    for _ in range(n_iter):
        v = M @ v
        v = v / v.norm().clamp_min(torch.finfo(M.dtype).tiny)
    rayleigh = v @ (M @ v)
    frobenius = torch.linalg.matrix_norm(M)
    return torch.minimum(1.25 * rayleigh, frobenius).clamp_min(torch.finfo(M.dtype).tiny)


def fista(M: Tensor, Q: Tensor, lam: Tensor, iters: int, freeze_every: int = 0) -> Tensor:
    """``iters`` steps of FISTA with gradient restart on ``½xᵀMx + qᵀx``, ``x ≥ 0`` (every row),
    step ``1/lam``. Returns the (feasible) iterates.

    With ``freeze_every``, every that many steps the rows whose free-set guess (see
    :func:`free_guess`) did not change are frozen: cheaper, at one host sync per check.
    """
    step = 1.0 / lam
    out = torch.zeros_like(Q)
    rows = torch.arange(Q.shape[0], device=Q.device)
    x, z = torch.zeros_like(Q), torch.zeros_like(Q)
    k = torch.zeros(Q.shape[0], 1, device=Q.device, dtype=Q.dtype)  # momentum age per row
    guess = Q < 0
    for it in range(1, iters + 1):
        x_new = (z - step * torch.addmm(Q, z, M)).clamp_min_(0.0)
        move = x_new - x
        restart = torch.linalg.vecdot(z - x_new, move).unsqueeze(1) > 0
        k = torch.where(restart, 0.0, k + 1.0)
        z = torch.addcmul(x_new, k / (k + 3.0), move)
        x = x_new
        if freeze_every and it % freeze_every == 0 and it < iters:
            new_guess = free_guess(M, Q, x, lam)
            moving = (new_guess != guess).any(dim=1)
            guess = new_guess
            n_moving = int(moving.sum())
            if n_moving < rows.numel():
                out.index_copy_(0, rows, x)
                keep = moving.nonzero().squeeze(1)
                rows, Q, x, z, k, guess = (
                    rows[keep],
                    Q[keep],
                    x[keep],
                    z[keep],
                    k[keep],
                    guess[keep],
                )
            if n_moving == 0:
                return out
    return out.index_copy_(0, rows, x)


def free_guess(M: Tensor, Q: Tensor, x: Tensor, lam: Tensor) -> Tensor:
    """The free sets a projected-gradient step from ``x`` identifies: ``x − (Mx + q)/lam > 0``."""
    return x - torch.addmm(Q, x, M) / lam > 0
