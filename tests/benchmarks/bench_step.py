"""Time and memory of one training step: plain optimizer step vs partial JD (ours) vs TorchJD.

Run: ``python tests/benchmarks/bench_step.py [--device cuda] [--only mlp vit_tiny] [--rounds 30]``,
or ``--profile NAME`` for ``torch.profiler`` tables of plain and ours on that workload.

Every variant does forward + backward + ``SGD.step()`` on the same batch (under autocast where the
workload says so); rounds are interleaved (plain, ours, torchjd, plain, ...) in one process and
the medians are reported, with the ratio to the plain step. TorchJD (if installed) runs where
the batch is at most 256. Peak memory per variant: on CUDA ``max_memory_allocated`` during the
timed steps; on the CPU the peak resident-set growth of one step, each variant in a fresh process
(``bench_memory.peak_growth``). ``resumed``: whether our step resumed the trunk's backward at the
considered part's boundary (``StepInfo.resumed``); ``stages``: the medians of
``StepInfo.gramian_seconds`` (graph walk, collection passes, per-layer rules), of
``check_seconds`` (within it: the tagged pass and the row -> loss checks; its share of our step's
median) and ``weighting_seconds`` (UPGrad), host-side times (on CUDA, without synchronisation).
"""

from __future__ import annotations

import argparse
import contextlib
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
    autocast: torch.dtype | None = None
    objectives: str = "example"  # language models: "token" ([B, T] losses) or "sequence"


def mlp(batch: int) -> Callable[[], Workload]:
    def build() -> Workload:
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, 10),
        )
        x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
        return Workload(f"MLP 784-1024-1024-10, B={batch}", model, ["3", "5"], x, y)

    return build


def seed() -> Workload:
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 1))
    return Workload("seed MLP, B=16", model, ["2", "4"], torch.randn(16, 10), torch.randn(16))


def vit(name: str, size: int, batch: int, autocast: torch.dtype | None) -> Callable[[], Workload]:
    def build() -> Workload:
        import timm

        model = timm.create_model(name, pretrained=False, img_size=size, num_classes=1000)
        last = len(list(model.get_submodule("blocks").children())) - 1
        considered = [f"blocks.{last}", "norm", "head"]
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
        amp = f", {str(autocast)[6:]} autocast" if autocast else ""
        label = f"{name} {size}px, B={batch}{amp} (last block + norm + head)"
        return Workload(label, model, considered, x, y, autocast)

    return build


def resnet50() -> Workload:
    import timm

    model = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    x, y = torch.randn(256, 3, 224, 224), torch.randint(0, 1000, (256,))
    return Workload("resnet50 224px, B=256 (fc)", model, ["fc"], x, y)


class Logits(nn.Module):
    """A Hugging Face causal LM as a module from token ids to logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        logits: Tensor = self.model(input_ids=ids).logits
        return logits


def gpt2(objectives: str, part: str) -> Callable[[], Workload]:
    """GPT-2, 4 layers of 256, vocabulary 8192, untied head; B=8 sequences of T=32 tokens."""

    def build() -> Workload:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=64,
            tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = Logits(GPT2LMHeadModel(config))
        considered = {"head": ["model.lm_head"], "block": ["model.transformer.h.3"]}[part]
        ids = torch.randint(0, 8192, (8, 32))
        label = f"GPT-2 4x256, V=8192, B=8, T=32, {objectives} losses ({part})"
        return Workload(label, model, considered, ids, ids, objectives=objectives)

    return build


def llama(objectives: str) -> Callable[[], Workload]:
    """A Llama (4 layers of 256, 4 heads, vocabulary 8192, untied head) with its final RMSNorm
    considered; B=8 sequences of T=32 tokens."""

    def build() -> Workload:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            num_hidden_layers=4, hidden_size=256, intermediate_size=688, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=8192, max_position_embeddings=64,
            tie_word_embeddings=False,
        )  # fmt: skip
        model = Logits(LlamaForCausalLM(config))
        ids = torch.randint(0, 8192, (8, 32))
        label = f"Llama 4x256, V=8192, B=8, T=32, {objectives} losses (final norm)"
        return Workload(label, model, ["model.model.norm"], ids, ids, objectives=objectives)

    return build


BUILDERS: dict[str, Callable[[], Workload]] = {
    "seed": seed,
    "mlp": mlp(128),
    "vit_tiny": vit("vit_tiny_patch16_224", 64, 32, None),
    "mlp1024": mlp(1024),
    "vit_b": vit("vit_base_patch16_224", 224, 64, None),
    "vit_b_bf16": vit("vit_base_patch16_224", 224, 256, torch.bfloat16),
    "resnet50": resnet50,
    "gpt2_sequence_head": gpt2("sequence", "head"),
    "gpt2_token_head": gpt2("token", "head"),
    "gpt2_sequence_block": gpt2("sequence", "block"),
    "gpt2_token_block": gpt2("token", "block"),
    "llama_sequence_norm": llama("sequence"),
    "llama_token_norm": llama("token"),
}
DEFAULTS = {
    "cpu": ["seed", "mlp", "vit_tiny"],
    "cuda": ["mlp", "mlp1024", "vit_b", "vit_b_bf16", "resnet50"],
}


def per_sample_loss(out: Tensor, targets: Tensor, objectives: str = "example") -> Tensor:
    if objectives != "example":  # next-token losses [B, T-1], or their mean per sequence
        tokens = nn.functional.cross_entropy(
            out[:, :-1].float().transpose(1, 2), targets[:, 1:], reduction="none"
        )
        return tokens if objectives == "token" else tokens.mean(dim=1)
    if targets.is_floating_point():
        return (out.float().squeeze(1) - targets).pow(2)
    return nn.functional.cross_entropy(out.float(), targets, reduction="none")


def variants(
    w: Workload, weighting: str, device: str
) -> tuple[dict[str, Callable[[], None]], PartialJDOptimizer]:
    """One step per variant, each on its own copy of the model (hooks never overlap); and our
    optimizer (for ``last_step``)."""
    w.model.to(device)
    x, y = w.inputs.to(device), w.targets.to(device)

    def autocast() -> contextlib.AbstractContextManager[None]:
        if w.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=w.autocast)

    def losses_of(model: nn.Module) -> Tensor:
        with autocast():
            return per_sample_loss(model(x), y, w.objectives)

    out: dict[str, Callable[[], None]] = {}
    model = copy.deepcopy(w.model)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

    def plain() -> None:
        torch.autograd.backward(losses_of(model).mean())
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
        ours.step(losses_of(jd_model))
        ours.zero_grad()

    out["ours"] = jd
    try:
        from torchjd.aggregation import UPGradWeighting
        from torchjd.autogram import Engine
    except ImportError:
        return out, ours
    if x.shape[0] > 256:
        return out, ours
    ref_model = copy.deepcopy(w.model)
    ref_sgd = torch.optim.SGD(ref_model.parameters(), lr=1e-3)
    engine = Engine(*[ref_model.get_submodule(name) for name in w.considered], batch_dim=0)
    torchjd_weighting = UPGradWeighting()

    def torchjd() -> None:
        losses = losses_of(ref_model)
        torch.autograd.backward(losses, torchjd_weighting(engine.compute_gramian(losses)))
        ref_sgd.step()
        ref_sgd.zero_grad()

    out["torchjd"] = torchjd
    return out, ours


def measure(key: str, rounds: int, device: str, weighting: str) -> str:
    """The workload's markdown row (failures of a variant are reported on stderr)."""
    w = BUILDERS[key]()
    runs, ours = variants(w, weighting, device)
    cuda = torch.device(device).type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in runs}
    stages: dict[str, list[float]] = {"Gramian": [], "check": [], "weighting": []}
    peaks: dict[str, int] = {}
    failed: set[str] = set()
    for name, run in list(runs.items()):  # warm-up
        try:
            run()
            run()
        except Exception as error:  # e.g. TorchJD on a dtype it does not support
            print(f"{w.name}: {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
            failed.add(name)
            del runs[name], times[name]
    for _ in range(rounds):
        for name, run in runs.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
            times[name].append(time.perf_counter() - start)
            if name == "ours" and ours.last_step is not None:
                stages["Gramian"].append(ours.last_step.gramian_seconds)
                stages["check"].append(ours.last_step.check_seconds)
                stages["weighting"].append(ours.last_step.weighting_seconds)
    if not cuda:
        peaks = {name: peak_in_fresh_process(key, name, weighting) for name in runs}
    medians = {name: statistics.median(values) for name, values in times.items()}
    timing, memory = [], []
    for name in ("plain", "ours", "torchjd"):
        if name in medians:
            ratio = "" if name == "plain" else f" (x{medians[name] / medians['plain']:.2f})"
            timing.append(f"{medians[name] * 1e3:.1f} ms{ratio}")
            memory.append(f"{peaks[name] / 2**20:.1f}")
        else:
            timing.append("failed" if name in failed else "-")
            memory.append(timing[-1])
    assert ours.last_step is not None
    path = "resumed" if ours.last_step.resumed else "backward(w)"
    inside = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in stages.items())
    share = statistics.median(stages["check"]) / medians["ours"]
    inside += f" (check {100 * share:.1f}% of the step)"
    return f"| {w.name} | {' | '.join(timing)} | {' / '.join(memory)} | {path} | {inside} |"


def profile(key: str, weighting: str, device: str, steps: int = 10) -> None:
    """``torch.profiler`` tables (top operators by self time) of ``steps`` steps of plain and
    ours: where ours spends time that plain does not (non-torch work, e.g. the NumPy QP and
    Python, shows as the self time of ``PartialJDOptimizer.step``)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runs, _ = variants(BUILDERS[key](), weighting, device)
    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    cuda = torch.device(device).type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    for name in ("plain", "ours"):
        runs[name]()
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                runs[name]()
            if cuda:
                torch.cuda.synchronize()
        print(f"\n{name}, {steps} steps")
        print(prof.key_averages().table(sort_by=sort, row_limit=12))


def peak_in_fresh_process(key: str, variant: str, weighting: str) -> int:
    command = [sys.executable, __file__, "--peak", key, variant, "--weighting", weighting]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


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
        profile(args.profile, args.weighting, args.device)
        return
    if args.peak:
        key, variant = args.peak
        print(peak_growth(variants(BUILDERS[key](), args.weighting, "cpu")[0][variant]))
        return
    cuda = torch.device(args.device).type == "cuda"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"medians of {args.rounds} interleaved rounds, weighting {args.weighting}\n")
    kind = "peak MiB" if cuda else "peak growth MiB"
    print(f"| workload | plain | ours | TorchJD | {kind}: plain / ours / TorchJD | path | stages |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for key in args.only or DEFAULTS["cuda" if cuda else "cpu"]:
        print(measure(key, args.rounds, args.device, args.weighting), flush=True)


if __name__ == "__main__":
    main()
