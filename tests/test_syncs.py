"""Host synchronisations of the solver's lock-step path: bounded, whatever the iterations.

On the CPU, a shim counts every call that would synchronise with an accelerator (``.item()``,
``bool()``, ``int()``, ``float()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``nonzero``,
boolean-mask indexing). On CUDA, torch's own sync debug mode counts them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from oracle import relative_error
from qp import (
    assert_kkt,
    cross_entropy_gramian,
    forbid,
    normalised_gramian,
    quadprog_rows,
    upgrad_rows,
)

from pjd_optim import UPGrad
from pjd_optim.solver import SolverOptions, first_order, pivoting, project_dual_cone

METHODS = ["item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"]


@contextmanager
def counting_syncs() -> Iterator[list[str]]:
    """Counts the host synchronisations tensor code asks for (the shim runs on the CPU)."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in [*METHODS, "__getitem__"]}
    saved_nonzero = torch.nonzero

    def counted(name: str) -> Any:
        original = saved[name]

        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    def getitem(self: torch.Tensor, index: Any) -> Any:
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
            calls.append("boolean indexing")
        return saved["__getitem__"](self, index)

    def nonzero(*args: Any, **kwargs: Any) -> Any:
        calls.append("torch.nonzero")
        return saved_nonzero(*args, **kwargs)

    try:
        for name in METHODS:
            setattr(torch.Tensor, name, counted(name))
        setattr(torch.Tensor, "__getitem__", getitem)  # noqa: B010
        torch.nonzero = nonzero
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        torch.nonzero = saved_nonzero


PROBLEMS = [
    (32, 16, "gaussian"),
    (96, 48, "conflicting"),
    (160, 320, "gaussian"),
    (256, 128, "scaled"),
]


@pytest.mark.parametrize(("m", "rank", "kind"), PROBLEMS)
@pytest.mark.parametrize("checks", [1, 3])
def test_lockstep_path_syncs_at_most_once_per_check_plus_two(
    m: int, rank: int, kind: str, checks: int
) -> None:
    G = normalised_gramian(m, rank, kind, seed=m)
    U = upgrad_rows(m)
    options = SolverOptions(path="lockstep", checks=checks, steps_per_check=24 // checks)
    with counting_syncs() as calls:
        V = project_dual_cone(G, U, options)
    assert len(calls) <= 2 + checks, calls
    assert_kkt(G, U, V)
    if m <= 96:
        expected = quadprog_rows(G, U)
        assert relative_error(V, expected) <= 1e-8


def test_lockstep_path_from_the_sign_guess_syncs_at_most_once_per_check_plus_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows that keep most indices free, where the sign guess is close (a cross-entropy Gramian
    with 50 classes): no FISTA, one sync fewer."""

    forbid(monkeypatch, pivoting, "fista")
    m, checks = 160, 3
    G = cross_entropy_gramian(m, 50, seed=4)
    U = upgrad_rows(m)
    options = SolverOptions(path="lockstep", checks=checks, steps_per_check=8)
    with counting_syncs() as calls:
        V = project_dual_cone(G, U, options)
    assert len(calls) <= 1 + checks, calls
    assert_kkt(G, U, V)
    assert relative_error(V, quadprog_rows(G, U)) <= 1e-8


def test_lockstep_path_restarts_a_sign_guess_far_off_from_fista() -> None:
    """A cross-entropy Gramian with 10 classes: the sign guess leaves few indices active, but
    the first step swaps many; at the first check the rows left restart from FISTA's free sets
    (FISTA runs once, on those rows: not the three zero rows, done from the start), within
    ``2 + checks`` syncs; exact."""
    m, checks = 160, 3
    G = cross_entropy_gramian(m, 10, seed=4)
    U = torch.cat([torch.zeros(3, m, dtype=G.dtype), upgrad_rows(m)])
    fista_rows: list[int] = []
    fista = first_order.fista

    def counting(M: torch.Tensor, Q: torch.Tensor, *rest: Any) -> torch.Tensor:
        fista_rows.append(Q.shape[0])
        return fista(M, Q, *rest)

    options = SolverOptions(path="lockstep", checks=checks, steps_per_check=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pivoting, "fista", counting)
        with counting_syncs() as calls:
            V = project_dual_cone(G, U, options)
    assert len(fista_rows) == 1 and 0 < fista_rows[0] <= m, fista_rows
    assert len(calls) <= 2 + checks, calls
    assert_kkt(G, U, V)
    assert relative_error(V, quadprog_rows(G, U)) <= 1e-8


def test_the_sync_count_does_not_grow_with_iterations() -> None:
    """More pivoting steps per check, same number of syncs."""
    G = normalised_gramian(128, 64, seed=1)
    U = upgrad_rows(128)
    counts = []
    for steps in (4, 40):
        with counting_syncs() as calls:
            project_dual_cone(G, U, SolverOptions(path="lockstep", checks=2, steps_per_check=steps))
        counts.append(len(calls))
    assert counts[1] <= counts[0] <= 4


def test_the_shim_counts_what_synchronises() -> None:
    """The shim is not blind: each of these would wait for an accelerator."""
    x = torch.arange(4.0)
    with counting_syncs() as calls:
        x.sum().item()
        bool(x.any())
        x.tolist()
        x[x > 1]
        torch.nonzero(x)
        float(x.max())
    assert len(calls) == 6, calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_upgrad_on_cuda_syncs_a_bounded_number_of_times() -> None:
    """torch's sync debug mode warns at every synchronisation of the weighting's CUDA path."""
    options = SolverOptions(checks=3)
    G = normalised_gramian(512, 256, seed=0).cuda()
    weighting = UPGrad(solver=options)
    weighting(G)  # warm-up (lazy CUDA initialisation)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            w = weighting(G)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [c for c in caught if "synchroniz" in str(c.message)]
    assert len(syncs) <= 3 + options.checks, [str(c.message) for c in syncs]
    torch.testing.assert_close(w.cpu(), UPGrad()(G.cpu()), rtol=1e-8, atol=1e-12)
