"""DistributedDataParallel on CPU (gloo, 2 processes on loopback): both modes against the oracle."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_worker import WORLD_OFFSET, batch, losses_of, make_model, run
from oracle import oracle_grads, oracle_gramian, relative_error

from pjd_optim import UPGrad

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn(mode: str, tmp_path: Path) -> None:
    """Run ``WORLD`` fresh worker processes (spawn start method) and wait for them."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=run, args=(rank, WORLD, port, mode, str(tmp_path)))
        for rank in range(WORLD)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * WORLD


def launch(mode: str, tmp_path: Path) -> list[dict[str, Any]]:
    spawn(mode, tmp_path)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def single_process_step(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """SGD(lr=0.1) step of UPGrad JD over the concatenation of the ranks' batches (oracle)."""
    model = make_model()
    losses = losses_of(model, torch.cat(xs), torch.cat(ys))
    weights = UPGrad()(oracle_gramian(losses, [*model[2].parameters(), *model[4].parameters()]))
    grads = oracle_grads(losses, list(model.parameters()), weights)
    return [(p - 0.1 * g).detach() for p, g in zip(model.parameters(), grads, strict=True)]


def test_global_mode_equals_single_process_jd_on_the_concatenated_batch(tmp_path: Path) -> None:
    results = launch("global", tmp_path)
    expected = single_process_step(*zip(*(batch(r) for r in range(WORLD)), strict=True))  # type: ignore[arg-type]
    for result in results:
        assert result["resumed"]
        for p, e in zip(result["params"], expected, strict=True):
            assert relative_error(p, e) < 1e-10
    # every considered call's inputs and output gradients, from the other rank, float64
    per_rank = 5 * (6 + 3) + 5 * (3 + 1)
    assert results[0]["bytes"] == per_rank * 8 * (WORLD - 1)


def test_local_mode_equals_the_mean_of_per_rank_jd_steps(tmp_path: Path) -> None:
    results = launch("local", tmp_path)
    steps = [single_process_step([batch(r)[0]], [batch(r)[1]]) for r in range(WORLD)]
    start = list(make_model().parameters())
    expected = [s + sum(step[i] - s for step in steps) / WORLD for i, s in enumerate(start)]
    for result in results:
        assert result["resumed"]  # DDP's gradient hooks fire on the resumed backward too
        for p, e in zip(result["params"], expected, strict=True):
            assert relative_error(p, e) < 1e-10


def test_no_sync_accumulation_equals_the_mean_of_per_rank_accumulated_jd(tmp_path: Path) -> None:
    results = launch("no_sync", tmp_path)
    start = list(make_model().parameters())
    per_rank = []
    for r in range(WORLD):
        first = single_process_step([batch(r + WORLD_OFFSET)[0]], [batch(r + WORLD_OFFSET)[1]])
        second = single_process_step([batch(r)[0]], [batch(r)[1]])
        per_rank.append([a + b - s for a, b, s in zip(first, second, start, strict=True)])
    expected = [s + sum(step[i] - s for step in per_rank) / WORLD for i, s in enumerate(start)]
    for result in results:
        for p, e in zip(result["params"], expected, strict=True):
            assert relative_error(p, e) < 1e-10


def test_a_failing_rank_does_not_hang_the_others(tmp_path: Path) -> None:
    """Rank 1 fails before the all-gather; rank 0 gets an error from the process group's timeout
    (10 s here) instead of waiting forever."""
    start = time.monotonic()
    spawn("raise", tmp_path)
    assert time.monotonic() - start < 60
    assert (tmp_path / "error0.txt").exists() and (tmp_path / "error1.txt").exists()


def test_ddp_example_runs_under_torchrun() -> None:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += [
        "--master_port",
        str(free_port()),
        str(root / "examples" / "ddp_iwrm.py"),
        "--steps",
        "2",
        "--mode",
        "global",
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # loopback only, whatever the hostname says
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("received 1216 bytes") == 2


@pytest.mark.parametrize(
    "mode", ["refuse_local", "refuse_global", "refuse_scalar_local", "refuse_scalar_global"]
)
def test_a_step_one_rank_refuses_is_refused_on_every_rank(mode: str, tmp_path: Path) -> None:
    """Rank 0's losses mix its batch (a batch mean added), or are a scalar (refused before the
    passes: rank 1 waited for it in the step's first collective): it refuses, and so does rank
    1, whose losses are fine, before any collective of the step (no rank waits for the other)."""
    spawn(mode, tmp_path)
    own = (tmp_path / "refused0.txt").read_text()
    if "scalar" in mode:
        assert "scalar" in own
    else:
        assert "feed several losses" in own and "task losses" in own
    assert "Another rank refused" in (tmp_path / "refused1.txt").read_text()


@pytest.mark.parametrize("mode", ["nonfinite_local", "nonfinite_global"])
def test_an_overflow_on_one_rank_is_a_non_finite_step_not_an_error(
    mode: str, tmp_path: Path
) -> None:
    """Rank 0's losses overflow: every rank's backward gives NaN weights (GradScaler then skips;
    under "global" their Gramian holds rank 0's rows, under "local" the ranks agree on
    finiteness); none raises."""
    spawn(mode, tmp_path)
    results = [(tmp_path / f"nonfinite{rank}.txt").read_text() for rank in range(WORLD)]
    assert results == ["True", "True"]


@pytest.mark.parametrize("mode", ["skip", "skip_added_global"])
def test_an_overflow_on_one_rank_in_step_losses_is_skipped_on_every_rank(
    mode: str, tmp_path: Path
) -> None:
    """``step(losses)`` with ``nonfinite="skip"``, rank 0's losses overflowing: every rank skips
    (rank 1 used to go on into DDP's all-reduce alone and wait), nothing changes. Under
    ``"global"`` a NaN added to rank 0's losses leaves its rows' gradients finite: rank 1 read
    only its own losses and went on alone."""
    spawn(mode, tmp_path)
    results = [(tmp_path / f"skip{rank}.txt").read_text() for rank in range(WORLD)]
    assert results == ["1 True", "1 True"]


def test_global_mode_with_another_batch_size_on_one_rank_is_refused_on_every_rank(
    tmp_path: Path,
) -> None:
    """``distributed="global"`` with one loss fewer on rank 1 (a last batch): a clear error on
    every rank before the gather (gloo aborted both processes on the mismatched sizes)."""
    spawn("refuse_sizes_global", tmp_path)
    for rank in range(WORLD):
        assert "as many losses on every rank" in (tmp_path / f"refused{rank}.txt").read_text()


def test_ddp_with_a_static_graph_is_refused() -> None:
    """``DistributedDataParallel(static_graph=True)`` reduces at the end of every backward through
    the model, the step's collection passes included: the gradients were 10x and more off.
    Refused when the optimizer is built, on every rank."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        spawn("static", Path(out))
        for rank in range(WORLD):
            assert "static_graph=True" in Path(out, f"refused{rank}.txt").read_text()


def test_global_mode_with_calls_of_other_shapes_on_one_rank_is_refused_on_every_rank(
    tmp_path: Path,
) -> None:
    """Sequences of another length on each rank (each rank padded to its own longest), one loss
    per sequence: a clear error on every rank before the gather (gloo aborted both processes)."""
    spawn("refuse_shapes_global", tmp_path)
    for rank in range(WORLD):
        assert "same shapes on every rank" in (tmp_path / f"refused{rank}.txt").read_text()


def test_a_model_of_one_rank_steps_without_the_others(tmp_path: Path) -> None:
    """A model stepped on rank 0 only, with ``distributed="none"``: its step agrees with no other
    rank (any other mode waited in an all-reduce until the process group's timeout)."""
    spawn("alone", tmp_path)
    params = torch.load(tmp_path / "rank0.pt")["params"]
    x, y = batch(0)
    for p, q in zip(params, single_process_step([x], [y]), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_global_mode_over_a_ddp_process_group_gathers_from_that_group(tmp_path: Path) -> None:
    """DDP over a group of its own on each rank: ``"global"`` is JD on that group's batch (it
    gathered from every rank and scaled by the world size: 40 % off, silently)."""
    spawn("subgroup_global", tmp_path)
    for rank in range(WORLD):
        params = torch.load(tmp_path / f"rank{rank}.pt")["params"]
        x, y = batch(rank)
        for p, q in zip(params, single_process_step([x], [y]), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["agree_weighting", "agree_type", "agree_autograd"])
def test_a_late_or_odd_refusal_on_one_rank_is_refused_on_every_rank(
    mode: str, tmp_path: Path
) -> None:
    """A weighting that raises on one rank only (after the step's agreement), a step given no
    losses (a ``TypeError``), or a scalar in ``gramian_mode="autograd"`` (which agreed on
    nothing): rank 0 waited in DDP's all-reduce until the timeout. Now every rank refuses."""
    spawn(mode, tmp_path)
    for rank in range(WORLD):
        assert (tmp_path / f"refused{rank}.txt").exists(), f"rank {rank} did not refuse"
    assert "Another rank refused" in (tmp_path / "refused0.txt").read_text()


def test_no_agreement_with_a_ddp_model_is_refused() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        spawn("none", Path(out))
        for rank in range(WORLD):
            assert "distributed='none'" in Path(out, f"refused{rank}.txt").read_text()
