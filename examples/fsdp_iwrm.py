"""Partial JD on a model sharded with FSDP2 (``fully_shard``), on CPU with the gloo backend.

Run: ``torchrun --nproc_per_node=2 examples/fsdp_iwrm.py [--mode local|global] [--steps 10]
[--bf16]``

Each layer is sharded with ``fully_shard``, then the root, as FSDP2 users do; the optimizer wraps
the base optimizer built on the sharded parameters exactly as without sharding. The considered
part is a ``TransformerEncoderLayer`` (its attention has no closed-form rule: its per-sample
gradients come from re-running it, on parameters gathered for that layer alone) and the head.
``--bf16`` runs FSDP2's mixed precision (bfloat16 parameters, float32 reductions); the Gramian
is accumulated in float32. Each rank prints its first and last mean loss; rank 0 prints the
Gramian and the bytes ``distributed="global"`` received per step.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pjd_optim import Distributed, PartialJDOptimizer


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.block(self.embed(x)).mean(dim=1)).squeeze(dim=1)
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["local", "global"], default="local")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    try:
        train(args.mode, args.steps, args.batch, args.bf16)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        gc.collect()  # what holds collective work was freed when train() returned
        dist.destroy_process_group()


def train(mode: Distributed, steps: int, batch: int, bf16: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial model on every rank
    model = Model()
    mesh = init_device_mesh("cpu", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mp_policy = policy if bf16 else MixedPrecisionPolicy()
    for layer in (model.embed, model.block, model.head):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    optimizer = PartialJDOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),  # the sharded parameters (DTensors)
        model,
        considered=[model.block, model.head],
        distributed=mode,
    )
    teacher = torch.randn(6)
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own shard of the data
    first = last = 0.0
    for step in range(steps):
        x = torch.randn(batch, 4, 6, generator=generator)
        y = (x @ teacher).tanh().mean(dim=1) + 0.05 * torch.randn(batch, generator=generator)
        losses = (model(x).float() - y).pow(2)
        optimizer.step(losses)
        optimizer.zero_grad()
        last = float(losses.detach().mean())
        first = last if step == 0 else first
        info = optimizer.last_step
        if rank == 0 and info is not None and step == 0:
            print(
                f"Gramian {tuple(info.gramian.shape)} {info.gramian.dtype}  "
                f"received {info.received_bytes} bytes per step"
            )
    print(f"rank {rank}: mean loss {first:.4f} -> {last:.4f} after {steps} steps")


if __name__ == "__main__":
    main()
