"""The monotone active-set method that finishes the rows block pivoting leaves.

One implementation for both paths that use it: the NumPy path (small CPU problems, where a NumPy
operation costs a microsecond) and the torch pivoting path (any device). ``xp`` is the module of
the arrays (``numpy`` or ``torch``); the operations below mean the same on both.

Lawson–Hanson-type primal method for rows of LCP(q, M), from a feasible ``x ≥ 0``: ``x`` stays
feasible and supported on the passive set P. If the minimiser ``z`` on P is positive, take it and
add the indices with ``y = Mz + q < 0`` (done if none); else step from ``x`` towards ``z`` until
a component vanishes and drop it. The objective never increases; a row whose objective stalls at
such a point adds only its most negative index from then on (classic Lawson–Hanson), where it
strictly decreases: this terminates.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

Array = Any  # a NumPy array or a torch tensor
# (indices of the rows left, their passive sets) -> (z minimising on the passive sets, the
# per-row relative tolerance of z and y, [rows, 1])
Solve = Callable[[Array, Array], tuple[Array, Array]]


def active_set(
    solve: Solve,
    matmul: Callable[[Array, Array], Array],
    arange: Callable[[int], Array],
    M: Array,
    Q: Array,
    x: Array,
    max_iter: int,
    xp: ModuleType,
) -> tuple[Array, Array]:
    """Rows of LCP(``Q``, ``M``) from the feasible ``x``. Returns ``X`` and the mask of rows not
    finished within ``max_iter`` iterations (their ``X`` rows are zero)."""
    b = Q.shape[0]
    out = xp.zeros_like(Q)
    rows = arange(b)
    q_scale = xp.amax(abs(Q), axis=1, keepdims=True)
    passive = x > 0
    single = xp.zeros_like(passive[:, 0])
    f_best = xp.full_like(Q[:, 0], xp.inf)
    for _ in range(max_iter):
        z, rel = solve(rows, passive)
        y = matmul(z, M) + Q
        bound = (xp.amax(abs(z), axis=1, keepdims=True) + q_scale) * rel
        interior = (~passive | (z > -bound)).all(axis=1)
        violated = ~passive & (y < -bound)
        done = interior & ~violated.any(axis=1)
        out[rows[done]] = z[done].clip(min=0.0)
        f = 0.5 * (z * (y + Q)).sum(axis=1)  # objective at z
        single = single | (interior & ~(f < f_best))
        f_best = xp.where(interior, f, f_best)
        index = arange(rows.shape[0])
        most = xp.zeros_like(passive)
        most[index, xp.where(violated, y, 0.0).argmin(axis=1)] = True
        add = violated & (most | ~single[:, None])
        blocked = passive & (z <= -bound)
        ratio = xp.where(blocked, x / xp.where(blocked, x - z, 1.0), xp.inf)
        alpha = xp.amin(ratio, axis=1, keepdims=True).clip(0.0, 1.0)
        blocking = xp.zeros_like(passive)
        blocking[index, ratio.argmin(axis=1)] = True
        stepped = (x + alpha * (z - x)).clip(min=0.0)
        x = xp.where(interior[:, None], z.clip(min=0.0), stepped)
        passive = xp.where(interior[:, None], passive | add, passive & ~blocking & (stepped > 0))
        keep = ~done
        if not keep.any():
            return out, xp.zeros_like(out[:, 0]) > 0
        rows, Q, x, passive, q_scale = rows[keep], Q[keep], x[keep], passive[keep], q_scale[keep]
        single, f_best = single[keep], f_best[keep]
    left = xp.zeros_like(out[:, 0]) > 0
    left[rows] = True
    return out, left
