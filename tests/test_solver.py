"""The dual-cone solver, on every path, against its KKT conditions and independent solvers.

Problem: ``v = argmin vᵀGv s.t. v ≥ u`` (one per row ``u``). KKT: ``v ≥ u``, ``Gv ≥ 0``,
``(v − u) ⊙ Gv = 0``. Paths: DAQP (small CPU problems, verified, finished by the pivoting loop),
pivoting (the loop, a sync per step), lock-step (the same loop with bounded syncs, as
accelerators use it, forced here on the CPU).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from oracle import relative_error
from qp import (
    F64,
    assert_kkt,
    brute_force,
    cross_entropy_gramian,
    normalised_gramian,
    quadprog_rows,
    random_gramian,
    regularised,
    upgrad_rows,
)
from torch import Tensor

from pjd_optim.solver import (
    SolverOptions,
    pivoting,
    project_dual_cone,
    solve_lcp,
)
from pjd_optim.solver import active_set as solver_active_set

pytestmark = pytest.mark.usefixtures("single_thread")

PATHS = {
    "daqp": SolverOptions(path="daqp"),
    "pivoting": SolverOptions(path="pivoting"),
    "lockstep": SolverOptions(path="lockstep"),
}


@pytest.fixture(params=sorted(PATHS))
def path(request: pytest.FixtureRequest) -> SolverOptions:
    options: SolverOptions = PATHS[request.param]
    return options


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
def test_kkt_upgrad_rows(m: int, rank: int, kind: str, path: SolverOptions) -> None:
    G = normalised_gramian(m, rank, kind, seed=m * 7 + rank)
    U = upgrad_rows(m)
    V = project_dual_cone(G, U, path)
    assert V.shape == (m, m) and V.dtype == F64
    assert_kkt(G, U, V)


@pytest.mark.parametrize("m", [1, 4, 30, 90])
def test_kkt_general_lower_bounds(m: int, path: SolverOptions) -> None:
    """Arbitrary rows u (negative entries, several nonzeros, zero rows)."""
    G = normalised_gramian(m, max(1, m // 2), seed=m)
    U = torch.randn(7, m, generator=torch.Generator().manual_seed(m + 1), dtype=F64)
    U[0] = 0.0
    V = project_dual_cone(G, U, path)
    assert_kkt(G, U, V)
    assert torch.equal(V[0], U[0])


@pytest.mark.parametrize("m", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("kind", ["gaussian", "conflicting", "scaled"])
def test_brute_force(m: int, kind: str, path: SolverOptions) -> None:
    G = normalised_gramian(m, max(1, m // 2) if kind == "gaussian" else m + 1, kind, seed=10 * m)
    gen = torch.Generator().manual_seed(m)
    U = torch.cat([upgrad_rows(m), torch.randn(3, m, generator=gen, dtype=F64)])
    V = project_dual_cone(G, U, path)
    expected = torch.stack([brute_force(G, u) for u in U])
    torch.testing.assert_close(V, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("m", "rank", "kind"),
    [(5, 2, "gaussian"), (24, 12, "conflicting"), (64, 32, "gaussian"), (64, 128, "scaled")],
)
def test_matches_quadprog(m: int, rank: int, kind: str, path: SolverOptions) -> None:
    G = normalised_gramian(m, rank, kind, seed=m + rank)
    U = upgrad_rows(m)
    V = project_dual_cone(G, U, path)
    expected = quadprog_rows(G, U)
    assert relative_error(V, expected) <= 1e-8


@pytest.mark.parametrize(("m", "mixed"), [(300, None), (200, True), (200, False)])
def test_kkt_large_free_sets(m: int, mixed: bool | None) -> None:
    """Large free sets (float32 factorisation + refinement when mixed) remain exact."""
    G = normalised_gramian(m, m // 2, seed=m)
    U = upgrad_rows(m)
    for options in (
        SolverOptions(mixed_precision=mixed),
        SolverOptions(path="lockstep", mixed_precision=mixed),
    ):
        assert_kkt(G, U, project_dual_cone(G, U, options), rtol=1e-9)


def test_mixed_and_double_precision_agree() -> None:
    G = normalised_gramian(200, 100, seed=3)
    U = upgrad_rows(200)
    a = project_dual_cone(G, U, SolverOptions(mixed_precision=True))
    b = project_dual_cone(G, U, SolverOptions(mixed_precision=False))
    assert relative_error(a, b) <= 1e-11


@pytest.mark.parametrize("warm_start_iter", [0, 5])
def test_pivoting_alone_converges(warm_start_iter: int) -> None:
    """Without (or with a poor) warm start, block pivoting + Murty's rule still terminates."""
    G = normalised_gramian(60, 30, "conflicting", seed=1)
    U = upgrad_rows(60)
    V = project_dual_cone(G, U, SolverOptions(path="pivoting", warm_start_iter=warm_start_iter))
    assert_kkt(G, U, V)


@pytest.mark.parametrize(("m", "rank"), [(6, 3), (8, 8), (40, 20), (70, 35)])
@pytest.mark.parametrize("lockstep", [False, True])
def test_the_stall_policy_is_exact(
    m: int, rank: int, lockstep: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``patience=0``: a row takes Murty's single pivot at every step that does not lower its
    count of infeasible indices (from the sign guess, on conflicting rank-deficient Gramians).
    The small problems finish that way; on the larger ones some rows are left after
    ``STALL_STEPS`` and finish with the active-set method. Exact either way."""
    calls: list[int] = []

    def counting(M: Tensor, Q: Tensor, *rest: Any) -> Tensor:
        calls.append(Q.shape[0])
        return solver_active_set.active_set(M, Q, *rest)

    monkeypatch.setattr(pivoting, "active_set", counting)
    G = normalised_gramian(m, rank, "conflicting", seed=m)
    U = upgrad_rows(m)
    path = "lockstep" if lockstep else "pivoting"
    V = project_dual_cone(G, U, SolverOptions(path=path, warm_start_iter=0, patience=0))
    assert (calls == []) == (m <= 8), calls
    assert_kkt(G, U, V)
    expected = torch.stack([brute_force(G, u) for u in U]) if m <= 8 else quadprog_rows(G, U)
    torch.testing.assert_close(V, expected, rtol=1e-8, atol=1e-11)


def test_ill_conditioned_matches_quadprog(path: SolverOptions) -> None:
    """κ(G) ≈ 1e6 (regularisation 1e-7): long pivoting paths, still exact."""
    G = regularised(random_gramian(64, 33, seed=2064), reg_eps=1e-7)
    U = upgrad_rows(64)
    V = project_dual_cone(G, U, path)
    expected = quadprog_rows(G, U)
    assert relative_error(V, expected) <= 1e-7


@pytest.mark.parametrize("name", ["pivoting", "lockstep"])
def test_iteration_bound_raises(name: str) -> None:
    G = normalised_gramian(40, 20, "conflicting", seed=2)
    U = upgrad_rows(40)
    options = SolverOptions(path=name, warm_start_iter=0, max_iter=1)
    with pytest.raises(RuntimeError, match="did not converge"):
        project_dual_cone(G, U, options)


def test_no_conflict_returns_lower_bounds(path: SolverOptions) -> None:
    G = normalised_gramian(20, 20, "aligned", seed=0)
    U = torch.eye(20, dtype=F64) * torch.arange(1.0, 21.0, dtype=F64)
    assert torch.equal(project_dual_cone(G, U, path), U)


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e8, 1e30])
def test_scale_invariance(scale: float, path: SolverOptions) -> None:
    """v does not depend on the scale of G (constraints and objective are homogeneous)."""
    G = normalised_gramian(30, 15, "scaled", seed=4)
    U = upgrad_rows(30)
    torch.testing.assert_close(
        project_dual_cone(scale * G, U, path), project_dual_cone(G, U, path), rtol=1e-9, atol=1e-14
    )


def test_duplicated_gradients(path: SolverOptions) -> None:
    J = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    J = torch.cat([J, J[:3], -J[:2]])  # duplicated and opposite gradients
    G = J @ J.T
    G = regularised(G)
    U = upgrad_rows(11)
    V = project_dual_cone(G, U, path)
    assert_kkt(G, U, V)
    torch.testing.assert_close(V, quadprog_rows(G, U), rtol=1e-7, atol=1e-10)


def test_float32_and_output_dtype(path: SolverOptions) -> None:
    G = normalised_gramian(50, 25, seed=5)
    U = upgrad_rows(50)
    exact = project_dual_cone(G, U, path)
    out = project_dual_cone(G.float(), U.float(), path)
    assert out.dtype == torch.float32
    assert relative_error(out.double(), exact) <= 1e-5
    options = SolverOptions(dtype=torch.float32, path=path.path)
    low = project_dual_cone(G, U, options)
    assert low.dtype == F64
    assert relative_error(low, exact) <= 1e-3


def test_empty_and_trivial_shapes(path: SolverOptions) -> None:
    G = normalised_gramian(4, 4, seed=6)
    assert project_dual_cone(G, torch.zeros(0, 4, dtype=F64), path).shape == (0, 4)
    one = project_dual_cone(torch.tensor([[2.0]], dtype=F64), torch.tensor([[0.5], [-1.0]]), path)
    torch.testing.assert_close(one, torch.tensor([[0.5], [0.0]], dtype=F64))


def test_small_chunks_give_the_same_answer() -> None:
    G = normalised_gramian(70, 35, seed=7)
    U = upgrad_rows(70)
    for options in (SolverOptions(path="pivoting"), SolverOptions(path="lockstep")):
        chunked = SolverOptions(path=options.path, max_chunk_bytes=1)
        torch.testing.assert_close(
            project_dual_cone(G, U, chunked), project_dual_cone(G, U, options), rtol=0, atol=1e-14
        )


def test_invalid_inputs(path: SolverOptions) -> None:
    G = normalised_gramian(3, 3, seed=8)
    with pytest.raises(ValueError, match="square"):
        project_dual_cone(torch.zeros(3, 4, dtype=F64), torch.zeros(1, 4, dtype=F64), path)
    with pytest.raises(ValueError, match="shape"):
        project_dual_cone(G, torch.zeros(2, 4, dtype=F64), path)
    with pytest.raises(ValueError, match="shape"):
        project_dual_cone(G, torch.zeros(3, dtype=F64), path)


def test_not_positive_definite_raises() -> None:
    with pytest.raises(ValueError, match="positive definite"):
        project_dual_cone(-torch.eye(5, dtype=F64), torch.eye(5, dtype=F64))
    J = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises((ValueError, RuntimeError)):
        project_dual_cone(J @ J.T - 1e-3 * torch.eye(6, dtype=F64), torch.eye(6, dtype=F64))


def test_lcp_form_kkt(path: SolverOptions) -> None:
    """solve_lcp: x ≥ 0, Mx + q ≥ 0, xᵀ(Mx + q) = 0 (used by MGDA with q = −1)."""
    M = normalised_gramian(25, 12, "scaled", seed=9)
    q = torch.cat([-torch.ones(1, 25, dtype=F64), torch.randn(4, 25, dtype=F64)])
    X = solve_lcp(M, q, path)
    Y = X @ M + q
    assert X.min().item() >= 0.0
    assert Y.min().item() >= -1e-10 * Y.abs().max().item()
    assert (X * Y).abs().max().item() <= 1e-10 * X.abs().max().item() * Y.abs().max().item()


@pytest.mark.parametrize("forced", [None, "lockstep"])
def test_accelerator_paths_match_the_cpu(accelerator: str, forced: str | None) -> None:
    """On an accelerator: the host copy (small m) and the lock-step path (larger m)."""
    for m in (16, 128):
        G = normalised_gramian(m, m // 2, seed=10 + m)
        U = upgrad_rows(m)
        V = project_dual_cone(G.to(accelerator), U.to(accelerator), SolverOptions(path=forced))
        assert V.device.type == accelerator
        torch.testing.assert_close(V.cpu(), project_dual_cone(G, U), rtol=1e-9, atol=1e-13)


# ------------------------------------------------------------------------- hard small problems


def regression_gramian(m: int, seed: int) -> Tensor:
    """MSE of a scalar output: g_i = r_i ∇f(x_i) with ∇f of low rank (two conflicting groups)."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(m, 4, generator=gen, dtype=F64).abs() * torch.randn(m, 1, generator=gen)
    G = J @ J.T
    return regularised(G)


HARD_CASES = {
    "regression m=16": lambda: regression_gramian(16, 0),
    "regression m=16 b": lambda: regression_gramian(16, 1),
    "cross-entropy m=128": lambda: cross_entropy_gramian(128, 10, 0),
    "cross-entropy m=64": lambda: cross_entropy_gramian(64, 4, 1),
    "rank-deficient m=16": lambda: normalised_gramian(16, 3, seed=3),
    "rank-deficient m=24": lambda: normalised_gramian(24, 2, "scaled", seed=4),
    "full rank m=30": lambda: normalised_gramian(30, 60, "conflicting", seed=5),
}


@pytest.mark.parametrize("case", list(HARD_CASES))
def test_default_path_matches_quadprog(case: str) -> None:
    G = HARD_CASES[case]()
    U = upgrad_rows(G.shape[0])
    V = project_dual_cone(G, U)
    assert_kkt(G, U, V, rtol=1e-10)
    expected = quadprog_rows(G, U)
    assert relative_error(V, expected) <= 1e-8


@pytest.mark.parametrize("case", list(HARD_CASES))
def test_all_paths_agree(case: str) -> None:
    G = HARD_CASES[case]()
    U = upgrad_rows(G.shape[0])
    answers = [project_dual_cone(G, U, options) for options in PATHS.values()]
    for other in answers[1:]:
        assert relative_error(other, answers[0]) <= 1e-12


@pytest.mark.parametrize("m", [3, 8, 40, 120])
def test_general_rows_and_brute_force(m: int, path: SolverOptions) -> None:
    """solve_lcp without a known minimiser (the dual right-hand sides from ``H``)."""
    G = cross_entropy_gramian(m, 3, seed=m)
    U = torch.randn(5, m, generator=torch.Generator().manual_seed(m), dtype=F64)
    X = solve_lcp(G, U @ G, path)
    assert_kkt(G, U, U + X, rtol=1e-10)
    if m <= 8:
        expected = torch.stack([brute_force(G, u) for u in U])
        torch.testing.assert_close(U + X, expected, rtol=1e-9, atol=1e-12)
