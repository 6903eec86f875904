"""Peak memory per rank of a partial-JD step on an FSDP2-sharded model vs FSDP2's plain step, and
the extra communication of ``distributed="global"``.

Run: ``PYTHONPATH=. python tests/benchmarks/bench_fsdp.py [--batch 16] [--world 2]``

timm's ``test_vit`` (160 px, 101 tokens, width 64, 6 blocks), each block ``fully_shard``-ed, then
the root; gloo ranks on the CPU, each with its own batch. Variants: the plain step
(``losses.mean().backward()``, ``SGD.step()``), and partial JD (``step(losses)``) with the head
or the last block considered, in both modes. Each variant runs in fresh processes (one per rank);
its memory is the peak resident-set growth of one step after a warm-up step (the kernel's
high-water mark, see ``peak_growth``), the largest over the ranks. ``factors``: the bytes of the
considered calls' inputs and output gradients one rank holds (``received_bytes / (R − 1)``),
``received``: what ``"global"`` all-gathers per rank and step (``StepInfo.received_bytes``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import multiprocessing
import os
import socket
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from pjd_optim import PartialJDOptimizer

VARIANTS = ["plain", "head/local", "head/global", "last block/local", "last block/global"]
MIB = 2**20


def worker(rank: int, world: int, port: int, variant: str, batch: int, queue: Any) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    timeout = datetime.timedelta(seconds=300)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        queue.put((rank, measure(rank, world, variant, batch)))
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def measure(rank: int, world: int, variant: str, batch: int) -> dict[str, Any]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    blocks = cast(nn.Sequential, model.blocks)
    mesh = init_device_mesh("cpu", (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 3, 160, 160, generator=generator)
    y = torch.randint(0, 1000, (batch,), generator=generator)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

    def losses() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    info: dict[str, Any] = {}
    if variant == "plain":

        def step() -> None:
            torch.autograd.backward(losses().mean())
            sgd.step()
            sgd.zero_grad()
    else:
        part, mode = variant.split("/")
        considered = cast(nn.Module, model.head) if part == "head" else blocks[-1]
        optimizer = PartialJDOptimizer(sgd, model, considered=considered, distributed=mode)  # type: ignore[arg-type]

        def step() -> None:
            optimizer.step(losses())
            optimizer.zero_grad()
            last = optimizer.last_step
            assert last is not None
            info["received"] = last.received_bytes

    info["peak"] = peak_growth(step)
    return info


def peak_growth(step: Callable[[], None]) -> int:
    """Peak resident-set growth in bytes of the second call of ``step`` (the first warms up):
    the kernel's high-water mark (``VmHWM``), reset before the step (``/proc/self/clear_refs``).
    The children run with glibc's mmap threshold at 64 KiB (set in their environment), so freed
    tensors leave the resident set at once instead of staying in malloc's arenas."""
    step()
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return max(_status("VmHWM") - before, 0)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(variant: str, world: int, batch: int) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    args = (world, port, variant, batch, queue)
    processes = [context.Process(target=worker, args=(r, *args)) for r in range(world)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=900) for _ in range(world))
    for process in processes:
        process.join(timeout=60)
    return [results[r] for r in range(world)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned ranks' glibc only
    print(f"timm test_vit 160 px, FSDP2 on {args.world} gloo ranks (CPU), B={args.batch} per rank")
    print(f"torch {torch.__version__}; peak = largest per-rank resident growth of one step\n")
    print("| variant | peak MiB per rank | vs plain | factors per rank (MiB) | received B/step |")
    print("| --- | --- | --- | --- | --- |")
    plain = 0
    for variant in VARIANTS:
        ranks = run(variant, args.world, args.batch)
        peak = max(r["peak"] for r in ranks)
        plain = plain or peak
        received = ranks[0].get("received")
        factors = ""
        if variant.endswith("global") and received:
            factors = f"{received / (args.world - 1) / MIB:.2f}"
        shown = "" if received is None else str(received)
        print(f"| {variant} | {peak / MIB:.1f} | {peak / plain:.2f}x | {factors} | {shown} |")


if __name__ == "__main__":
    main()
