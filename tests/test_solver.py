"""The dual-cone solver, on every path, against its KKT conditions and independent solvers.

Problem: ``v = argmin vᵀGv s.t. v ≥ u`` (one per row ``u``). KKT: ``v ≥ u``, ``Gv ≥ 0``,
``(v − u) ⊙ Gv = 0``. Paths: DAQP (small CPU problems, verified, finished by the pivoting loop),
pivoting (the loop, a sync per step), lock-step (the same loop with bounded syncs, as
accelerators use it, forced here on the CPU).
"""

from __future__ import annotations

import itertools
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
    _common,
    first_order,
    pivoting,
    project_dual_cone,
    solve_lcp,
    systems,
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


@pytest.fixture
def padded_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int | None]]:
    """Each batched solve of the loop: its rows and its padded size (``None``: the host
    schedule, a sync per step)."""
    calls: list[tuple[int, int | None]] = []
    solve = systems.Systems.solve

    def counting(self: systems.Systems, R: Tensor, sel: Tensor, s: int | None = None) -> Any:
        calls.append((R.shape[0], s))
        return solve(self, R, sel, s)

    monkeypatch.setattr(systems.Systems, "solve", counting)
    return calls


@pytest.fixture
def dual_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows whose candidates came from the dual systems (torch paths), one entry per step."""
    calls: list[int] = []
    candidate = _common.Inverse.candidate

    def counting(self: _common.Inverse, P: Tensor, *rest: Any) -> Any:
        calls.append(P.shape[0])
        return candidate(self, P, *rest)

    monkeypatch.setattr(_common.Inverse, "candidate", counting)
    return calls


@pytest.mark.parametrize("lockstep", [False, True])
@pytest.mark.parametrize("m", [96, 200])
def test_rows_keeping_most_indices_free_use_the_dual_systems(
    m: int, lockstep: bool, dual_calls: list[int], padded_sizes: list[tuple[int, int | None]]
) -> None:
    """Cross-entropy Gramians (most pairs conflict, as for real losses): the loop starts from
    the sign guess and solves the |A|-sized dual systems, which finish every row (the lock-step
    path within its checks: no host step); exact, for UPGrad's rows (``P = −U`` known) and for
    general rows (``P`` from ``H``)."""
    G = cross_entropy_gramian(m, 10, seed=m)
    options = SolverOptions(path="lockstep" if lockstep else "pivoting")
    U = upgrad_rows(m)
    V = project_dual_cone(G, U, options)
    assert dual_calls, "the dual systems were not used"
    assert padded_sizes and all((s is not None) == lockstep for _, s in padded_sizes)
    assert_kkt(G, U, V, rtol=1e-10)
    assert relative_error(V, quadprog_rows(G, U)) <= 1e-8
    dual_calls.clear()
    W = torch.randn(4, m, generator=torch.Generator().manual_seed(m), dtype=F64) - 2.0
    X = solve_lcp(G, W @ G, options)
    assert dual_calls
    assert_kkt(G, W, W + X, rtol=1e-10)
    assert relative_error(W + X, quadprog_rows(G, W)) <= 1e-8


def test_the_dual_systems_are_not_trusted_beyond_max_kappa(
    dual_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """κ₁(M) > MAX_KAPPA: the explicit inverse is not trusted, the primal systems are used."""
    G = cross_entropy_gramian(96, 10, seed=3)
    U = upgrad_rows(96)
    monkeypatch.setattr(_common, "MAX_KAPPA", 1.0)
    V = project_dual_cone(G, U, SolverOptions(path="pivoting"))
    assert not dual_calls
    assert_kkt(G, U, V, rtol=1e-10)
    assert relative_error(V, quadprog_rows(G, U)) <= 1e-8


@pytest.mark.parametrize("m", [96, 200])
def test_a_sign_guess_far_off_restarts_from_fista(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-entropy Gramians: the sign guess leaves few indices active, but the first step
    swaps many (the active sets grow to about a third): the rows restart from FISTA's free sets
    (FISTA runs once, on the rows left); exact."""
    calls: list[int] = []

    def counting(M: Tensor, Q: Tensor, *rest: Any, **kwargs: Any) -> Tensor:
        calls.append(Q.shape[0])
        return first_order.fista(M, Q, *rest, **kwargs)

    monkeypatch.setattr(pivoting, "fista", counting)
    G = cross_entropy_gramian(m, 10, seed=m + 1)
    U = upgrad_rows(m)
    V = project_dual_cone(G, U, SolverOptions(path="pivoting"))
    assert len(calls) == 1 and 0 < calls[0] <= m
    assert_kkt(G, U, V, rtol=1e-10)
    assert relative_error(V, quadprog_rows(G, U)) <= 1e-8


def test_lockstep_rounds_solve_only_the_rows_left(
    padded_sizes: list[tuple[int, int | None]],
) -> None:
    """After each check the lock-step path drops the rows done: the next round's batches hold
    only the rows that check left (after the last check, they continue a sync per step);
    exact."""
    G, U = normalised_gramian(64, 32, seed=5), upgrad_rows(64)
    project_dual_cone(G, U, SolverOptions(path="lockstep", checks=1, steps_per_check=1))
    assert [s is None for _, s in padded_sizes[:2]] == [False, True], padded_sizes
    assert padded_sizes[0][0] == 64
    n_left = padded_sizes[1][0]
    assert 0 < n_left < 64
    padded_sizes.clear()
    V = project_dual_cone(G, U, SolverOptions(path="lockstep", checks=3, steps_per_check=1))
    assert [b for b, _ in padded_sizes[:2]] == [64, n_left], padded_sizes
    assert all(s is not None for _, s in padded_sizes[:3])
    assert_kkt(G, U, V, rtol=1e-10)
    assert relative_error(V, quadprog_rows(G, U)) <= 1e-8


@pytest.mark.parametrize("sync_free", [False, True])
def test_inverse_from_cholesky_matches_linalg_inv(sync_free: bool) -> None:
    """Both forms of ``M⁻¹`` (LAPACK's, and the sync-free one accelerators use) against
    ``torch.linalg.inv``; symmetric."""
    G = cross_entropy_gramian(40, 10, seed=7)
    H = _common.inverse_from_cholesky(torch.linalg.cholesky(G), sync_free)
    assert relative_error(H, torch.linalg.inv(G)) <= 1e-12
    assert torch.equal(H, H.mT)


@pytest.fixture
def solves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int | None, int, torch.dtype | None]]:
    """Each batched solve of the loop: its padded size, its largest selected set and its
    factorisation dtype (``None``: the matrix's)."""
    calls: list[tuple[int | None, int, torch.dtype | None]] = []
    solve = systems.Systems.solve

    def counting(self: systems.Systems, R: Tensor, sel: Tensor, s: int | None = None) -> Any:
        calls.append((s, int(sel.sum(dim=1).max()), self.low))
        return solve(self, R, sel, s)

    monkeypatch.setattr(systems.Systems, "solve", counting)
    return calls


def test_lockstep_rows_whose_systems_outgrow_the_padded_size_wait(
    solves: list[tuple[int | None, int, torch.dtype | None]],
) -> None:
    """Within a round the padded size is fixed; rows whose free set grows past it wait (no
    pivot) and the next round's size fits the rows left; exact."""
    G, U = normalised_gramian(96, 48, "conflicting", seed=96), upgrad_rows(96)
    options = SolverOptions(path="lockstep", warm_start_iter=0, checks=3, steps_per_check=4)
    V = project_dual_cone(G, U, options)
    rounds = [solves[i : i + 4] for i in range(0, 12, 4)]
    assert any(largest > s for s, largest, _ in rounds[0] if s is not None), solves
    for before, after in itertools.pairwise(rounds):
        assert after[0][0] is not None and after[0][0] >= after[0][1]
        assert after[0][0] != before[0][0]  # refitted at the check
    assert_kkt(G, U, V, rtol=1e-10)
    assert relative_error(V, quadprog_rows(G, U)) <= 1e-8


@pytest.mark.parametrize(("m", "reg_eps"), [(96, 1e-9), (200, 1e-10)])
def test_float32_factorisations_that_fall_short_switch_to_float64(
    m: int, reg_eps: float, solves: list[tuple[int | None, int, torch.dtype | None]]
) -> None:
    """Mixed precision on an ill-conditioned Gramian: the float32 factorisations fail or their
    refinement misses float64 accuracy; the rest of the solve runs in float64, exact."""
    G = regularised(random_gramian(m, m // 2, seed=m), reg_eps=reg_eps)
    U = upgrad_rows(m)
    V = project_dual_cone(G, U, SolverOptions(path="pivoting", mixed_precision=True))
    dtypes = [low for _, _, low in solves]
    assert dtypes[0] == torch.float32 and dtypes[1:] == [None] * (len(dtypes) - 1), dtypes
    assert_kkt(G, U, V, rtol=1e-6)  # κ ≈ 1e9: round-off eps·κ of a row's scale
    exact = project_dual_cone(G, U, SolverOptions(path="pivoting", mixed_precision=False))
    assert relative_error(V, exact) <= 1e-9


@pytest.mark.parametrize("s", [None, 5])
@pytest.mark.parametrize("low", [None, torch.float32])
def test_the_batched_free_set_solves(s: int | None, low: torch.dtype | None) -> None:
    """``Systems.solve`` against a solve per row: ``K_SS z_S = r_S``, zero off S; on the
    lock-step schedule (``s`` given) a row whose set outgrows ``s`` is not solved (it waits)."""
    K = normalised_gramian(9, 12, seed=3)
    d = K.diagonal().rsqrt()
    K = K * d.unsqueeze(1) * d  # unit diagonal, as the loop's (the padding is the identity)
    gen = torch.Generator().manual_seed(4)
    sel = torch.rand(7, 9, generator=gen) < 0.5
    sel[0], sel[1], sel[2] = False, True, False
    sel[2, 4] = True  # one index
    R = torch.randn(7, 9, generator=gen, dtype=F64)
    z, ok, cond = systems.Systems(K, low, max_chunk_bytes=1).solve(R, sel, s)
    for row in range(7):
        S = sel[row].nonzero().squeeze(1)
        fits = s is None or S.numel() <= s
        assert bool(ok[row]) == fits
        expected = torch.zeros(9, dtype=F64)
        if fits and S.numel():
            expected[S] = torch.linalg.solve(K[S][:, S], R[row, S])
            block = torch.linalg.eigvalsh(K[S][:, S])
            assert 1.0 <= float(cond[row]) <= float(block[-1] / block[0]) * (1 + 1e-6)
        torch.testing.assert_close(z[row], expected, rtol=1e-12, atol=1e-14)
