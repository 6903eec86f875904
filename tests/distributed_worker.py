"""Worker processes for test_distributed (a module of its own so that spawn can import it)."""

from __future__ import annotations

import datetime
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pjd_optim import Distributed, PartialJDOptimizer, _resume

BATCH = 5
WORLD_OFFSET = 10  # seed offset of the second micro-batch in the no_sync test


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1)
    ).double()


def batch(rank: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(BATCH, 4, generator=generator, dtype=torch.float64)
    return x, 3 * torch.randn(BATCH, generator=generator, dtype=torch.float64)


def losses_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out: Tensor = (model(x).squeeze(1) - y).pow(2)
    return out


def run(rank: int, world: int, port: int, mode: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only, whatever the hostname resolves to
    timeout = datetime.timedelta(seconds=10)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    _resume.MIN_SAVED_FLOPS = 0  # as conftest.always_resume: exercise the resumed backward
    try:
        if step(rank, mode, out_dir):
            dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        teardown()


def step(rank: int, mode: str, out_dir: str) -> bool:
    """One step in ``mode``; the result is saved to ``out_dir`` (``False``: this rank failed, as
    the mode wanted). Every object that holds
    collective work (DDP's reducer, the optimizer) is local here, so it is gone on return."""
    model = make_model()
    if mode in ("alone", "subgroup_global"):
        return apart(rank, mode, model, out_dir)
    ddp = DistributedDataParallel(model, static_graph=mode == "static")
    if mode in ("static", "none"):  # refused when the optimizer is built, on every rank
        distributed: Distributed = "none" if mode == "none" else "local"
        try:
            base = torch.optim.SGD(ddp.parameters(), lr=0.1)
            PartialJDOptimizer(base, ddp, considered=model[2], distributed=distributed)
        except ValueError as error:
            Path(out_dir, f"refused{rank}.txt").write_text(str(error))
        return True
    if mode.startswith("agree"):  # one rank refuses late or oddly: every rank must refuse
        return disagree(rank, mode, model, ddp, out_dir)
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(ddp.parameters(), lr=0.1),
        ddp,
        considered=[model[2], model[4]],
        distributed="global" if mode.endswith("global") else "local",
        nonfinite="skip" if mode.startswith("skip") else "raise",
    )
    x, y = batch(rank)
    if "sizes" in mode and rank == 1:  # one example fewer ("global" gathers equal shapes)
        x, y = x[:-1], y[:-1]
    if "shapes" in mode:  # sequences of another length on each rank, one loss per sequence
        length = 3 + rank
        x, y = x.unsqueeze(1).expand(-1, length, -1) * torch.arange(1.0, length + 1)[:, None], y
        losses = (ddp(x).squeeze(-1) - y[:, None]).pow(2).mean(dim=1)
        try:
            optimizer.backward(losses)
        except ValueError as error:
            Path(out_dir, f"refused{rank}.txt").write_text(str(error))
        return True
    if mode == "raise" and rank == 1:  # fails before the collective, e.g. a data error
        Path(out_dir, "error1.txt").write_text("rank 1 failed")
        return False
    if mode == "no_sync":  # gradient accumulation: the first micro-batch is not all-reduced
        with ddp.no_sync():
            x2, y2 = batch(rank + WORLD_OFFSET)
            optimizer.backward(losses_of(ddp, x2, y2))
    losses = losses_of(ddp, x, y)
    if mode.startswith("nonfinite"):  # rank 0 overflows: a non-finite step on every rank
        if rank == 0:
            losses = losses * torch.tensor([float("inf")] + [1.0] * (BATCH - 1)).double()
        weights = optimizer.backward(losses)
        Path(out_dir, f"nonfinite{rank}.txt").write_text(str(bool(weights.isnan().all())))
        return True
    if mode.startswith("skip"):  # rank 0 overflows in step(losses): every rank skips, none waits
        if rank == 0 and "added" in mode:  # (its rows' gradients stay finite)
            losses = losses + torch.tensor([float("nan")] + [0.0] * (BATCH - 1)).double()
        elif rank == 0:
            losses = losses * torch.tensor([float("inf")] + [1.0] * (BATCH - 1)).double()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step(losses)
        unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        Path(out_dir, f"skip{rank}.txt").write_text(f"{optimizer.skipped_steps} {unchanged}")
        return True
    if mode.startswith("refuse"):  # rank 0's losses mix its batch: every rank must refuse
        if rank == 0 and "sizes" not in mode:  # (or a scalar: refused before the passes)
            losses = losses.sum() if "scalar" in mode else losses + losses.mean()
        try:
            optimizer.backward(losses)
        except ValueError as error:
            Path(out_dir, f"refused{rank}.txt").write_text(str(error))
            assert all(p.grad is None for p in model.parameters())
        return True
    try:
        weights = optimizer.backward(losses)
    except RuntimeError as error:  # the collective timed out on the surviving rank
        Path(out_dir, f"error{rank}.txt").write_text(str(error))
        return False
    optimizer.step()
    info = optimizer.last_step
    assert info is not None
    result = {
        "params": [p.detach().clone() for p in model.parameters()],
        "weights": weights.detach().clone(),
        "bytes": info.received_bytes,
        "resumed": info.resumed,
    }
    torch.save(result, Path(out_dir, f"rank{rank}.pt"))
    return True


def apart(rank: int, mode: str, model: nn.Sequential, out_dir: str) -> bool:
    """``"alone"``: rank 0 steps a model of its own (``distributed="none"``), rank 1 waits at the
    barrier; ``"subgroup_global"``: each rank is a DDP group
    of its own under ``"global"`` (it gathered from every rank, and scaled by the world size)."""
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # (every rank makes all)
    if mode == "alone" and rank == 1:
        return True
    wrapped: nn.Module = model
    if mode == "subgroup_global":
        wrapped = DistributedDataParallel(model, process_group=groups[rank])
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(wrapped.parameters(), lr=0.1),
        wrapped,
        considered=[model[2], model[4]],
        distributed="global" if mode.endswith("global") else "none",
    )
    x, y = batch(rank)
    optimizer.step(losses_of(wrapped, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    torch.save({"params": params}, Path(out_dir, f"rank{rank}.pt"))
    return True


def disagree(rank: int, mode: str, model: nn.Sequential, ddp: nn.Module, out_dir: str) -> bool:
    """Rank 1 refuses where the agreement used to miss it: its weighting raises (a custom one,
    or a solver refusing one rank's Gramian), its step gets no losses (a ``TypeError``), or, in
    ``gramian_mode="autograd"``, its losses are a scalar. Rank 0 must refuse too, not wait in
    DDP's all-reduce."""

    def picky(gramian: Tensor) -> Tensor:
        if rank == 1:
            raise ValueError("rank 1's weighting refuses")
        return torch.full((gramian.shape[0],), 1.0 / gramian.shape[0], dtype=gramian.dtype)

    optimizer = PartialJDOptimizer(
        torch.optim.SGD(ddp.parameters(), lr=0.1),
        ddp,
        considered=[model[2], model[4]],
        weighting=picky if mode == "agree_weighting" else None,
        gramian_mode="autograd" if mode == "agree_autograd" else "hooks",
    )
    losses = losses_of(ddp, *batch(rank))
    try:
        if mode == "agree_type" and rank == 1:
            optimizer.step(3)  # type: ignore[call-overload]
        elif mode == "agree_autograd" and rank == 1:
            optimizer.step(losses.sum())
        else:
            optimizer.step(losses)
    except (ValueError, TypeError) as error:
        Path(out_dir, f"refused{rank}.txt").write_text(str(error))
        assert all(p.grad is None for p in model.parameters())
    return True


def teardown() -> None:
    """A deterministic end: no tensor of the run is left for gloo's threads to release during
    interpreter finalisation (where it aborts the process), then the group is destroyed."""
    gc.collect()
    dist.destroy_process_group()
