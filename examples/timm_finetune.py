"""Partial Jacobian descent around a ``timm`` optimizer: a ResNet on upscaled digits.

``timm.optim.create_optimizer_v2`` builds AdamW with its usual parameter groups (no weight decay on
biases and norms). ``PartialJDOptimizer(..., considered=[model.layer4, model.get_classifier()])``
splits those groups so that the last stage and the classifier are *considered* (their Jacobian
gives the Gramian that UPGrad turns into per-example weights), keeping every hyper-parameter.
Everything else in the loop stays as with the plain optimizer (a ``CosineAnnealingLR`` is built on
the wrapper as on any optimizer); the comparison starts from the same initial weights and sees the
same batches.

BatchNorm in train mode mixes the samples of a batch, so per-example gradients of the considered
part would not factor: the BatchNorm layers *inside the considered stage* run in eval mode (their
affine parameters still train; the stages below keep ordinary train-mode BatchNorm). The
optimizer refuses the configuration otherwise, with a message that says so.

No download happens: the model is built with ``pretrained=False`` and scikit-learn's digits (8x8)
are upscaled to 32x32 RGB. Prints a per-epoch table and saves a figure (loss and accuracy per
epoch for both runs, conflict between per-example gradients per step) to ``--out``.

Run ``python examples/timm_finetune.py`` (timm's ``resnet10t``, 3 epochs: about 40 s on 2 CPU
cores; ``--model resnet18 --epochs 5`` for a bigger run; ``--quick`` for a smoke run on
``test_resnet``).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler
from tqdm import tqdm

from pjd_optim import PartialJDOptimizer


def digits_images(size: int, seed: int, limit: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as ``[N, 3, size, size]`` images in [-1, 1], split 75/25 (stratified)."""
    features, labels = load_digits(return_X_y=True)
    if limit is not None:
        features, labels = features[:limit], labels[:limit]
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.25, random_state=seed, stratify=labels
    )

    def to_images(x: Tensor) -> Tensor:
        small = x.float().view(-1, 1, 8, 8) / 16.0  # pixel values are 0..16
        big = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
        return (big * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()

    return (
        to_images(torch.from_numpy(x_train)),
        torch.from_numpy(y_train),
        to_images(torch.from_numpy(x_test)),
        torch.from_numpy(y_test),
    )


def last_stage(model: nn.Module) -> nn.Module:
    """The last stage/block of common timm backbones (ResNets, ViTs, ConvNeXts, ...)."""
    for name in ("layer4", "stages", "blocks"):
        part = getattr(model, name, None)
        if isinstance(part, nn.Sequential):
            return part[-1]
        if isinstance(part, nn.Module):
            return part
    raise ValueError(f"Don't know the last stage of {type(model).__name__}.")


def classifier(model: nn.Module) -> nn.Module:
    """``model.get_classifier()``, typed (``timm.create_model`` returns a plain ``nn.Module``)."""
    head = getattr(model, "get_classifier")()  # noqa: B009
    assert isinstance(head, nn.Module)
    return head


def train_mode(model: nn.Module, stage: nn.Module) -> None:
    """``model.train()``, except BatchNorm inside ``stage`` (the considered part): eval mode."""
    model.train()
    for module in stage.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    model.eval()
    predictions = torch.cat([model(xb).argmax(dim=1) for xb in torch.split(x, batch_size)])
    return float((predictions == y).float().mean())


@dataclass
class Run:
    """One model, its optimizer, and what was measured."""

    name: str
    model: nn.Module
    optimizer: Optimizer
    scheduler: LRScheduler
    epoch_loss: list[float] = field(default_factory=list)
    epoch_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Config:
    model: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    img_size: int
    seed: int
    max_steps: int | None
    limit: int | None


def train(config: Config) -> tuple[list[Run], list[float]]:
    """Train with plain AdamW and with partial JD around AdamW; return the runs and JD's conflict
    per step."""
    torch.manual_seed(config.seed)
    x_train, y_train, x_test, y_test = digits_images(config.img_size, config.seed, config.limit)
    model = timm.create_model(config.model, pretrained=False, num_classes=10)
    jd_model = copy.deepcopy(model)  # the same initial weights

    def adamw(m: nn.Module) -> Optimizer:
        return create_optimizer_v2(m, "adamw", lr=config.lr, weight_decay=config.weight_decay)

    jd = PartialJDOptimizer(
        adamw(jd_model), jd_model, considered=[last_stage(jd_model), classifier(jd_model)]
    )
    per_epoch = len(x_train) // config.batch_size  # the last incomplete batch is dropped
    steps = config.epochs * min(per_epoch, config.max_steps or per_epoch)
    base = adamw(model)
    runs = [  # a scheduler acts on the wrapper as on any optimizer (they share param_groups)
        Run("AdamW", model, base, CosineAnnealingLR(base, steps)),
        Run("partial JD", jd_model, jd, CosineAnnealingLR(jd, steps)),
    ]
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    order = torch.Generator().manual_seed(config.seed)
    conflicts: list[float] = []

    print(f"{config.model}: {sum(p.numel() for p in model.parameters()):,} parameters")
    print(
        f"considered: last stage + classifier, "
        f"{sum(p.numel() for p in jd.considered_parameters()):,} parameters; "
        f"{len(x_train)} train / {len(x_test)} test images of {config.img_size}x{config.img_size}"
    )
    for epoch in range(1, config.epochs + 1):
        batches = torch.split(torch.randperm(len(x_train), generator=order), config.batch_size)
        batches = batches[: min(per_epoch, config.max_steps or per_epoch)]
        totals = [0.0, 0.0]
        for run in runs:
            train_mode(run.model, last_stage(run.model))
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", leave=False)
        for index in bar:  # the same batches, in the same order, for both runs
            x, y = x_train[index], y_train[index]
            batch_loss = []
            for k, run in enumerate(runs):
                start = time.perf_counter()
                run.optimizer.zero_grad()
                losses = loss_fn(run.model(x), y)  # per-instance losses, shape [batch]
                if isinstance(run.optimizer, PartialJDOptimizer):
                    run.optimizer.step(losses)
                else:
                    losses.mean().backward()
                    run.optimizer.step()
                run.scheduler.step()
                run.seconds += time.perf_counter() - start
                batch_loss.append(float(losses.detach().mean()))
                totals[k] += batch_loss[-1]
            info = jd.last_step
            assert info is not None
            conflicts.append(info.conflict)
            bar.set_postfix(
                adamw=f"{batch_loss[0]:.3f}", jd=f"{batch_loss[1]:.3f}", conflict=info.conflict
            )
        bar.close()
        for k, run in enumerate(runs):
            run.epoch_loss.append(totals[k] / len(batches))
            run.epoch_acc.append(accuracy(run.model, x_test, y_test))
        report(runs, conflicts, len(batches), epoch)
    jd.close()
    return runs, conflicts


def report(runs: list[Run], conflicts: list[float], steps: int, epoch: int) -> None:
    """One row of the per-epoch table (header first)."""
    if epoch == 1:
        header = f"{'epoch':>5} | " + " | ".join(
            f"{run.name + ' loss':>16} {'acc':>7}" for run in runs
        )
        print(header + f" | {'conflict':>8}")
        print("-" * (len(header) + 11))
    cells = " | ".join(f"{run.epoch_loss[-1]:16.4f} {run.epoch_acc[-1]:7.2%}" for run in runs)
    recent = conflicts[-steps:]
    print(f"{epoch:>5} | {cells} | {sum(recent) / len(recent):8.1%}")


def plot(runs: list[Run], conflicts: list[float], out: Path) -> None:
    """Loss and accuracy per epoch for both runs, and JD's conflict per step, saved as ``out``."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax, conflict_ax = fig.subplots(1, 3)
    for run in runs:
        epochs = range(1, len(run.epoch_loss) + 1)
        loss_ax.plot(epochs, run.epoch_loss, marker="o", label=run.name)
        acc_ax.plot(epochs, run.epoch_acc, marker="o", label=run.name)
    loss_ax.set(title="mean training loss", xlabel="epoch", ylabel="cross-entropy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.set(title="test accuracy", xlabel="epoch", ylim=(0, 1))
    conflict_ax.plot(range(1, len(conflicts) + 1), conflicts, color="tab:red", lw=1)
    conflict_ax.set(
        title="partial JD: conflicting loss pairs", xlabel="step", ylabel="fraction", ylim=(0, 1)
    )
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    conflict_ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="timm model (default resnet10t)")
    parser.add_argument("--epochs", type=int, default=None, help="default 3")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("."), help="folder for the figure (created if needed)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; 1 with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="test_resnet, 1 epoch of 3 small batches (for tests)"
    )
    args = parser.parse_args(argv)
    name = "timm_finetune_quick.png" if args.quick else "timm_finetune.png"  # (never overwrites)
    figure = args.out / name
    config = Config(
        model=args.model or ("test_resnet" if args.quick else "resnet10t"),
        epochs=args.epochs or (1 if args.quick else 3),
        batch_size=16 if args.quick else args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        img_size=args.img_size,
        seed=args.seed,
        max_steps=3 if args.quick else None,
        limit=200 if args.quick else None,
    )

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.quick else threads))
    try:
        runs, conflicts = train(config)
    finally:
        torch.set_num_threads(threads)
    plot(runs, conflicts, figure)
    times = ", ".join(f"{run.name} {run.seconds:.1f} s" for run in runs)
    print(f"training time: {times}; total {time.perf_counter() - start:.1f} s")
    print(f"figure saved to {figure}")


if __name__ == "__main__":
    main()
