"""Time of one training step: plain optimizer step vs partial JD (ours) vs TorchJD (if installed).

Run: ``python tests/benchmarks/bench_step.py [--device cuda] [--rounds 30]``, or
``--profile mlp`` for ``torch.profiler`` tables of plain and ours.

Every variant does forward + backward + ``SGD.step()`` on the same batch; rounds are interleaved
(plain, ours, torchjd, plain, ...) in one process and the medians are reported, with the ratio
to the plain step. Peak memory per variant: on CUDA ``max_memory_allocated`` during the timed
steps; on CPU the peak resident-set growth of one step, each variant in a fresh process
(``bench_memory.peak_growth``). ``resumed``: whether our step resumed the trunk's backward at the
considered part's boundary (``StepInfo.resumed``); ``stages``: the medians of
``StepInfo.gramian_seconds`` (graph walk, collection pass to the boundary, per-layer rules) and
``weighting_seconds`` (UPGrad's QP).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from bench_memory import peak_growth
from torch import Tensor, nn

from pjd_optim import Mean, PartialJDOptimizer, UPGrad


@dataclass
class Workload:
    name: str
    model: nn.Module
    considered: list[str]  # sub-module names
    inputs: Tensor
    targets: Tensor


def mlp(device: str) -> Workload:
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    return Workload("MLP 784-1024-1024-10, B=128", model, ["3", "5"], x, y)


def seed(device: str) -> Workload:
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 1))
    return Workload("seed MLP, B=16", model, ["2", "4"], torch.randn(16, 10), torch.randn(16))


def vit(device: str) -> Workload:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    last = len(list(model.get_submodule("blocks").children())) - 1
    considered = [f"blocks.{last}", "norm", "head"]
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    return Workload("ViT-tiny 64px, B=32", model, considered, x, y)


def per_sample_loss(out: Tensor, targets: Tensor) -> Tensor:
    if targets.is_floating_point():
        return (out.squeeze(1) - targets).pow(2)
    return nn.functional.cross_entropy(out, targets, reduction="none")


def variants(
    w: Workload, weighting: str
) -> tuple[dict[str, Callable[[], None]], PartialJDOptimizer]:
    """One step per variant, each on its own copy of the model (hooks never overlap); and our
    optimizer (for ``last_step``)."""
    out: dict[str, Callable[[], None]] = {}
    model = copy.deepcopy(w.model)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

    def plain() -> None:
        torch.autograd.backward(per_sample_loss(model(w.inputs), w.targets).mean())
        sgd.step()
        sgd.zero_grad()

    out["plain"] = plain
    jd_model = copy.deepcopy(w.model)
    considered = [jd_model.get_submodule(name) for name in w.considered]
    ours = PartialJDOptimizer(
        torch.optim.SGD(jd_model.parameters(), lr=1e-3),
        jd_model,
        considered=considered,
        weighting=Mean() if weighting == "mean" else UPGrad(),
    )

    def jd() -> None:
        ours.step(per_sample_loss(jd_model(w.inputs), w.targets))
        ours.zero_grad()

    out["ours"] = jd
    try:
        from torchjd.aggregation import UPGradWeighting
        from torchjd.autogram import Engine
    except ImportError:
        return out, ours
    ref_model = copy.deepcopy(w.model)
    ref_sgd = torch.optim.SGD(ref_model.parameters(), lr=1e-3)
    engine = Engine(*[ref_model.get_submodule(name) for name in w.considered], batch_dim=0)
    torchjd_weighting = UPGradWeighting()

    def torchjd() -> None:
        losses = per_sample_loss(ref_model(w.inputs), w.targets)
        torch.autograd.backward(losses, torchjd_weighting(engine.compute_gramian(losses)))
        ref_sgd.step()
        ref_sgd.zero_grad()

    out["torchjd"] = torchjd
    return out, ours


def measure(key: str, rounds: int, device: str, weighting: str) -> None:
    w = BUILDERS[key](device)
    w.model.to(device)
    w.inputs, w.targets = w.inputs.to(device), w.targets.to(device)
    runs, ours = variants(w, weighting)
    times: dict[str, list[float]] = {name: [] for name in runs}
    stages: dict[str, list[float]] = {"Gramian": [], "weighting": []}
    peaks: dict[str, int] = {}
    for run in runs.values():  # warm-up
        run()
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
            times[name].append(time.perf_counter() - start)
            if name == "ours" and ours.last_step is not None:
                stages["Gramian"].append(ours.last_step.gramian_seconds)
                stages["weighting"].append(ours.last_step.weighting_seconds)
    if device == "cpu":
        peaks = {name: peak_in_fresh_process(key, name, weighting) for name in runs}
    plain = statistics.median(times["plain"])
    assert ours.last_step is not None
    resumed = "resumed" if ours.last_step.resumed else "losses.backward(w)"
    print(f"\n{w.name} ({device}, median of {rounds} interleaved rounds; ours: {resumed})")
    for name, values in times.items():
        median = statistics.median(values)
        kind = "peak" if device == "cuda" else "peak growth"
        print(
            f"  {name:8s} {median * 1e3:9.2f} ms   x{median / plain:5.2f}"
            f"   {kind} {peaks[name] / 2**20:8.1f} MiB"
        )
    inside = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in stages.items())
    print(f"  ours' stages (StepInfo): {inside}")


def profile(key: str, weighting: str, steps: int = 10) -> None:
    """``torch.profiler`` tables (top operators by self CPU time) of ``steps`` steps of plain and
    ours: where ours spends time that plain does not (non-torch work, e.g. the NumPy QP and
    Python, shows as the self time of ``PartialJDOptimizer.step``)."""
    from torch.profiler import profile as torch_profile

    runs, _ = variants(BUILDERS[key]("cpu"), weighting)
    for name in ("plain", "ours"):
        runs[name]()
        with torch_profile() as prof:
            for _ in range(steps):
                runs[name]()
        print(f"\n{name}, {steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def peak_in_fresh_process(key: str, variant: str, weighting: str) -> int:
    command = [sys.executable, __file__, "--peak", key, variant, "--weighting", weighting]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


BUILDERS: dict[str, Callable[[str], Workload]] = {"seed": seed, "mlp": mlp, "vit": vit}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--only", choices=list(BUILDERS), nargs="*")
    parser.add_argument(
        "--weighting", choices=["upgrad", "mean"], default="upgrad", help="mean: Gramian cost only"
    )
    parser.add_argument("--peak", nargs=2, help=argparse.SUPPRESS)  # workload, variant
    parser.add_argument("--profile", choices=list(BUILDERS), help="operator tables, no timing")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.profile:
        profile(args.profile, args.weighting)
        return
    if args.peak:
        key, variant = args.peak
        print(peak_growth(variants(BUILDERS[key]("cpu"), args.weighting)[0][variant]))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for key in args.only or list(BUILDERS):
        measure(key, args.rounds, args.device, args.weighting)


if __name__ == "__main__":
    main()
