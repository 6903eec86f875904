"""Tests of the batched dual-cone solver against its KKT conditions and independent solvers.

Problem: v = argmin vᵀGv s.t. v ≥ u (one per row u). KKT: v ≥ u, Gv ≥ 0, (v − u) ⊙ Gv = 0.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from qpsolvers import solve_qp
from torch import Tensor

from pjd_optim import _dual_cone
from pjd_optim._dual_cone import project_dual_cone, solve_lcp

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every problem to the torch solver (options such as chunk sizes only matter there)."""
    monkeypatch.setattr(_dual_cone, "_NUMPY_MAX_M", 0)


def make_gramian(m: int, rank: int, kind: str, seed: int) -> Tensor:
    """J Jᵀ / tr + 1e-4·I for a random J of the given rank and conflict structure."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(m, rank, generator=gen, dtype=F64)
    if kind == "aligned":  # all pairwise inner products positive: no conflict
        J = J.abs() + 1.0
    elif kind == "conflicting":  # gradients nearly cancel: strong conflicts
        J = J - J.mean(dim=0, keepdim=True) + 0.05 * J.abs().mean()
    elif kind == "scaled":  # very different gradient norms
        J = J * torch.exp(3.0 * torch.randn(m, 1, generator=gen, dtype=F64))
    G = J @ J.T
    return G / G.trace() + 1e-4 * torch.eye(m, dtype=F64)


def assert_kkt(G: Tensor, U: Tensor, V: Tensor, rtol: float = 1e-9) -> None:
    """The three KKT conditions, with tolerances relative to the problem's scale."""
    scale_v = max(V.abs().max().item(), U.abs().max().item(), 1e-300)
    scale_y = scale_v * G.abs().max().item()
    Y = V @ G
    assert (V - U).min().item() >= -rtol * scale_v, "primal feasibility v >= u"
    assert Y.min().item() >= -rtol * scale_y, "dual feasibility Gv >= 0"
    assert ((V - U) * Y).abs().max().item() <= rtol * scale_v * scale_y, "complementarity"


def brute_force(G: Tensor, u: Tensor) -> Tensor:
    """Enumerate all 2^m free sets; return the unique one satisfying the KKT conditions."""
    m = G.shape[0]
    q = G @ u
    for bits in itertools.product([False, True], repeat=m):
        free = torch.tensor(bits)
        x = torch.zeros(m, dtype=F64)
        if free.any():
            x[free] = torch.linalg.solve(G[free][:, free], -q[free])
        y = G @ x + q
        if (x >= -1e-12).all() and (y[~free] >= -1e-12).all():
            return u + x.clamp_min(0.0)
    raise AssertionError("no KKT point found")


def quadprog_rows(G: Tensor, U: Tensor) -> Tensor:
    """Reference: one quadprog QP per row, min ½vᵀGv s.t. −v ≤ −u."""
    Gn = G.numpy()
    out = []
    for u in U.numpy():
        m = u.shape[0]
        v = solve_qp(Gn, np.zeros(m), -np.eye(m), -u, solver="quadprog")
        assert v is not None
        out.append(v)
    return torch.from_numpy(np.stack(out))


CASES = [
    (m, rank, kind)
    for m in (1, 2, 3, 5, 8, 17, 40, 100)
    for rank, kind in ((max(1, m // 3), "gaussian"), (m, "gaussian"), (2 * m, "conflicting"))
] + [
    (m, rank, kind)
    for m in (6, 33, 120)
    for rank, kind in ((m, "aligned"), (m // 2, "scaled"), (m // 2, "conflicting"))
]


@pytest.mark.parametrize(("m", "rank", "kind"), CASES)
def test_kkt_upgrad_rows(m: int, rank: int, kind: str) -> None:
    G = make_gramian(m, rank, kind, seed=m * 7 + rank)
    U = torch.eye(m, dtype=F64) / m
    V = project_dual_cone(G, U)
    assert V.shape == (m, m) and V.dtype == F64
    assert_kkt(G, U, V)


@pytest.mark.parametrize("m", [1, 4, 30, 90])
def test_kkt_general_lower_bounds(m: int) -> None:
    """Arbitrary rows u (negative entries, several nonzeros, zero rows)."""
    G = make_gramian(m, max(1, m // 2), "gaussian", seed=m)
    gen = torch.Generator().manual_seed(m + 1)
    U = torch.randn(7, m, generator=gen, dtype=F64)
    U[0] = 0.0
    V = project_dual_cone(G, U)
    assert_kkt(G, U, V)
    assert torch.equal(V[0], U[0])


@pytest.mark.parametrize(("m", "mixed"), [(300, None), (180, True), (180, False)])
def test_kkt_large(m: int, mixed: bool | None) -> None:
    """Large free sets (float32 factorisation + refinement when mixed) remain exact."""
    G = make_gramian(m, m // 2, "gaussian", seed=m)
    U = torch.eye(m, dtype=F64) / m
    V = project_dual_cone(G, U, mixed_precision=mixed)
    assert_kkt(G, U, V, rtol=1e-9)


@pytest.mark.usefixtures("torch_path")
def test_mixed_and_double_precision_agree() -> None:
    G = make_gramian(200, 100, "gaussian", seed=3)
    U = torch.eye(200, dtype=F64) / 200
    a = project_dual_cone(G, U, mixed_precision=True)
    b = project_dual_cone(G, U, mixed_precision=False)
    assert (a - b).abs().max().item() <= 1e-11 * b.abs().max().item()


@pytest.mark.parametrize("m", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("kind", ["gaussian", "conflicting", "scaled"])
def test_brute_force(m: int, kind: str) -> None:
    G = make_gramian(m, max(1, m // 2) if kind == "gaussian" else m + 1, kind, seed=10 * m)
    gen = torch.Generator().manual_seed(m)
    U = torch.cat([torch.eye(m, dtype=F64) / m, torch.randn(3, m, generator=gen, dtype=F64)])
    V = project_dual_cone(G, U)
    expected = torch.stack([brute_force(G, u) for u in U])
    torch.testing.assert_close(V, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("m", "rank", "kind"),
    [(5, 2, "gaussian"), (24, 12, "conflicting"), (64, 32, "gaussian"), (64, 128, "scaled")],
)
def test_matches_quadprog(m: int, rank: int, kind: str) -> None:
    G = make_gramian(m, rank, kind, seed=m + rank)
    U = torch.eye(m, dtype=F64) / m
    V = project_dual_cone(G, U)
    expected = quadprog_rows(G, U)
    assert (V - expected).abs().max().item() <= 1e-8 * expected.abs().max().item()


@pytest.mark.usefixtures("torch_path")
@pytest.mark.parametrize("warm_start_iter", [0, 5])
def test_pivoting_alone_converges(warm_start_iter: int) -> None:
    """Without (or with a poor) warm start, block pivoting + Murty's rule still terminates."""
    G = make_gramian(60, 30, "conflicting", seed=1)
    U = torch.eye(60, dtype=F64) / 60
    V = project_dual_cone(G, U, warm_start_iter=warm_start_iter)
    assert_kkt(G, U, V)


@pytest.mark.parametrize(("m", "rank"), [(6, 3), (8, 8), (40, 20), (70, 35)])
def test_primal_active_set_fallback(m: int, rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows left after the pivoting budget go to the monotone active-set method: still exact."""
    monkeypatch.setattr(_dual_cone, "_BPP_STEPS", 1)
    monkeypatch.setattr(_dual_cone, "_NUMPY_MAX_M", 0)  # the torch solver
    G = make_gramian(m, rank, "conflicting", seed=m)
    U = torch.eye(m, dtype=F64) / m
    V = project_dual_cone(G, U, warm_start_iter=0)
    assert_kkt(G, U, V)
    expected = torch.stack([brute_force(G, u) for u in U]) if m <= 8 else quadprog_rows(G, U)
    torch.testing.assert_close(V, expected, rtol=1e-8, atol=1e-11)


def test_ill_conditioned_matches_quadprog() -> None:
    """κ(G) ≈ 1e6 (regularisation 1e-7): long pivoting paths end in the fallback, still exact."""
    G = make_gramian(64, 33, "gaussian", seed=2064) + (1e-7 - 1e-4) * torch.eye(64, dtype=F64)
    U = torch.eye(64, dtype=F64) / 64
    V = project_dual_cone(G, U)
    expected = quadprog_rows(G, U)
    assert (V - expected).abs().max().item() <= 1e-7 * expected.abs().max().item()


@pytest.mark.parametrize("numpy_max_m", [0, 160])
def test_iteration_bound_raises(numpy_max_m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dual_cone, "_NUMPY_MAX_M", numpy_max_m)
    G = make_gramian(40, 20, "conflicting", seed=2)
    U = torch.eye(40, dtype=F64) / 40
    with pytest.raises(RuntimeError, match="did not converge"):
        project_dual_cone(G, U, warm_start_iter=0, max_iter=1)


def test_no_conflict_returns_lower_bounds() -> None:
    G = make_gramian(20, 20, "aligned", seed=0)
    U = torch.eye(20, dtype=F64) * torch.arange(1.0, 21.0, dtype=F64)
    assert torch.equal(project_dual_cone(G, U), U)


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e8, 1e30])
def test_scale_invariance(scale: float) -> None:
    """v does not depend on the scale of G (constraints and objective are homogeneous)."""
    G = make_gramian(30, 15, "scaled", seed=4)
    U = torch.eye(30, dtype=F64) / 30
    torch.testing.assert_close(
        project_dual_cone(scale * G, U), project_dual_cone(G, U), rtol=1e-9, atol=1e-14
    )


def test_duplicated_gradients() -> None:
    J = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    J = torch.cat([J, J[:3], -J[:2]])  # duplicated and opposite gradients
    G = J @ J.T
    G = G / G.trace() + 1e-4 * torch.eye(11, dtype=F64)
    U = torch.eye(11, dtype=F64) / 11
    V = project_dual_cone(G, U)
    assert_kkt(G, U, V)
    torch.testing.assert_close(V, quadprog_rows(G, U), rtol=1e-7, atol=1e-10)


def test_float32_and_output_dtype() -> None:
    G = make_gramian(50, 25, "gaussian", seed=5)
    U = torch.eye(50, dtype=F64) / 50
    exact = project_dual_cone(G, U)
    out = project_dual_cone(G.float(), U.float())
    assert out.dtype == torch.float32
    assert (out.double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
    low = project_dual_cone(G, U, dtype=torch.float32)
    assert low.dtype == F64
    assert (low - exact).abs().max().item() <= 1e-3 * exact.abs().max().item()


def test_empty_and_trivial_shapes() -> None:
    G = make_gramian(4, 4, "gaussian", seed=6)
    assert project_dual_cone(G, torch.zeros(0, 4, dtype=F64)).shape == (0, 4)
    one = project_dual_cone(torch.tensor([[2.0]], dtype=F64), torch.tensor([[0.5], [-1.0]]))
    torch.testing.assert_close(one, torch.tensor([[0.5], [0.0]], dtype=F64))


@pytest.mark.usefixtures("torch_path")
def test_small_chunks_give_the_same_answer() -> None:
    G = make_gramian(70, 35, "gaussian", seed=7)
    U = torch.eye(70, dtype=F64) / 70
    torch.testing.assert_close(
        project_dual_cone(G, U, max_chunk_bytes=1), project_dual_cone(G, U), rtol=0, atol=1e-14
    )


@pytest.mark.usefixtures("torch_path")
@pytest.mark.parametrize("mixed", [False, True])
def test_chunks_spread_over_threads(mixed: bool) -> None:
    """CPU chunks solved by a thread pool (one kernel thread each) give the same answer."""
    G = make_gramian(150, 75, "gaussian", seed=11)
    U = torch.eye(150, dtype=F64) / 150
    expected = project_dual_cone(G, U, mixed_precision=mixed)  # one thread: no pool
    torch.set_num_threads(2)
    out = project_dual_cone(G, U, mixed_precision=mixed, max_chunk_bytes=1 << 16)
    assert torch.get_num_threads() == 2  # restored after the pool
    assert (out - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()


def test_invalid_inputs() -> None:
    G = make_gramian(3, 3, "gaussian", seed=8)
    with pytest.raises(ValueError, match="square"):
        project_dual_cone(torch.zeros(3, 4, dtype=F64), torch.zeros(1, 4, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        project_dual_cone(G, torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        project_dual_cone(G, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="positive definite"):
        project_dual_cone(-torch.eye(3, dtype=F64), torch.eye(3, dtype=F64))


def test_lcp_form_kkt() -> None:
    """solve_lcp: x ≥ 0, Mx + q ≥ 0, xᵀ(Mx + q) = 0 (used by MGDA with q = −1)."""
    M = make_gramian(25, 12, "scaled", seed=9)
    q = torch.cat([-torch.ones(1, 25, dtype=F64), torch.randn(4, 25, dtype=F64)])
    X = solve_lcp(M, q)
    Y = X @ M + q
    assert X.min().item() >= 0.0
    assert Y.min().item() >= -1e-10 * Y.abs().max().item()
    assert (X * Y).abs().max().item() <= 1e-10 * X.abs().max().item() * Y.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    G = make_gramian(128, 64, "gaussian", seed=10)
    U = torch.eye(128, dtype=F64) / 128
    V = project_dual_cone(G.cuda(), U.cuda())
    assert V.device.type == "cuda"
    torch.testing.assert_close(V.cpu(), project_dual_cone(G, U), rtol=1e-9, atol=1e-13)


# ----------------------------------------------------------------------------- NumPy path


def conflicting_gramian(m: int, n_classes: int, seed: int) -> Tensor:
    """Cross-entropy-like Gramian (normalised + 1e-4·I): G_ij = (p_i − e_yi)·(p_j − e_yj) h_i·h_j.

    Samples of different classes conflict (about 1 − 1/n_classes of the pairs), as in an MLP.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = 0.3 * torch.randn(m, n_classes, generator=gen, dtype=F64)
    labels = torch.randint(0, n_classes, (m,), generator=gen)
    C = logits.softmax(dim=1) - torch.nn.functional.one_hot(labels, n_classes).to(F64)
    h = torch.randn(m, 32, generator=gen, dtype=F64).relu() + 0.1
    G = (C @ C.T) * (h @ h.T)
    return G / G.trace() + 1e-4 * torch.eye(m, dtype=F64)


def seed_like_gramian(m: int, seed: int) -> Tensor:
    """MSE of a scalar output: g_i = r_i ∇f(x_i) with ∇f of low rank (two conflicting groups)."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(m, 4, generator=gen, dtype=F64).abs() * torch.randn(m, 1, generator=gen)
    G = J @ J.T
    return G / G.trace() + 1e-4 * torch.eye(m, dtype=F64)


NUMPY_CASES = {
    "seed m=16": lambda: seed_like_gramian(16, 0),
    "seed m=16 b": lambda: seed_like_gramian(16, 1),
    "conflicting m=128": lambda: conflicting_gramian(128, 10, 0),
    "conflicting m=64": lambda: conflicting_gramian(64, 4, 1),
    "rank-deficient m=16": lambda: make_gramian(16, 3, "gaussian", seed=3),
    "rank-deficient m=24": lambda: make_gramian(24, 2, "scaled", seed=4),
    "full rank m=30": lambda: make_gramian(30, 60, "conflicting", seed=5),
}


@pytest.fixture
def torch_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if any row reaches the torch solver (the NumPy path must finish alone)."""

    def forbidden(*args: object) -> Tensor:
        raise AssertionError("the NumPy path handed rows to the torch solver")

    monkeypatch.setattr(_dual_cone, "_solve_torch", forbidden)


@pytest.mark.usefixtures("torch_forbidden")
@pytest.mark.parametrize("case", list(NUMPY_CASES))
def test_numpy_path_matches_quadprog(case: str) -> None:
    G = NUMPY_CASES[case]()
    m = G.shape[0]
    U = torch.eye(m, dtype=F64) / m
    V = project_dual_cone(G, U)
    assert_kkt(G, U, V, rtol=1e-10)
    expected = quadprog_rows(G, U)
    assert (V - expected).abs().max().item() <= 1e-8 * expected.abs().max().item()


@pytest.mark.parametrize("case", list(NUMPY_CASES))
def test_numpy_and_torch_paths_agree(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    G = NUMPY_CASES[case]()
    m = G.shape[0]
    U = torch.eye(m, dtype=F64) / m
    fast = project_dual_cone(G, U)
    monkeypatch.setattr(_dual_cone, "_NUMPY_MAX_M", 0)
    slow = project_dual_cone(G, U)
    assert (fast - slow).abs().max().item() <= 1e-12 * slow.abs().max().item()


@pytest.mark.usefixtures("torch_forbidden")
@pytest.mark.parametrize("m", [3, 8, 40])
def test_numpy_path_general_rows_and_brute_force(m: int) -> None:
    """solve_lcp without a known minimiser (p = −QH, gathered path for m = 40)."""
    G = conflicting_gramian(m, 3, seed=m)
    gen = torch.Generator().manual_seed(m)
    U = torch.randn(5, m, generator=gen, dtype=F64)
    X = solve_lcp(G, U @ G)
    assert_kkt(G, U, U + X, rtol=1e-10)
    if m <= 8:
        expected = torch.stack([brute_force(G, u) for u in U])
        torch.testing.assert_close(U + X, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.usefixtures("torch_forbidden")
@pytest.mark.parametrize(("m", "rank"), [(8, 4), (16, 8), (40, 20), (64, 32)])
def test_numpy_active_set_fallback(m: int, rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows finished by the NumPy Lawson–Hanson method after one pivoting step are exact."""
    from pjd_optim import _dual_cone_small

    monkeypatch.setattr(_dual_cone_small, "_BPP_STEPS", 1)
    monkeypatch.setattr(_dual_cone_small, "_MAX_BLOCK", m)
    G = make_gramian(m, rank, "gaussian", seed=m)
    U = torch.eye(m, dtype=F64) / m
    V = project_dual_cone(G, U)
    assert_kkt(G, U, V, rtol=1e-10)
    expected = torch.stack([brute_force(G, u) for u in U]) if m <= 8 else quadprog_rows(G, U)
    torch.testing.assert_close(V, expected, rtol=1e-8, atol=1e-11)


def test_numpy_path_declines_large_and_ill_conditioned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large dual/primal systems and κ > 1e7 go to the torch solver, with the same answer."""
    calls: list[int] = []
    solve_torch = _dual_cone._solve_torch

    def counting(matrix: Tensor, q: Tensor, *options: object) -> Tensor:
        calls.append(q.shape[0])
        return solve_torch(matrix, q, *options)  # type: ignore[arg-type]

    monkeypatch.setattr(_dual_cone, "_solve_torch", counting)
    G = make_gramian(128, 64, "gaussian", seed=12)  # |F| ≈ |A| ≈ 64
    U = torch.eye(128, dtype=F64) / 128
    assert_kkt(G, U, project_dual_cone(G, U))
    ill = make_gramian(20, 5, "gaussian", seed=13) + (1e-9 - 1e-4) * torch.eye(20, dtype=F64)
    U = torch.eye(20, dtype=F64) / 20
    assert_kkt(ill, U, project_dual_cone(ill, U))  # quadprog itself is inexact at κ ≈ 1e9
    assert len(calls) == 2


@pytest.mark.usefixtures("torch_forbidden")
def test_numpy_path_no_conflict_and_float32() -> None:
    G = make_gramian(16, 16, "aligned", seed=0)
    U = torch.eye(16, dtype=F64) / 16
    assert torch.equal(project_dual_cone(G, U), U)
    G = seed_like_gramian(16, 2)
    exact = project_dual_cone(G, U)
    out = project_dual_cone(G.float(), U.float())
    assert out.dtype == torch.float32
    assert (out.double() - exact).abs().max().item() <= 1e-4 * exact.abs().max().item()


def test_numpy_path_not_positive_definite_raises() -> None:
    with pytest.raises(ValueError, match="positive definite"):
        project_dual_cone(-torch.eye(5, dtype=F64), torch.eye(5, dtype=F64))
    J = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises((ValueError, RuntimeError)):
        project_dual_cone(J @ J.T - 1e-3 * torch.eye(6, dtype=F64), torch.eye(6, dtype=F64))
