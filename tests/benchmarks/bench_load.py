"""UPGrad and a training step on a quiet CPU and with every core busy (issue 24, item 4).

Run: ``python tests/benchmarks/bench_load.py [--rounds 6] [--reps 15] [--m 64]``.

Busy means ``os.cpu_count()`` single-threaded busy-loop processes (as data-loader workers are),
each bounded in time and killed at the end of its round. Rounds alternate quiet and busy; within
a round the measurements are interleaved (UPGrad on each Gramian kind, a plain step, the seed
step with UPGrad). Prints, per condition, the medians over all repetitions: UPGrad's time at
``m`` on a random rank-m/2 and a classifier Gramian (as ``bench_weighting.py`` builds them), the
seed workload's plain and partial-JD steps (and, for scale, DAQP's bare per-row loop and UPGrad
at m = 16) (``bench_step.py``'s ``seed``) and their ratio, and
the busy/quiet ratios; and the seed step's Gramian and weighting stages (``StepInfo``).
torch's default thread count. No assertion on time.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from bench_step import seed, variants
from bench_weighting import daqp_per_row, make_gramian

from pjd_optim import UPGrad

BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def busy_processes(seconds: float) -> list[subprocess.Popen[bytes]]:
    """One single-threaded busy loop per core, each ending by itself after ``seconds``."""
    code = BUSY_LOOP.format(seconds=seconds)
    n = os.cpu_count() or 1
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds (alternately quiet, busy)")
    parser.add_argument("--reps", type=int, default=15, help="repetitions per round")
    parser.add_argument("--m", type=int, default=64, help="UPGrad's Gramian size")
    args = parser.parse_args()
    torch.manual_seed(0)
    weighting = UPGrad()
    gramians = {
        kind: make_gramian(args.m, kind, torch.device("cpu"), seed=args.m)
        for kind in ("rank m/2", "classifier")
    }
    steps, optimizer = variants(seed(), "upgrad", "cpu")
    jobs: dict[str, Callable[[], object]] = {
        f"UPGrad m={args.m} {kind}": functools.partial(weighting, G) for kind, G in gramians.items()
    }
    jobs[f"DAQP bare loop m={args.m} rank m/2"] = functools.partial(
        daqp_per_row, gramians["rank m/2"]
    )
    small = make_gramian(16, "rank m/2", torch.device("cpu"), seed=16)
    jobs["UPGrad m=16 rank m/2"] = functools.partial(weighting, small)
    jobs["DAQP bare loop m=16 rank m/2"] = functools.partial(daqp_per_row, small)
    jobs.update({"seed plain step": steps["plain"], "seed step (ours)": steps["ours"]})
    stages = {"gramian": "gramian_seconds", "weighting": "weighting_seconds"}
    for job in jobs.values():  # warm-up
        job()
    times: dict[str, dict[str, list[float]]] = {
        condition: {name: [] for name in jobs} for condition in ("quiet", "busy")
    }
    for round_ in range(args.rounds):
        condition = "busy" if round_ % 2 else "quiet"
        processes = busy_processes(seconds=120.0) if condition == "busy" else []
        try:
            if processes:
                time.sleep(0.5)  # let them start spinning
            for _ in range(args.reps):
                for name, job in jobs.items():
                    times[condition][name].append(timed(job))
                info = optimizer.last_step  # the seed step's stages (host-side times)
                for stage, field in stages.items():
                    seconds = getattr(info, field, None) if info is not None else None
                    if seconds is not None:
                        times[condition].setdefault(f"  its {stage} stage", []).append(seconds)
        finally:
            stop(processes)
    print(f"cpus={os.cpu_count()} torch threads={torch.get_num_threads()} m={args.m}")
    print(f"rounds={args.rounds} (alternately quiet, busy) x {args.reps} repetitions\n")
    print("| measurement | quiet | busy | busy / quiet |")
    print("| --- | --- | --- | --- |")
    medians = {c: {n: statistics.median(t) for n, t in d.items()} for c, d in times.items()}
    for name in times["quiet"]:
        if name not in times["busy"]:
            continue
        quiet, busy = medians["quiet"][name], medians["busy"][name]
        print(f"| {name} | {1e3 * quiet:.2f} ms | {1e3 * busy:.2f} ms | {busy / quiet:.2f}x |")
    ratio = {c: medians[c]["seed step (ours)"] / medians[c]["seed plain step"] for c in medians}
    print(
        f"| seed step / plain step | {ratio['quiet']:.2f}x | {ratio['busy']:.2f}x | "
        f"{ratio['busy'] / ratio['quiet']:.2f}x |"
    )


if __name__ == "__main__":
    main()
