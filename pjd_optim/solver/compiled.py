r"""The start of small CPU problems: each row's active set from DAQP, a compiled dual active-set
QP solver (Arnström, Bemporad & Axehill 2022; PyPI ``daqp``), one row at a time.

DAQP's answer is accurate to its tolerances only; it gives the *active sets*, which the caller
verifies and polishes with one exact solve of their free systems (:mod:`.numpy_path`), rows
that fail to verify continuing on the exact pivoting loop. DAQP is single-threaded C (no
OpenMP), a few microseconds per row at ``m = 16``: small problems stay steady on a busy CPU.

Each row of LCP(q, M) is the QP ``min ½xᵀMx + qᵀx`` s.t. ``x ≥ 0``; ``M`` is factorised once
(:meth:`daqp.Model.setup`), and each row changes only ``q`` (scaled to unit largest entry, so
DAQP's absolute tolerances are relative ones).
"""

from __future__ import annotations

import daqp  # type: ignore[import-not-found, unused-ignore]  # stubs: typings/daqp
import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]
Mask = NDArray[np.bool_]

# DAQP's tolerances on rows scaled to unit largest |q| (defaults: primal 1e-6, dual 1e-12): a
# constraint violated by more than PRIMAL_TOL is still added, so the active set is the exact one
# on every well-conditioned row (the polish then makes x exact to round-off).
PRIMAL_TOL = 1e-10


def solve(M: Array, Q: Array, q_scale: Array, rel: float) -> tuple[Array, Mask, Mask]:
    """Rows of LCP(``Q``, ``M``) by DAQP (``M``: SPD, unit diagonal; every row conflicts;
    ``q_scale``: each row's largest ``|q|``, ``[b, 1]``). Returns ``x`` (zero on the active
    sets), the active sets, and the rows *verified*: ``x_F ≥ 0``, ``|y_F| ≈ 0``, ``y_A ≥ 0`` for
    ``y = Mx + q``, each to ``rel`` times the row's scale (the exact paths' bound). The others
    (DAQP failed or fell short) are for the caller to finish from these active sets."""
    b, m = Q.shape
    F = Q / q_scale  # unit largest |q| per row: DAQP's absolute tolerances become relative
    model = _model(M, F[0]) if b else None
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
    y = x @ M + Q
    bound = (np.abs(x).max(axis=1, keepdims=True) + q_scale) * rel
    wrong = np.where(active, y < -bound, (x < -bound) | (np.abs(y) > bound))
    return x.clip(min=0.0), active, solved & ~wrong.any(axis=1)


def _model(M: Array, q: Array) -> daqp.Model | None:
    """A DAQP model of ``min ½xᵀMx + qᵀx`` s.t. ``x ≥ 0`` (``None``: its setup failed, e.g.
    ``M`` not numerically positive definite: the exact path decides)."""
    m = M.shape[0]
    model = daqp.Model()
    model.settings = {"primal_tol": PRIMAL_TOL, "eps_prox": 0.0, "iter_limit": 100 + 10 * m}
    inf = np.full(m, np.inf)
    flag, _ = model.setup(np.ascontiguousarray(M), q, np.zeros((0, m)), inf, np.zeros(m))
    return model if flag >= 0 else None
