"""The solver's contract on hard inputs: exact (KKT per row) or a clear error, never a silently
wrong answer. Non-finite inputs; singular and nearly singular Gramians, where the round-off
bound of a free block grew past any meaning (KKT errors of 10-45% were accepted); the float32
option (weights 53% off on a rank-deficient Gramian); invalid options; empty Gramians."""

from __future__ import annotations

import pytest
import torch
from qp import assert_kkt

from pjd_optim import MGDA, DualProj, UPGrad
from pjd_optim.solver import SolverOptions, project_dual_cone, solve_lcp

F64 = torch.float64
PATHS = ["daqp", "pivoting", "lockstep"]


def rank_deficient(m: int, rank: int, seed: int) -> torch.Tensor:
    J = torch.randn(m, rank, generator=torch.Generator().manual_seed(seed), dtype=F64)
    G = J @ J.T
    return G / G.trace()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused(path: str, bad: float) -> None:
    """A NaN or inf entry gave ``V = U`` (the rows read as already feasible) on every path."""
    G = rank_deficient(4, 4, 0) + 1e-4 * torch.eye(4, dtype=F64)
    options = SolverOptions(path=path)
    G_bad = G.clone()
    G_bad[0, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        project_dual_cone(G_bad, torch.eye(4, dtype=F64), options)
    q = -torch.ones(1, 4, dtype=F64)
    q[0, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        solve_lcp(G, q, options)


@pytest.mark.parametrize("path", PATHS)
def test_singular_gramians_are_exact_or_refused(path: str) -> None:
    """Unregularised rank-deficient Gramians (72 rows per size): every answer meets the KKT
    conditions, or the solver raises; the row of the first case was 45% off before."""
    options = SolverOptions(path=path)
    cases = [(8, 4, 2, 2)] + [(m, m // 2, seed, row) for m in (8, 16, 32) for seed in range(4)
                              for row in range(0, m, max(1, m // 6))]  # fmt: skip
    answered = 0
    for m, rank, seed, row in cases:
        G = rank_deficient(m, rank, seed)
        U = torch.eye(m, dtype=F64)[row : row + 1]
        try:
            V = project_dual_cone(G, U, options)
        except (ValueError, RuntimeError):
            continue
        answered += 1
        assert_kkt(G, U, V, rtol=1e-7)
    assert answered >= 20  # (about a third are answered: the check is not vacuous)


def test_the_float32_option_is_close_to_float64_or_refused() -> None:
    """``SolverOptions(dtype=float32)`` on a rank-4 Gramian of 8 losses (its explicit inverse's
    bound accepted 2% violations: weights 53% off); rounding the Gramian to float32 moves the
    weights by 2e-6."""
    J = torch.randn(8, 4, generator=torch.Generator().manual_seed(9), dtype=F64)
    G = J @ J.T
    exact = UPGrad()(G)
    for path in ("pivoting", "lockstep"):
        w = UPGrad(solver=SolverOptions(dtype=torch.float32, path=path))(G)
        assert (w - exact).abs().max() <= 1e-3 * exact.abs().max()


@pytest.mark.parametrize(
    "options",
    [
        {"steps_per_check": 0},
        {"checks": -1},
        {"patience": -1},
        {"max_iter": 0},
        {"warm_start_iter": -5},
        {"max_chunk_bytes": -1},
        {"host_max_m": 1.5},
        {"rtol": float("nan")},
        {"rtol": -1e-9},
        {"dtype": torch.float16},
        {"dtype": torch.int64},
        {"path": "simplex"},
    ],
)
def test_invalid_options_are_refused_when_built(options: dict[str, object]) -> None:
    """(``steps_per_check=0`` raised an AttributeError in the solve, float16 a
    NotImplementedError, a NaN ``rtol`` gave ``V = U``.)"""
    with pytest.raises(ValueError, match="Invalid SolverOptions: " + next(iter(options))):
        SolverOptions(**options)  # type: ignore[arg-type]


def test_empty_and_zero_gramians() -> None:
    """An empty Gramian gives no weights (UPGrad and DualProj raised ZeroDivisionError); a zero
    one with ``norm_eps=0`` gives the preference (its ``0/0`` normalisation fed NaN to the
    solver)."""
    empty = torch.zeros(0, 0, dtype=F64)
    for weighting in (UPGrad(), DualProj(), MGDA()):
        assert weighting(empty).shape == (0,)
    zeros = torch.zeros(3, 3, dtype=F64)
    for weighting in (UPGrad(norm_eps=0.0), DualProj(norm_eps=0.0), MGDA(norm_eps=0.0)):
        torch.testing.assert_close(weighting(zeros), torch.full((3,), 1 / 3, dtype=F64))
