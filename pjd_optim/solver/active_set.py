r"""The stall policy's last resort: the monotone active-set method for the rows that block
pivoting with Murty's backup has not finished within ``STALL_STEPS`` steps (on ill-conditioned
problems round-off can make single pivots cycle; this method cannot).

Lawson–Hanson-type primal method for rows of LCP(q, M), from a feasible ``x ≥ 0``: ``x`` stays
feasible and supported on the passive set P. If the minimiser ``z`` on P is positive, take it and
add the indices with ``y = Mz + q < 0`` (done if none); else step from ``x`` towards ``z`` until
a component vanishes and drop it. The objective never increases; a row whose objective stalls at
such a point adds only its most negative index from then on (classic Lawson–Hanson), where it
strictly decreases: this terminates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import largest_bound, no_convergence, not_positive_definite, too_ill_conditioned
from .systems import Systems


def active_set(
    M: Tensor, Q: Tensor, x: Tensor, tol: float, max_iter: int, systems: Systems
) -> Tensor:
    """Rows of LCP(``Q``, ``M``) from the feasible ``x`` (``systems``: the primal solves on
    ``M``, in its dtype). Raises if a factorisation fails or ``max_iter`` iterations do not
    suffice."""
    b = Q.shape[0]
    eps = torch.finfo(M.dtype).eps
    out = torch.zeros_like(Q)
    rows = torch.arange(b, device=Q.device)
    q_scale = Q.abs().amax(dim=1, keepdim=True)
    passive = x > 0
    single = torch.zeros_like(passive[:, 0])
    f_best = torch.full_like(Q[:, 0], torch.inf)
    for _ in range(max_iter):
        z, ok, cond = systems.solve(-Q, passive)
        if not bool(ok.all()):
            raise not_positive_definite()
        y = z @ M + Q
        rel = (eps * cond).clamp(min=tol)[:, None]
        loose = (z.abs().amax(dim=1, keepdim=True) + q_scale) * rel
        bound = loose * (rel.clamp(max=largest_bound(M.dtype, tol)) / rel)
        interior = (~passive | (z > -bound)).all(dim=1)
        violated = ~passive & (y < -bound)
        within = (~passive | (z > -loose)).all(dim=1) & ~(~passive & (y < -loose)).any(dim=1)
        if bool((within & ~(interior & ~violated.any(dim=1))).any()):
            raise too_ill_conditioned(M.dtype, tol)  # (a right and a wrong answer look alike)
        done = interior & ~violated.any(dim=1)
        out[rows[done]] = z[done].clamp_min(0.0)
        f = 0.5 * (z * (y + Q)).sum(dim=1)  # objective at z
        single = single | (interior & ~(f < f_best))
        f_best = torch.where(interior, f, f_best)
        index = torch.arange(rows.shape[0], device=Q.device)
        most = torch.zeros_like(passive)
        most[index, torch.where(violated, y, 0.0).argmin(dim=1)] = True
        add = violated & (most | ~single[:, None])
        blocked = passive & (z <= -bound)
        ratio = torch.where(blocked, x / torch.where(blocked, x - z, 1.0), torch.inf)
        alpha = ratio.amin(dim=1, keepdim=True).clamp(0.0, 1.0)
        blocking = torch.zeros_like(passive)
        blocking[index, ratio.argmin(dim=1)] = True
        stepped = (x + alpha * (z - x)).clamp_min(0.0)
        x = torch.where(interior[:, None], z.clamp_min(0.0), stepped)
        passive = torch.where(interior[:, None], passive | add, passive & ~blocking & (stepped > 0))
        keep = ~done
        if not bool(keep.any()):
            return out
        rows, Q, x, passive, q_scale = rows[keep], Q[keep], x[keep], passive[keep], q_scale[keep]
        single, f_best = single[keep], f_best[keep]
    raise no_convergence(max_iter, rows.shape[0], b)
