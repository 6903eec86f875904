"""The pivoting loop's machinery through its options and counters: rows keeping most indices
free take the dual systems (not beyond ``MAX_KAPPA``), a sign guess far off restarts from FISTA,
lock-step rounds solve only the rows left and rows that outgrow the padded size wait, the inverse
from a Cholesky factor, float32 factorisations that fall short switch to float64. Oracles: the
KKT conditions per row, quadprog, ``torch.linalg.inv``."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from oracle import relative_error
from qp import (
    F64,
    assert_kkt,
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

pytestmark = pytest.mark.usefixtures("single_thread")


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
