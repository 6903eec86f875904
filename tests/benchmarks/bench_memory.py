"""Peak resident-memory growth of one training step: plain SGD vs partial JD (ours) vs TorchJD.

Run: ``python tests/benchmarks/bench_memory.py [--batch 64] [--width 2048]``

The model is ``Linear(256, W) → ReLU → Linear(W, W) → ReLU → Linear(W, 10)`` with the ``W × W``
layer considered. Materialising its per-sample gradients would need ``B·W²·4`` bytes (1 GiB for
B=64, W=2048); the ghost Gramian needs ``B²``. Each variant runs in its own process; a thread
samples the resident set every 0.2 ms during the second step and the peak minus the resident set
before that step is reported.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from pjd_optim import PartialJDOptimizer

PAGE = 4096


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def run_variant(variant: str, batch: int, width: int) -> int:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    x, y = torch.randn(batch, 256), torch.randint(0, 10, (batch,))
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

    def losses() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    if variant == "plain":

        def step() -> None:
            torch.autograd.backward(losses().mean())
            sgd.step()
            sgd.zero_grad()
    elif variant == "ours":
        optimizer = PartialJDOptimizer(sgd, model, considered=model[2])

        def step() -> None:
            optimizer.step(losses())
            optimizer.zero_grad()
    else:
        from torchjd.aggregation import UPGradWeighting
        from torchjd.autogram import Engine

        engine, weighting = Engine(model[2], batch_dim=0), UPGradWeighting()

        def step() -> None:
            values = losses()
            torch.autograd.backward(values, weighting(engine.compute_gramian(values)))
            sgd.step()
            sgd.zero_grad()

    return peak_growth(step)


def peak_growth(step: Callable[[], None]) -> int:
    """Peak resident-set growth in bytes during the second call of ``step`` (the first warms up:
    optimizer state, allocator caches)."""
    step()
    before, peak, done = rss(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)

    poller = threading.Thread(target=poll)
    poller.start()
    step()
    done.set()
    poller.join()
    return max(peak[0], rss(), before) - before  # 0 when the step returned memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(run_variant(args.variant, args.batch, args.width))
        return
    variants = ["plain", "ours"]
    try:
        import torchjd  # noqa: F401

        variants.append("torchjd")
    except ImportError:
        pass
    print(f"one step, considered Linear({args.width}, {args.width}), B={args.batch}\n")
    print("| variant | peak growth | ratio to plain |")
    print("| --- | --- | --- |")
    growth = {}
    for variant in variants:
        command = [sys.executable, __file__, "--variant", variant]
        command += ["--batch", str(args.batch), "--width", str(args.width)]
        growth[variant] = int(
            subprocess.run(command, capture_output=True, text=True, check=True).stdout
        )
    for variant, value in growth.items():
        print(f"| {variant} | +{value / 2**20:.1f} MiB | x{value / growth['plain']:.2f} |")


if __name__ == "__main__":
    main()
