"""Helpers of the torch dual-cone solver: spectral bound and FISTA warm start."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["max_eigenvalue", "warm_start"]


def max_eigenvalue(M: Tensor, n_iter: int = 16) -> Tensor:
    """Estimate of λ_max(M) (power iteration, with margin, capped by ‖M‖_F); a device scalar."""
    v = 1.0 + 0.1 * torch.sin(torch.arange(M.shape[0], device=M.device, dtype=M.dtype))
    for _ in range(n_iter):
        v = M @ v
        v = v / v.norm().clamp_min(torch.finfo(M.dtype).tiny)
    rayleigh = v @ (M @ v)
    frobenius = torch.linalg.matrix_norm(M)
    return torch.minimum(1.25 * rayleigh, frobenius).clamp_min(torch.finfo(M.dtype).tiny)


def warm_start(
    M: Tensor, Q: Tensor, lam: float, max_iter: int, check: int = 20
) -> tuple[Tensor, Tensor]:
    """Free-set guesses from FISTA (gradient restart) on ½xᵀMx + qᵀx, x ≥ 0, step 1/lam.

    The guess is the identification rule of a projected-gradient step, ``x_j − y_j / lam > 0``.
    Every ``check`` iterations the rows whose guess did not change are frozen (dropped).
    Also returns the (feasible) iterates.
    """
    guess, out = Q < 0, torch.zeros_like(Q)
    rows = torch.arange(Q.shape[0], device=Q.device)
    x, z = torch.zeros_like(Q), torch.zeros_like(Q)
    k = torch.zeros(Q.shape[0], 1, device=Q.device, dtype=Q.dtype)  # momentum age per row
    done = 0
    while done < max_iter:
        for _ in range(min(check, max_iter - done)):
            x_new = torch.add(z, torch.addmm(Q, z, M), alpha=-1.0 / lam).clamp_min_(0.0)
            step = x_new - x
            restart = torch.linalg.vecdot(z - x_new, step).unsqueeze(1) > 0
            k = torch.where(restart, 0.0, k + 1.0)
            z = torch.addcmul(x_new, k / (k + 3.0), step)
            x = x_new
        done += check
        new_guess = torch.add(x, torch.addmm(Q, x, M), alpha=-1.0 / lam) > 0
        moving = (new_guess != guess.index_select(0, rows)).any(dim=1)
        guess.index_copy_(0, rows, new_guess)
        out.index_copy_(0, rows, x)
        n_moving = int(moving.sum())  # one sync per `check` iterations
        if n_moving == 0:
            break
        if n_moving < rows.numel():
            keep = torch.argsort((~moving).to(torch.int8), stable=True)[:n_moving]
            rows, Q, x, z, k = rows[keep], Q[keep], x[keep], z[keep], k[keep]
    return guess, out
