"""Partial JD under DistributedDataParallel, on CPU with the gloo backend.

Run: ``torchrun --nproc_per_node=2 examples/ddp_iwrm.py [--mode local|global] [--steps 20]``

Each rank trains the seed MLP on its own shard of a regression problem. With ``--mode local``
(the default) each rank weights its own samples and DDP averages the directions. With
``--mode global`` the optimizer all-gathers the considered layers' inputs and output gradients,
so every rank solves UPGrad on the Gramian of the *global* batch and the update equals
single-process partial JD on the concatenated batch. Bytes received per rank and step:
``(R − 1) · Σ_considered calls (numel(input) + numel(output grad)) · bytes per element``.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pjd_optim import Distributed, PartialJDOptimizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["local", "global"], default="local")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    try:
        train(args.mode, args.steps, args.batch)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        # Deterministic teardown: what holds collective work (DDP, the optimizer) was freed
        # when train() returned; collect cycles before the group goes.
        gc.collect()
        dist.destroy_process_group()


def train(mode: Distributed, steps: int, batch: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial model on every rank
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 1))
    ddp = DistributedDataParallel(model)
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(ddp.parameters(), lr=0.05),
        ddp,
        considered=[model[2], model[4]],
        distributed=mode,
    )
    teacher = torch.randn(10)
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own shard
    loss_fn = nn.MSELoss(reduction="none")
    for step in range(steps):
        x = torch.randn(batch, 10, generator=generator)
        y = x @ teacher + 0.1 * torch.randn(batch, generator=generator)
        losses = loss_fn(ddp(x).squeeze(dim=1), y)
        optimizer.step(losses)
        optimizer.zero_grad()
        mean = losses.detach().mean()
        dist.all_reduce(mean)
        info = optimizer.last_step
        if rank == 0 and info is not None and (step % 5 == 0 or step == steps - 1):
            print(
                f"step {step:3d}  mean loss {float(mean) / world:8.4f}  "
                f"Gramian {tuple(info.gramian.shape)}  received {info.received_bytes} bytes"
            )


if __name__ == "__main__":
    main()
