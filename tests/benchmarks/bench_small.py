"""End-to-end time of ``UPGrad()(G)`` on a small CPU float64 Gramian against DAQP's bare loop.

Run: ``python tests/benchmarks/bench_small.py [--m 16] [--repeats 3000]``.

For each Gramian kind of :mod:`bench_weighting` (``"rank m/2"``, ``"classifier"``), times
``UPGrad()(G)`` (the DAQP host path: normalisation, scaling, verification included) and
``bench_weighting.daqp_per_row`` (one ``daqp.Model``, ``q`` updated per row, no verification)
alternately, call by call, and prints the medians in microseconds, their ratio, the largest
weight difference and the load averages (``/proc/loadavg``, where present) before and after:
the machine should be quiet. No assertion on time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_weighting import daqp_per_row, make_gramian

from pjd_optim import UPGrad

KINDS = ("rank m/2", "classifier")


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=None, help="Gramian seed (default: m)")
    args = parser.parse_args()
    weighting = UPGrad()
    clock = time.perf_counter_ns
    print(f"m={args.m} repeats={args.repeats} torch threads={torch.get_num_threads()}")
    print("| Gramian | UPGrad()(G) (µs) | DAQP per row (µs) | ratio | max abs(dw) | load |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in KINDS:
        G = make_gramian(
            args.m, kind, torch.device("cpu"), seed=args.m if args.seed is None else args.seed
        )
        diff = float((weighting(G) - daqp_per_row(G)).abs().max())  # also the warm-up
        before = load()
        ours: list[int] = []
        bare: list[int] = []
        for _ in range(args.repeats):
            start = clock()
            weighting(G)
            middle = clock()
            daqp_per_row(G)
            ours.append(middle - start)
            bare.append(clock() - middle)
        a, b = statistics.median(ours) / 1e3, statistics.median(bare) / 1e3
        print(f"| {kind} | {a:.1f} | {b:.1f} | {a / b:.2f} | {diff:.1e} | {before} / {load()} |")


if __name__ == "__main__":
    main()
