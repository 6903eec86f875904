"""FSDP2 (``fully_shard``) on CPU (gloo, 2 spawned ranks): one step of every kind of rule on
sharded parameters, in both modes, against the single-process oracle; mixed precision; torch's
distributed checkpoint helpers; the example under torchrun."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from fsdp_worker import FSDP2, JOBS, LR, batch, losses_of, make_model, run
from oracle import oracle_grads, oracle_gramian, relative_error
from test_distributed import free_port

from pjd_optim import UPGrad

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.skipif(
        not FSDP2,
        reason="FSDP2 on the CPU needs torch >= 2.6 (fully_shard in torch.distributed.fsdp)",
    ),
]
WORLD = 2
CASES = ["generic", "attention", "recurrent", "vit"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every job of fsdp_worker, on ``WORLD`` fresh ranks started once for the module."""
    out = tmp_path_factory.mktemp("fsdp")
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=run, args=(rank, WORLD, port, list(JOBS), str(out)))
        for rank in range(WORLD)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
    found: dict[str, list[dict[str, Any]]] = {}
    for job in JOBS:
        paths = [out / f"{job}-{r}.pt" for r in range(WORLD)]
        found[job] = [torch.load(p, weights_only=False) for p in paths if p.exists()]
    return found


def of(results: dict[str, list[dict[str, Any]]], job: str) -> list[dict[str, Any]]:
    ranks = results[job]
    assert len(ranks) == WORLD, f"{job}: a rank saved nothing"
    for result in ranks:
        assert "error" not in result, result["error"]
    return ranks


def oracle_step(case: str, ranks: list[int]) -> list[torch.Tensor]:
    """SGD step of UPGrad JD on one unsharded float64 copy, over the given ranks' batches."""
    model, considered = make_model(case)
    model.double()
    xs, ys = zip(*(batch(case, r, torch.float64) for r in ranks), strict=True)
    losses = losses_of(case, model, torch.cat(xs), torch.cat(ys))
    params = [p for module in considered for p in module.parameters()]
    weights = UPGrad()(oracle_gramian(losses, params))
    grads = oracle_grads(losses, list(model.parameters()), weights)
    return [(p - LR * g).detach() for p, g in zip(model.parameters(), grads, strict=True)]


def expected(case: str, mode: str) -> list[torch.Tensor]:
    if mode == "global":  # the step on the concatenated batch
        return oracle_step(case, list(range(WORLD)))
    start = [p.detach().double() for p in make_model(case)[0].parameters()]
    steps = [oracle_step(case, [r]) for r in range(WORLD)]  # FSDP averages the gradients
    return [s + sum(step[i] - s for step in steps) / WORLD for i, s in enumerate(start)]


@pytest.mark.parametrize("mode", ["local", "global"])
@pytest.mark.parametrize("case", CASES)
def test_every_rule_on_sharded_parameters_equals_the_oracle(
    results: dict[str, list[dict[str, Any]]], case: str, mode: str
) -> None:
    want = expected(case, mode)
    for result in of(results, f"{case}-{mode}"):
        assert not result["resumed"]  # FSDP2 reduce-scatters the weighted backward's gradients
        assert (result["bytes"] > 0) == (mode == "global")
        for p, e in zip(result["params"], want, strict=True):
            assert relative_error(p, e) < 1e-10


@pytest.mark.parametrize("mode", ["local", "global"])
def test_the_root_sharded_alone_equals_the_oracle(
    results: dict[str, list[dict[str, Any]]], mode: str
) -> None:
    """``fully_shard(model)`` alone: the root keeps its parameters unsharded from the forward to
    the backward (FSDP2 registers the unsharded tensors meanwhile), which read as considered
    parameters replaced after the build: every step was refused."""
    want = expected("generic", mode)
    for result in of(results, f"generic-root-{mode}"):
        for p, e in zip(result["params"], want, strict=True):
            assert relative_error(p, e) < 1e-10


@pytest.mark.parametrize("case", ["generic", "attention"])
def test_bf16_mixed_precision_equals_the_oracle_at_bf16_tolerance(
    results: dict[str, list[dict[str, Any]]], case: str
) -> None:
    start = [p.detach().double() for p in make_model(case)[0].parameters()]
    want = expected(case, "local")
    for result in of(results, f"{case}-bf16-local"):
        assert result["gramian_dtype"] == torch.float32
        update = torch.cat(
            [(p.double() - s).flatten() for p, s in zip(result["params"], start, strict=True)]
        )
        target = torch.cat([(e - s).flatten() for e, s in zip(want, start, strict=True)])
        assert relative_error(update, target) < 5e-2


def test_checkpoint_helpers_take_the_wrappers_state_as_the_bases(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    for result in of(results, "checkpoint"):
        assert result["init_warnings"] == [] and result["load_warnings"] == []
        assert result["empty_state"]  # the initialising zero step changed no moment
        start = [p.detach().double() for p in make_model("generic")[0].parameters()]
        for p, s in zip(result["empty_step_params"], start, strict=True):
            assert torch.equal(p, s)  # ... nor any parameter
        assert result["same_as_base"] and result["loaded_same"] and result["next_step_same"]


def test_per_position_losses_of_other_lengths_are_refused_on_every_rank(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    for result in of(results, "positions"):
        assert "same positions on every rank" in result["refused"]


def test_a_refusal_or_a_reordering_on_one_rank_is_refused_on_every_rank(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    """Scalar losses on one rank (refused before the first pass), or its losses reordered
    (more passes there): every rank refuses, before the passes go different ways (both ranks
    hung in FSDP's parameter gathers)."""
    scalar = of(results, "disagree-scalar")
    assert "Another rank refused" in scalar[0]["refused"]
    assert "scalar" in scalar[1]["refused"].lower() or "one loss" in scalar[1]["refused"]
    for result in of(results, "disagree-flipped"):
        assert "same passes" in result["refused"]
    mixed = of(results, "disagree-mixed")
    assert "Another rank refused" in mixed[0]["refused"]
    assert "feed several losses" in mixed[1]["refused"]
    for result in of(results, "disagree-autograd"):
        assert "gramian_mode='hooks'" in result["refused"]


def test_non_finite_losses_on_one_rank_skip_the_step_on_every_rank(
    results: dict[str, list[dict[str, Any]]],
) -> None:
    """NaN in one rank's ``[B, T]`` losses: that rank stopped at its non-finite Gramian while
    the other took its passes per position (both hung); now every rank skips the step."""
    for result in of(results, "disagree-nan"):
        assert result["refused"] == "" and result["skipped"] == 1 and result["unchanged"]


def test_fsdp_example_runs_under_torchrun() -> None:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += ["--master_port", str(free_port()), str(root / "examples" / "fsdp_iwrm.py")]
    command += ["--steps", "2", "--mode", "global", "--bf16"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # loopback only, whatever the hostname says
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "Gramian (16, 16) torch.float32" in result.stdout
    assert result.stdout.count("after 2 steps") == 2
