"""Tests of the weightings (Mean, UPGrad, DualProj, MGDA) against independent references."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from oracle import relative_error as rel_err
from qp import F64, assert_kkt, quadprog_rows, regularised, upgrad_rows
from qp import random_gramian as _random_gramian
from torch import Tensor

from pjd_optim import MGDA, DualProj, Mean, UPGrad, Weighting
from pjd_optim.solver import SolverOptions, project_dual_cone

pytestmark = pytest.mark.usefixtures("single_thread")


def random_gramian(m: int, rank: int, seed: int, scale: float = 1.0) -> Tensor:
    """Gradients of uneven norms, scaled by ``scale``."""
    return scale * _random_gramian(m, rank, "uneven", seed)


# ----------------------------------------------------------------------------- Mean / protocol


def test_mean_and_protocol() -> None:
    G = random_gramian(5, 3, seed=0).float()
    w = Mean()(G)
    assert w.dtype == torch.float32 and torch.equal(w, torch.full((5,), 0.2))
    assert isinstance(UPGrad(), Weighting) and isinstance(Mean(), Weighting)
    weighting: Callable[[Tensor], Tensor] = MGDA()
    assert weighting(G).shape == (5,)


def test_reprs_show_parameters() -> None:
    assert repr(Mean()) == "Mean()"
    assert repr(UPGrad()) == "UPGrad(pref_vector=None, norm_eps=0.0001, reg_eps=0.0001)"
    assert "pref_vector=[0.5, 1.5]" in repr(DualProj(torch.tensor([0.5, 1.5]), reg_eps=0.01))
    assert "reg_eps=0.01" in repr(DualProj(reg_eps=0.01))
    assert repr(MGDA(reg_eps=1e-3)) == "MGDA(norm_eps=0.0001, reg_eps=0.001)"


# ----------------------------------------------------------------------------- UPGrad


@pytest.mark.parametrize(
    ("m", "rank"), [(1, 1), (2, 1), (3, 3), (7, 3), (16, 8), (40, 80), (64, 32)]
)
def test_upgrad_matches_quadprog(m: int, rank: int) -> None:
    G = random_gramian(m, rank, seed=m + rank)
    expected = quadprog_rows(regularised(G), upgrad_rows(m)).sum(dim=0)
    assert rel_err(UPGrad()(G), expected) <= 1e-8


@pytest.mark.parametrize(("m", "rank"), [(1, 1), (5, 2), (12, 24), (32, 16), (64, 64)])
def test_upgrad_matches_torchjd(m: int, rank: int) -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    G = random_gramian(m, rank, seed=3 * m + rank)
    assert rel_err(UPGrad()(G), aggregation.UPGradWeighting()(G)) <= 1e-6
    pref = torch.rand(m, generator=torch.Generator().manual_seed(m), dtype=F64) + 0.1
    expected = aggregation.UPGradWeighting(pref_vector=pref)(G)
    assert rel_err(UPGrad(pref_vector=pref)(G), expected) <= 1e-6


def test_upgrad_weights_are_the_sum_of_the_kkt_projections() -> None:
    """Each row's projection satisfies its own KKT conditions (which characterise the unique
    minimiser of a strictly convex QP: ``v ≥ u``, ``G̃v ≥ 0``, ``(v − u) ⊙ G̃v = 0``), and UPGrad's
    weights are their sum."""
    G = random_gramian(30, 10, seed=1)
    Gr = regularised(G)
    U = torch.eye(30, dtype=F64) / 30
    V = project_dual_cone(Gr, U)
    assert_kkt(Gr, U, V, rtol=1e-10)
    assert rel_err(UPGrad()(G), V.sum(dim=0)) <= 1e-12
    assert rel_err(V, quadprog_rows(Gr, U)) <= 1e-8


def test_upgrad_edge_cases() -> None:
    assert torch.equal(UPGrad()(torch.tensor([[3.0]])), torch.tensor([1.0]))
    assert torch.equal(UPGrad()(torch.zeros(1, 1)), torch.tensor([1.0]))
    zero = UPGrad()(torch.zeros(6, 6, dtype=F64))  # G = 0: preference weights, no NaN
    torch.testing.assert_close(zero, torch.full((6,), 1 / 6, dtype=F64))
    pref = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    torch.testing.assert_close(UPGrad(pref)(torch.zeros(3, 3, dtype=F64)), pref)


def test_upgrad_rank_deficient_and_duplicated_gradients() -> None:
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(5, 3, generator=gen, dtype=F64)
    J = torch.cat([J, J, -J[:2], J[:1] * 1e3])  # duplicates, opposites, a dominant gradient
    G = J @ J.T
    w = UPGrad()(G)
    assert torch.isfinite(w).all()
    m = G.shape[0]
    assert rel_err(w, quadprog_rows(regularised(G), upgrad_rows(m)).sum(dim=0)) <= 1e-7


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_upgrad_extreme_scales(scale: float) -> None:
    G = random_gramian(10, 5, seed=4)
    w = UPGrad()(scale * G)
    if scale > 1:  # normalisation by the trace removes the scale
        assert rel_err(w, UPGrad()(G)) <= 1e-10
        assert rel_err(UPGrad()((scale * G).float()), UPGrad()(G)) <= 1e-5
    else:  # trace < norm_eps: TorchJD's rule uses zeros, hence the preference weights
        torch.testing.assert_close(w, torch.full((10,), 0.1, dtype=F64))
        assert rel_err(UPGrad(norm_eps=0.0)(scale * G), UPGrad()(G)) <= 1e-10


def test_upgrad_dtype_and_device_follow_the_input() -> None:
    G = random_gramian(20, 10, seed=5)
    w32 = UPGrad()(G.float())
    assert w32.dtype == torch.float32 and w32.device == G.device
    assert rel_err(w32, UPGrad()(G)) <= 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gramian_raises(bad: float) -> None:
    G = random_gramian(4, 4, seed=6)
    G[1, 2] = bad
    for weighting in (UPGrad(), DualProj(), MGDA()):
        with pytest.raises(ValueError, match="NaN or infinite"):
            weighting(G)


@pytest.mark.parametrize("shape", [(3,), (3, 4), (2, 3, 3), ()])
def test_bad_shapes_raise(shape: tuple[int, ...]) -> None:
    for weighting in (UPGrad(), DualProj(), MGDA(), Mean()):
        with pytest.raises(ValueError, match=r"square \[m, m\]"):
            weighting(torch.zeros(shape))


def test_bad_parameters_raise() -> None:
    with pytest.raises(ValueError, match="shape \\[3\\]"):
        UPGrad(pref_vector=torch.ones(4))(torch.eye(3))
    with pytest.raises(ValueError, match="1-D"):
        UPGrad(pref_vector=torch.ones(2, 2))
    with pytest.raises(ValueError, match=">= 0"):
        UPGrad(reg_eps=-1.0)
    with pytest.raises(ValueError, match="reg_eps > 0"):
        MGDA(reg_eps=0.0)
    with pytest.raises(ValueError, match="floating-point"):
        UPGrad()(torch.eye(3, dtype=torch.long))


def test_weights_on_an_accelerator_match_the_cpu(accelerator: str) -> None:
    G = random_gramian(64, 32, seed=7)
    for weighting in (UPGrad(), DualProj(), MGDA()):
        w = weighting(G.to(accelerator))
        assert w.device.type == accelerator
        assert rel_err(w, weighting(G)) <= 1e-9


# ----------------------------------------------------------------------------- DualProj


@pytest.mark.parametrize(("m", "rank"), [(1, 1), (4, 2), (20, 7), (50, 100)])
def test_dualproj_kkt_and_quadprog(m: int, rank: int) -> None:
    G = random_gramian(m, rank, seed=10 * m)
    pref = torch.linspace(0.5, 1.5, m, dtype=F64)
    w = DualProj(pref)(G)
    Gr = regularised(G)
    y = Gr @ w
    assert float((w - pref).min()) >= -1e-12 and float(y.min()) >= -1e-12
    assert float(((w - pref) * y).abs().max()) <= 1e-12
    assert rel_err(w, quadprog_rows(Gr, pref.unsqueeze(0))[0]) <= 1e-8


def test_dualproj_matches_torchjd() -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    G = random_gramian(24, 8, seed=11)
    assert rel_err(DualProj()(G), aggregation.DualProjWeighting()(G)) <= 1e-6


# ----------------------------------------------------------------------------- MGDA


def mgda_brute_force(G: Tensor) -> Tensor:
    """Enumerate supports S: [G_SS 1; 1ᵀ 0][w; −μ] = [0; 1]; keep the KKT-feasible one."""
    m = G.shape[0]
    best = None
    for bits in itertools.product([False, True], repeat=m):
        S = torch.tensor(bits)
        if not S.any():
            continue
        n = int(S.sum())
        K = torch.zeros(n + 1, n + 1, dtype=F64)
        K[:n, :n] = G[S][:, S]
        K[:n, n] = K[n, :n] = 1.0
        rhs = torch.zeros(n + 1, dtype=F64)
        rhs[n] = 1.0
        sol = torch.linalg.solve(K, rhs)
        w = torch.zeros(m, dtype=F64)
        w[S] = sol[:n]
        mu = float(w @ G @ w)
        if float(w.min()) >= -1e-12 and float((G @ w).min()) >= mu - 1e-12:
            best = w.clamp_min(0.0)
    assert best is not None
    return best


def assert_mgda_kkt(G: Tensor, w: Tensor) -> None:
    """Simplex QP: w ≥ 0, Σw = 1, Gw ≥ μ1 with μ = wᵀGw, w ⊙ (Gw − μ) = 0."""
    g = G @ w
    mu = float(w @ g)
    assert float(w.min()) >= 0.0 and abs(float(w.sum()) - 1.0) <= 1e-12
    assert float(g.min()) >= mu - 1e-10 * mu
    assert float((w * (g - mu)).abs().max()) <= 1e-10 * mu


@pytest.mark.parametrize(("m", "rank"), [(1, 1), (2, 1), (3, 2), (5, 5), (6, 3)])
def test_mgda_brute_force(m: int, rank: int) -> None:
    G = random_gramian(m, rank, seed=20 + m)
    w = MGDA()(G)
    assert_mgda_kkt(regularised(G), w)
    torch.testing.assert_close(w, mgda_brute_force(regularised(G)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("m", "rank"), [(10, 4), (32, 16), (32, 64), (200, 100), (200, 400)])
def test_mgda_matches_quadprog(m: int, rank: int) -> None:
    """m = 200: the pivoting path (above the DAQP path's size), from the sign guess (all free)."""
    G = random_gramian(m, rank, seed=30 + m)
    Gr = regularised(G)
    w = MGDA()(G)
    assert_mgda_kkt(Gr, w)
    ones = np.ones((1, m))
    solve_qp = pytest.importorskip("qpsolvers").solve_qp
    ref = solve_qp(
        Gr.numpy(), np.zeros(m), -np.eye(m), np.zeros(m), ones, np.ones(1), solver="quadprog"
    )
    assert ref is not None
    assert rel_err(w, torch.from_numpy(ref)) <= 1e-7


def test_mgda_edge_cases() -> None:
    torch.testing.assert_close(
        MGDA()(torch.zeros(4, 4, dtype=F64)), torch.full((4,), 0.25, dtype=F64)
    )
    assert torch.equal(MGDA()(torch.tensor([[2.0]])), torch.tensor([1.0]))
    # Two opposite gradients: the min-norm point of the segment is the origin, w = (½, ½).
    G = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(MGDA()(G), torch.tensor([0.5, 0.5], dtype=F64))


# ------------------------------------------------------------------------- the host (DAQP) path


@pytest.mark.parametrize(
    ("m", "rank", "pref"),
    [(1, 1, False), (5, 2, True), (16, 4, False), (16, 4, True), (128, 9, False)],
)
def test_upgrad_host_path_matches_torch_path_and_quadprog(m: int, rank: int, pref: bool) -> None:
    G = random_gramian(m, rank, seed=m + rank)
    p = torch.rand(m, generator=torch.Generator().manual_seed(m), dtype=F64) + 0.1 if pref else None
    fast = UPGrad(p)(G)
    fast32 = UPGrad(p)(G.float())
    slow = UPGrad(p, solver=SolverOptions(path="pivoting"))(G)
    U = torch.diag(p) if p is not None else upgrad_rows(m)
    expected = quadprog_rows(regularised(G), U).sum(dim=0)
    assert rel_err(fast, slow) <= 1e-12
    assert rel_err(fast, expected) <= 1e-8
    assert fast32.dtype == torch.float32 and rel_err(fast32, slow) <= 1e-3


def test_upgrad_host_path_edge_cases() -> None:
    tiny = 1e-6 * torch.eye(4, dtype=F64)  # trace < norm_eps: G̃ = reg_eps·I, w = pref
    torch.testing.assert_close(UPGrad()(tiny), torch.full((4,), 0.25, dtype=F64))
    bad = random_gramian(6, 3, seed=0)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        UPGrad()(bad)
    with pytest.raises(ValueError, match="pref_vector"):
        UPGrad(torch.ones(3))(random_gramian(6, 3, seed=1))
