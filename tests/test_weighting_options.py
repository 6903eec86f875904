"""Weightings at non-default options (``norm_eps``, ``reg_eps``, preference vectors), swept by
hypothesis, against quadprog and the KKT conditions with tolerances per row and per entry (an
ill-conditioned row is held to its own scale, not to the largest row's)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qp import F64, quadprog_rows, random_gramian, regularised
from torch import Tensor

from pjd_optim import MGDA, DualProj, UPGrad, Weighting

pytestmark = pytest.mark.usefixtures("single_thread")

KKT_RTOL = 1e-9
QUADPROG_RTOL = 1e-6


def assert_rows_kkt(G: Tensor, U: Tensor, V: Tensor, rtol: float = KKT_RTOL) -> None:
    """For each row ``v`` of ``V`` (lower bound ``u``, row of ``U``), entry by entry: ``v ≥ u``,
    ``(Gv)_j ≥ 0`` and ``(v − u)_j (Gv)_j = 0``, each relative to that row's and that entry's own
    scale (``max(|v|, |u|)`` and ``(|G| |v|)_j``)."""
    Y = V @ G
    magnitude = V.abs() @ G.abs()  # (|G||v|)_j per row: the scale of the sum (Gv)_j
    for i in range(V.shape[0]):
        v, u, y = V[i], U[i], Y[i]
        scale_v = max(float(v.abs().max()), float(u.abs().max()), 1e-300)
        scale_y = magnitude[i].clamp_min(1e-300)
        gap = v - u
        assert float(gap.min()) >= -rtol * scale_v, f"row {i}: primal feasibility v >= u"
        assert bool((y >= -rtol * scale_y).all()), f"row {i}: dual feasibility Gv >= 0"
        assert bool(((gap * y).abs() <= rtol * scale_v * scale_y).all()), (
            f"row {i}: complementarity"
        )


def assert_rows_close(actual: Tensor, expected: Tensor, rtol: float = QUADPROG_RTOL) -> None:
    """Row by row, relative to each row's own largest entry."""
    for i in range(expected.shape[0]):
        scale = max(float(expected[i].abs().max()), 1e-300)
        error = float((actual[i] - expected[i]).abs().max())
        assert error <= rtol * scale, f"row {i}: {error / scale:.2e} off"


def assert_simplex_kkt(G: Tensor, w: Tensor, rtol: float = KKT_RTOL) -> None:
    """``min wᵀGw`` on the simplex, entry by entry: ``w ≥ 0``, ``Σw = 1``, ``(Gw)_j ≥ μ`` with
    ``μ = wᵀGw`` and ``w_j ((Gw)_j − μ) = 0``, each relative to ``(|G||w|)_j``."""
    g = G @ w
    mu = float(w @ g)
    scale = (G.abs() @ w.abs()).clamp_min(1e-300)
    assert float(w.min()) >= 0.0 and abs(float(w.sum()) - 1.0) <= 1e-12
    assert bool((g - mu >= -rtol * scale).all()), "(Gw)_j >= μ"
    assert bool(((w * (g - mu)).abs() <= rtol * scale).all()), "complementarity"


def quadprog_simplex(G: Tensor) -> Tensor:
    solve_qp = pytest.importorskip("qpsolvers").solve_qp
    m = G.shape[0]
    ref = solve_qp(
        G.numpy(), np.zeros(m), -np.eye(m), np.zeros(m), np.ones((1, m)), np.ones(1),
        solver="quadprog",
    )  # fmt: skip
    assert ref is not None
    return torch.from_numpy(ref)


@st.composite
def problems(draw: st.DrawFn) -> tuple[Tensor, float, float, Tensor | None]:
    """A Gramian (of any scale, rank and conflict), ``norm_eps`` on either side of its trace,
    ``reg_eps`` from tiny (ill-conditioned) to large, and a preference vector or ``None``."""
    m = draw(st.integers(1, 10))
    rank = draw(st.integers(1, 2 * m))
    kind = draw(st.sampled_from(["gaussian", "uneven", "scaled", "aligned", "conflicting"]))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
    G = scale * random_gramian(m, rank, kind, draw(st.integers(0, 10**6)))
    trace = float(G.trace())
    norm_eps = draw(st.sampled_from([0.0, 1e-9, 1e-4, 0.5 * trace, 2.0 * trace, 10.0]))
    reg_eps = draw(st.sampled_from([1e-6, 1e-4, 1e-2, 0.3, 2.0]))
    pref: Tensor | None = None
    if draw(st.booleans()):
        values = draw(st.lists(st.floats(0.05, 3.0), min_size=m, max_size=m))
        pref = torch.tensor(values, dtype=F64)
    return G, norm_eps, reg_eps, pref


SWEEP = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SWEEP
@given(problems())
def test_upgrad_rows_match_quadprog_and_kkt_at_any_options(
    problem: tuple[Tensor, float, float, Tensor | None],
) -> None:
    """Each row of UPGrad (``pref = p_i e_i``: the other rows' bounds are 0, so their projections
    are 0) satisfies its KKT conditions and equals quadprog's; UPGrad's weights are their sum."""
    G, norm_eps, reg_eps, pref = problem
    m = G.shape[0]
    p = torch.full((m,), 1.0 / m, dtype=F64) if pref is None else pref
    U = torch.diag(p)
    Gr = regularised(G, norm_eps, reg_eps)
    rows = torch.stack(
        [UPGrad(p[i] * torch.eye(m, dtype=F64)[i], norm_eps, reg_eps)(G) for i in range(m)]
    )
    assert_rows_kkt(Gr, U, rows)
    assert_rows_close(rows, quadprog_rows(Gr, U))
    w = UPGrad(pref, norm_eps=norm_eps, reg_eps=reg_eps)(G)
    assert_rows_close(w.unsqueeze(0), rows.sum(dim=0, keepdim=True), 1e-9)


@SWEEP
@given(problems())
def test_dualproj_matches_quadprog_and_kkt_at_any_options(
    problem: tuple[Tensor, float, float, Tensor | None],
) -> None:
    G, norm_eps, reg_eps, pref = problem
    m = G.shape[0]
    p = torch.full((m,), 1.0 / m, dtype=F64) if pref is None else pref
    Gr = regularised(G, norm_eps, reg_eps)
    w = DualProj(pref, norm_eps=norm_eps, reg_eps=reg_eps)(G)
    assert_rows_kkt(Gr, p.unsqueeze(0), w.unsqueeze(0))
    assert_rows_close(w.unsqueeze(0), quadprog_rows(Gr, p.unsqueeze(0)))


@SWEEP
@given(problems())
def test_mgda_matches_quadprog_and_kkt_at_any_options(
    problem: tuple[Tensor, float, float, Tensor | None],
) -> None:
    G, norm_eps, reg_eps, _ = problem
    Gr = regularised(G, norm_eps, reg_eps)
    w = MGDA(norm_eps=norm_eps, reg_eps=reg_eps)(G)
    assert w.dtype == F64 and w.shape == (G.shape[0],)
    assert_simplex_kkt(Gr, w)
    assert_rows_close(w.unsqueeze(0), quadprog_simplex(Gr).unsqueeze(0))


@pytest.mark.parametrize("weighting", ["UPGrad", "DualProj", "MGDA"])
def test_options_change_the_weights_where_they_should(weighting: str) -> None:
    """The options reach the solver: a larger ``reg_eps`` pulls the weights towards the
    preference (MGDA: towards uniform), and a ``norm_eps`` above the trace gives them exactly."""
    G = random_gramian(6, 3, "uneven", seed=3)
    m = G.shape[0]
    pref = torch.linspace(0.2, 1.2, m, dtype=F64)
    makers: dict[str, Callable[..., Weighting]] = {
        "UPGrad": lambda **kw: UPGrad(pref, **kw),
        "DualProj": lambda **kw: DualProj(pref, **kw),
        "MGDA": lambda **kw: MGDA(**kw),
    }
    make = makers[weighting]
    target = torch.full((m,), 1.0 / m, dtype=F64) if weighting == "MGDA" else pref
    trace = float(G.trace())
    flat = make(norm_eps=2 * trace, reg_eps=0.1)(G)
    torch.testing.assert_close(flat, target, rtol=1e-9, atol=1e-12)
    near = make(reg_eps=1e-4)(G)
    far = make(reg_eps=10.0)(G)
    assert float((far - target).norm()) < 0.2 * float((near - target).norm())


def test_the_per_row_checker_holds_a_small_row_to_its_own_scale() -> None:
    """A row 1000x smaller than the largest, off by 1e-7 of its own scale: the per-row checks
    (this file's and ``qp.assert_kkt``) fail it, where a tolerance scaled by the largest row
    would let it through."""
    from qp import assert_kkt

    G = regularised(random_gramian(5, 5, "gaussian", seed=1))
    U = torch.diag(torch.tensor([1.0, 1e-3, 1.0, 1.0, 1.0], dtype=F64))
    V = quadprog_rows(G, U)
    assert_rows_kkt(G, U, V, rtol=1e-8)
    V[1] = V[1] * (1 - 1e-7)  # primal infeasible by 1e-7 of its own row (v_1 < u_1)
    with pytest.raises(AssertionError, match=r"rows \[1\]"):
        assert_kkt(G, U, V, rtol=1e-8)
    with pytest.raises(AssertionError, match="row 1"):
        assert_rows_kkt(G, U, V, rtol=1e-8)
