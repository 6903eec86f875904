"""The solver's paths through its public options: the plan, the compiled (DAQP) path's
verification and its fall-back to the exact pivoting loop, and the condition-number estimates.

Oracles: quadprog per row, the KKT conditions (per row), ``numpy.linalg.cond``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from oracle import relative_error
from qp import (
    F64,
    assert_kkt,
    cross_entropy_gramian,
    forbid,
    normalised_gramian,
    quadprog_rows,
    random_gramian,
    regularised,
    upgrad_rows,
)

from pjd_optim import DualProj, UPGrad
from pjd_optim.solver import SolverOptions, _common, compiled, pivoting, plan, project_dual_cone

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


def test_the_plan() -> None:
    """Defaults by size, dtype and device; a forced path wins; the host paths need float64."""
    default = SolverOptions()
    assert plan(CPU, F64, _common.DAQP_MAX_M, default) == "daqp"
    assert plan(CPU, F64, _common.DAQP_MAX_M + 1, default) == "pivoting"
    assert plan(CPU, torch.float32, 8, default) == "pivoting"
    cuda = torch.device("cuda")
    assert plan(cuda, F64, default.host_max_m, default) == "daqp"
    assert plan(cuda, F64, default.host_max_m + 1, default) == "lockstep"
    for path in _common.PATHS:
        assert plan(CPU, F64, 1000, SolverOptions(path=path)) == path
    assert plan(CPU, torch.float32, 8, SolverOptions(path="daqp")) == "pivoting"
    with pytest.raises(ValueError, match="Unknown solver path"):
        plan(CPU, F64, 8, SolverOptions(path="simplex"))


def counting_fallback(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows that the DAQP path hands to the exact pivoting loop, one entry per call."""
    calls: list[int] = []
    solve = pivoting.solve_on_host

    def counting(M: Any, Q: Any, *rest: Any) -> Any:
        calls.append(Q.shape[0])
        return solve(M, Q, *rest)

    monkeypatch.setattr(pivoting, "solve_on_host", counting)
    return calls


@pytest.mark.parametrize(
    "G",
    [normalised_gramian(16, 8, seed=1), cross_entropy_gramian(40, 10, seed=2)],
    ids=["random", "classifier"],
)
def test_the_daqp_path_alone_is_exact(G: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """DAQP's answers verify on every row (no fall-back) and match quadprog."""
    calls = counting_fallback(monkeypatch)
    U = upgrad_rows(G.shape[0])
    V = project_dual_cone(G, U, SolverOptions(path="daqp"))
    assert calls == []
    assert_kkt(G, U, V, rtol=1e-10)
    assert relative_error(V, quadprog_rows(G, U)) <= 1e-8


@pytest.mark.parametrize("m", [12, 48])
def test_daqp_answers_that_fail_verification_finish_on_the_exact_loop(
    m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loose DAQP tolerance gives wrong active sets: those rows fail the KKT check and the
    pivoting loop finishes them from DAQP's active sets (its first step polishes); exact."""
    calls = counting_fallback(monkeypatch)
    monkeypatch.setattr(compiled, "PRIMAL_TOL", 0.3)
    G = normalised_gramian(m, m // 2, seed=m)
    U = upgrad_rows(m)
    V = project_dual_cone(G, U, SolverOptions(path="daqp"))
    assert len(calls) == 1 and 0 < calls[0] <= m, calls
    assert_kkt(G, U, V, rtol=1e-10)
    assert relative_error(V, quadprog_rows(G, U)) <= 1e-8


def test_rows_daqp_fails_on_start_from_the_sign_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    """DAQP failing outright (no model) leaves every row to the exact loop; exact."""
    calls = counting_fallback(monkeypatch)
    monkeypatch.setattr(compiled, "_model", lambda M, q: None)
    G = normalised_gramian(20, 10, seed=3)
    U = upgrad_rows(20)
    V = project_dual_cone(G, U, SolverOptions(path="daqp"))
    assert calls == [20]
    assert_kkt(G, U, V, rtol=1e-10)
    assert relative_error(V, quadprog_rows(G, U)) <= 1e-8


class _Off:
    """A DAQP model whose answers on odd rows are off by a factor ``1 + 1e-6``."""

    def __init__(self, model: Any) -> None:
        self.model, self.row = model, 0

    def update(self, **kwargs: Any) -> Any:
        return self.model.update(**kwargs)

    def solve(self) -> Any:
        x, *rest = self.model.solve()
        self.row += 1
        return (x * (1 + 1e-6) if self.row % 2 == 0 else x, *rest)


def test_ill_conditioned_problems_keep_only_daqps_tight_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """κ above MAX_KAPPA: DAQP's answers are kept where they meet the tolerance itself (here
    all: tighter than the exact loop's bound eps·κ); rows that do not (planted) go to the exact
    loop from DAQP's active sets, unpolished."""
    ill = regularised(random_gramian(20, 5, seed=13), reg_eps=1e-9)
    U = upgrad_rows(20)
    calls = counting_fallback(monkeypatch)
    V = project_dual_cone(ill, U, SolverOptions(path="daqp"))
    assert calls == []
    assert_kkt(ill, U, V, rtol=1e-12)
    assert relative_error(V, project_dual_cone(ill, U, SolverOptions(path="pivoting"))) > 1e-6
    forbid(monkeypatch, compiled, "_free_solve")
    model = compiled._model
    monkeypatch.setattr(compiled, "_model", lambda M, q: _Off(model(M, q)))
    V = project_dual_cone(ill, U, SolverOptions(path="daqp"))
    assert calls == [10]
    assert_kkt(ill, U, V, rtol=1e-6)  # κ ≈ 1e9: round-off eps·κ ≈ 2e-7 of a row's scale


def test_the_daqp_path_does_not_depend_on_earlier_calls() -> None:
    """One DAQP model per thread is reused: its working set is reset at each call."""
    G, other = normalised_gramian(16, 8, seed=4), normalised_gramian(16, 4, seed=5)
    U = upgrad_rows(16)
    options = SolverOptions(path="daqp")
    first = project_dual_cone(G, U, options)
    project_dual_cone(other, U, options)
    assert torch.equal(project_dual_cone(G, U, options), first)


@pytest.mark.parametrize("m", [5, 16, 64])
def test_weightings_on_the_host_path_match_the_torch_path(m: int) -> None:
    """UPGrad and DualProj run small CPU problems in NumPy end to end: same weights as through
    project_dual_cone on the pivoting path, and as quadprog."""
    G = random_gramian(m, max(1, m // 2), seed=m)
    pref = torch.rand(m, generator=torch.Generator().manual_seed(m), dtype=F64) + 0.1
    for p in (None, pref):
        fast = UPGrad(p)(G)
        slow = UPGrad(p, solver=SolverOptions(path="pivoting"))(G)
        assert relative_error(fast, slow) <= 1e-12
        fast_dp = DualProj(p)(G)
        slow_dp = DualProj(p, solver=SolverOptions(path="pivoting"))(G)
        assert relative_error(fast_dp, slow_dp) <= 1e-12
    expected = quadprog_rows(regularised(G), upgrad_rows(m)).sum(dim=0)
    assert relative_error(UPGrad()(G), expected) <= 1e-8


GRAMIANS = {
    "random": lambda: normalised_gramian(30, 15, seed=6),
    "classifier": lambda: cross_entropy_gramian(50, 10, seed=7),
    "ill": lambda: regularised(random_gramian(20, 5, seed=13), reg_eps=1e-9),
    "identity": lambda: torch.eye(8, dtype=F64),
}


@pytest.mark.parametrize("name", list(GRAMIANS))
def test_condition_estimates_against_numpy_cond(name: str) -> None:
    """The Cholesky estimate (``(max Lᵢᵢ / min Lᵢᵢ)²``, the DAQP path and each free block) is a
    lower bound of κ₂ of the Jacobi-scaled matrix, within a factor m² of it here; the inverse's
    1-norm κ (the dual systems) is κ₁."""
    G = GRAMIANS[name]().numpy()
    d = 1.0 / np.sqrt(G.diagonal())
    M = G * d[:, None] * d
    exact = float(np.linalg.cond(M, 2))
    estimate = compiled.condition_estimate(np.linalg.cholesky(M))
    assert estimate <= exact * (1 + 1e-10)
    assert estimate >= exact / M.shape[0] ** 2
    inverse = _common.Inverse(torch.from_numpy(M), SolverOptions().tolerance(torch.float64))
    assert float(inverse.kappa) == pytest.approx(float(np.linalg.cond(M, 1)), rel=1e-6)


def shortcut(name: str, G: torch.Tensor, pref: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
    """:func:`compiled.upgrad` or ``compiled.dualproj`` on ``G`` (no shift), default options."""
    weights = compiled.upgrad if name == "upgrad" else compiled.dualproj
    out: np.ndarray[Any, Any] | None = weights(G.numpy(), 0.0, pref, SolverOptions())
    return out


def general(name: str, G: torch.Tensor, pref: np.ndarray[Any, Any]) -> torch.Tensor:
    """The same weights by project_dual_cone on the pivoting path."""
    p = torch.from_numpy(pref)
    U = torch.diag(p) if name == "upgrad" else p.unsqueeze(0)
    return project_dual_cone(G, U, SolverOptions(path="pivoting")).sum(dim=0)


PREFS: dict[str, Callable[[int], np.ndarray[Any, Any]]] = {
    "uniform": lambda m: np.full(m, 1.0 / m),
    "positive": lambda m: np.random.default_rng(m).uniform(0.1, 1.0, m),
    "signed": lambda m: np.random.default_rng(m).uniform(-1.0, 1.0, m) * (np.arange(m) % 5 != 0),
}


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("pref_kind", list(PREFS))
@pytest.mark.parametrize(
    "G",
    [normalised_gramian(16, 8, seed=1), cross_entropy_gramian(40, 10, seed=2)],
    ids=["random", "classifier"],
)
def test_the_weightings_shortcuts_match_the_general_paths(
    name: str, pref_kind: str, G: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compiled.upgrad / dualproj (UPGrad's scaled rows as ± rows of the scaled Gramian, the
    summed weights from one GEMV; preferences of either sign and zeros) give the general paths'
    weights, from DAQP alone (no fall-back) where the preference is positive."""
    calls = counting_fallback(monkeypatch)
    pref = PREFS[pref_kind](G.shape[0])
    w = shortcut(name, G, pref)
    assert w is not None
    assert relative_error(torch.from_numpy(w), general(name, G, pref)) <= 1e-12
    if pref_kind != "signed":
        assert calls == []
    if name == "upgrad" and pref_kind == "uniform":
        expected = quadprog_rows(G, upgrad_rows(G.shape[0])).sum(dim=0)
        assert relative_error(torch.from_numpy(w), expected) <= 1e-8


@pytest.mark.parametrize("m", [12, 16])
def test_the_upgrad_shortcuts_rows_that_fail_verification_finish_on_the_exact_loop(
    m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loose DAQP tolerance: the rows that fail the KKT check go to the pivoting loop in one
    call (from DAQP's active sets); the others keep DAQP's answer; the sum is exact."""
    calls = counting_fallback(monkeypatch)
    monkeypatch.setattr(compiled, "PRIMAL_TOL", 0.3)
    G = normalised_gramian(m, m // 2, seed=m)
    pref = PREFS["positive"](m)
    w = shortcut("upgrad", G, pref)
    assert w is not None
    assert len(calls) == 1 and 0 < calls[0] < m, calls  # some rows, not all
    assert relative_error(torch.from_numpy(w), general("upgrad", G, pref)) <= 1e-12


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("pref_kind", ["positive", "signed"])
def test_the_shortcuts_fall_back_on_the_symmetric_problem_daqp_solved(
    name: str, pref_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Gramian symmetric to 1e-6 only and a loose DAQP tolerance: the rows that fail
    verification finish on the loop in the same (symmetric, Jacobi-scaled) problem DAQP solved,
    so the weights are those of the symmetric part, as quadprog gives them."""
    calls = counting_fallback(monkeypatch)
    monkeypatch.setattr(compiled, "PRIMAL_TOL", 0.3)
    m = 16
    G = normalised_gramian(m, 8, seed=m)
    noise = torch.randn(m, m, generator=torch.Generator().manual_seed(1), dtype=F64)
    G_asym = G + 1e-6 * float(G.abs().max()) * noise
    pref = PREFS[pref_kind](m)
    w = shortcut(name, G_asym, pref)
    assert w is not None
    assert calls or (name, pref_kind) == ("dualproj", "positive"), calls  # (DAQP's row verifies)
    p = torch.from_numpy(pref)
    U = torch.diag(p) if name == "upgrad" else p.unsqueeze(0)
    expected = quadprog_rows(0.5 * (G_asym + G_asym.T), U).sum(dim=0)
    assert relative_error(torch.from_numpy(w), expected) <= 1e-8


def test_the_shortcuts_decline_a_diagonal_not_positive_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A diagonal entry not positive: the shortcuts return None (the weightings then take
    project_dual_cone). κ above MAX_KAPPA: the DAQP path's answers (as project_dual_cone's, to
    the round-off eps·κ of two exact answers); not
    positive definite: the exact loop's error, as on the general path. DAQP failing outright
    leaves every row to the exact loop."""
    forbid(monkeypatch, compiled, "_rows")
    zero = random_gramian(20, 5, seed=13)
    zero[3], zero[:, 3] = 0.0, 0.0
    for name in ("upgrad", "dualproj"):
        assert shortcut(name, zero, PREFS["uniform"](20)) is None
    monkeypatch.undo()
    ill = regularised(random_gramian(20, 5, seed=13), reg_eps=1e-9)
    singular = random_gramian(20, 5, seed=13)
    for name in ("upgrad", "dualproj"):
        for prefs in PREFS.values():
            w = shortcut(name, ill, prefs(20))
            p = torch.from_numpy(prefs(20))
            U = torch.diag(p) if name == "upgrad" else p.unsqueeze(0)
            V = project_dual_cone(ill, U, SolverOptions(path="daqp"))
            assert w is not None and relative_error(torch.from_numpy(w), V.sum(dim=0)) <= 1e-6
            assert_kkt(ill, U, V, rtol=1e-6)
            for path in (shortcut, general):
                with pytest.raises(ValueError, match="not numerically positive definite"):
                    path(name, singular, prefs(20))
    calls = counting_fallback(monkeypatch)
    monkeypatch.setattr(compiled, "_model", lambda M, q: None)
    G, pref = normalised_gramian(20, 10, seed=3), PREFS["uniform"](20)
    for name, rows in (("upgrad", 20), ("dualproj", 1)):
        calls.clear()
        w = shortcut(name, G, pref)
        assert w is not None and calls == [rows]
        assert relative_error(torch.from_numpy(w), general(name, G, pref)) <= 1e-12


def test_the_shortcuts_kappa_is_the_cholesky_estimate() -> None:
    """The DAQP path's scaled matrix is the Jacobi-scaled one, and its κ (condition_estimate's
    on that matrix, tested against numpy.linalg.cond below) sets the bound as the pivoting
    loop's; above MAX_KAPPA, or not positive definite, there is none."""
    tol = SolverOptions().tolerance(F64)
    eps = float(np.finfo(np.float64).eps)
    for name in ("random", "classifier", "identity"):
        G = GRAMIANS[name]().numpy()
        scaled = compiled._scaled(G, 0.0)
        assert scaled is not None
        d, M = scaled
        np.testing.assert_allclose(M, G * d[:, None] * d, rtol=1e-14, atol=1e-15)
        kappa = compiled.condition_estimate(np.linalg.cholesky(M))
        rel = compiled._bound(M, tol)
        assert rel == pytest.approx(max(tol, 10 * eps * kappa), rel=1e-12, abs=0.0)
    ill = regularised(random_gramian(20, 5, seed=13), reg_eps=1e-9).numpy()
    assert compiled._bound(compiled._scaled(ill, 0.0)[1], tol) is None  # type: ignore[index]
    assert compiled._bound(np.ones((3, 3)), tol) is None  # semi-definite


def test_the_weightings_take_the_shortcut_on_small_cpu_problems(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """UPGrad and DualProj on a small CPU Gramian: compiled.upgrad / dualproj on the raw
    Gramian shifted by reg·tr(G), never compiled.solve. A forced pivoting path, tr(G) <
    norm_eps or a size planned elsewhere do not take it (the plan kept follows the options and
    size)."""

    G = random_gramian(16, 8, seed=21)
    pivoting = SolverOptions(path="pivoting")
    expected_w, expected_v = UPGrad(solver=pivoting)(G), DualProj(solver=pivoting)(G)
    upgrad, dualproj = UPGrad(), DualProj()
    with monkeypatch.context() as patch:
        forbid(patch, compiled, "solve")
        assert relative_error(upgrad(G), expected_w) <= 1e-12
        assert relative_error(dualproj(G), expected_v) <= 1e-12
    forbid(monkeypatch, compiled, "upgrad")
    upgrad.solver = SolverOptions(path="pivoting")
    assert relative_error(upgrad(G), expected_w) <= 1e-12
    upgrad.solver = None
    torch.testing.assert_close(upgrad(1e-30 * G), torch.full((16,), 1 / 16, dtype=F64))
    large = random_gramian(_common.DAQP_MAX_M + 1, 8, seed=23)
    assert relative_error(upgrad(large), UPGrad(solver=pivoting)(large)) <= 1e-10


def test_the_host_shortcut_at_extreme_scales_and_non_finite_entries() -> None:
    """The shortcut's ``G + reg·tr(G)·I`` keeps the weights of ``G/tr(G) + reg·I`` at extreme
    scales (entries near the largest float); a NaN or infinity anywhere raises."""
    G = random_gramian(16, 8, seed=24)
    pivoting = SolverOptions(path="pivoting")
    for scale in (1e300, 1e307 / float(G.abs().max())):
        for weighting in (UPGrad(), DualProj()):
            expected = type(weighting)(solver=pivoting)(scale * G)
            assert relative_error(weighting(scale * G), expected) <= 1e-12
    for bad, (i, j) in itertools.product((float("nan"), float("inf")), ((0, 15), (15, 0), (3, 3))):
        broken = G.clone()
        broken[i, j] = bad
        for weighting in (UPGrad(), DualProj()):
            with pytest.raises(ValueError, match="NaN or infinite"):
                weighting(broken)


@pytest.mark.parametrize("m", [16, 32, 200])
def test_a_gramian_symmetric_to_float32_precision_only(
    m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Gramian computed in float32 is symmetric to about 1e-7 only: the problem is its
    symmetric part. DAQP's answers then verify (no row to the exact loop, which would cost ms),
    and every path agrees with quadprog on the symmetric part."""
    calls = counting_fallback(monkeypatch)
    G = cross_entropy_gramian(m, 10, seed=m)
    noise = torch.randn(m, m, generator=torch.Generator().manual_seed(m), dtype=F64)
    G_asym = G + 1e-7 * float(G.abs().max()) * noise  # not symmetric
    expected = quadprog_rows(0.5 * (G_asym + G_asym.T), upgrad_rows(m))
    for path in ("daqp", "pivoting", "lockstep"):
        V = project_dual_cone(G_asym, upgrad_rows(m), SolverOptions(path=path))
        assert relative_error(V, expected) <= 1e-8
    if m <= _common.DAQP_MAX_M:
        assert calls == []
        w = UPGrad(norm_eps=0.0, reg_eps=0.0)(G_asym.float())
        assert relative_error(w.double(), expected.sum(dim=0)) <= 1e-5
