"""Multi-task learning: Jacobian descent on two task losses vs a fixed weighted sum of them.

Two regression tasks share a narrow trunk (the shared representation has 4 features) and each
has its own linear head. The targets are generated: each task's target is the sum of 4 features
``tanh(a·x)`` of a fixed random teacher of its own, plus noise, so the tasks compete for the
trunk's few features and their gradients on it often conflict.

- *weighted sum*: ``Adam`` on ``0.5 ℓ1 + 0.5 ℓ2``, the usual way to train several objectives;
- *JD*: ``PartialJDOptimizer(Adam(...), model, considered=model.shared)`` and
  ``optimizer.step([ℓ1, ℓ2])``: the trunk gets UPGrad's combination of the two task gradients (a
  direction that does not increase either loss to first order), each head its own task's
  gradient.

Both start from the same weights, see the same batches, and use Adam with the same learning rate
(Adam normalises the step size, so the comparison does not hinge on the scale of the combined
gradient). Per epoch, the table gives each task's test loss for both runs and the conflict seen
by JD: the fraction of its steps whose two task gradients on the trunk had a negative inner
product, and their mean cosine. A figure of the same is saved to ``--out``.

Run ``python examples/mtl.py`` (about 10 s on 2 CPU cores; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn
from tqdm import tqdm

from pjd_optim import PartialJDOptimizer


class TwoTasks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4), nn.ReLU())
        self.head1, self.head2 = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.shared(x)
        return self.head1(features).squeeze(1), self.head2(features).squeeze(1)


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs and both tasks' targets: each the sum of 4 teacher features of its own, so the
    trunk's 4 shared features cannot serve both tasks fully. The teachers are fixed (seed 0);
    ``seed`` draws the inputs and the noise."""
    teachers = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0)) / 10**0.5
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen)
    y1, y2 = torch.tanh(torch.einsum("tfd,nd->tnf", teachers, x)).sum(dim=2)
    noise = 0.1 * torch.randn(2, n, generator=gen)
    return x, y1 + noise[0], y2 + noise[1]


def task_losses(model: nn.Module, x: Tensor, y1: Tensor, y2: Tensor) -> list[Tensor]:
    out1, out2 = model(x)
    return [nn.functional.mse_loss(out1, y1), nn.functional.mse_loss(out2, y2)]


def train(epochs: int, batch_size: int, lr: float, n: int, seed: int) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    x, y1, y2 = make_data(n, seed)
    x_test, y1_test, y2_test = make_data(1024, seed + 1)
    summed = TwoTasks()
    jd_model = copy.deepcopy(summed)
    plain = torch.optim.Adam(summed.parameters(), lr=lr)
    jd = PartialJDOptimizer(
        torch.optim.Adam(jd_model.parameters(), lr=lr), jd_model, considered=jd_model.shared
    )
    history: dict[str, list[float]] = defaultdict(list)
    order = torch.Generator().manual_seed(seed)
    header = (
        f"{'epoch':>5} | {'sum: task 1':>11} {'task 2':>7} | {'JD: task 1':>10} {'task 2':>7} | "
        f"{'conflict':>8} {'cosine':>7}"
    )
    print(header)
    print("-" * len(header))
    bar = tqdm(range(1, epochs + 1), desc="epochs", leave=False)
    for epoch in bar:
        conflicts, cosines = [], []
        for index in torch.split(torch.randperm(n, generator=order), batch_size):
            batch = x[index], y1[index], y2[index]
            plain.zero_grad()
            torch.autograd.backward(0.5 * sum(task_losses(summed, *batch)))  # type: ignore[arg-type]
            plain.step()
            jd.zero_grad()
            jd.step(task_losses(jd_model, *batch))
            info = jd.last_step
            assert info is not None
            conflicts.append(info.conflict)
            cosines.append(float(info.cosines[0, 1]))
        with torch.no_grad():
            test_sum = [float(loss) for loss in task_losses(summed, x_test, y1_test, y2_test)]
            test_jd = [float(loss) for loss in task_losses(jd_model, x_test, y1_test, y2_test)]
        epoch_values = {
            "sum 1": test_sum[0],
            "sum 2": test_sum[1],
            "jd 1": test_jd[0],
            "jd 2": test_jd[1],
            "conflict": sum(conflicts) / len(conflicts),
            "cosine": sum(cosines) / len(cosines),
        }
        for key, value in epoch_values.items():
            history[key].append(value)
        bar.set_postfix(sum=f"{sum(test_sum):.3f}", jd=f"{sum(test_jd):.3f}")
        tqdm.write(
            f"{epoch:>5} | {test_sum[0]:11.4f} {test_sum[1]:7.4f} | {test_jd[0]:10.4f} "
            f"{test_jd[1]:7.4f} | {history['conflict'][-1]:8.1%} {history['cosine'][-1]:+7.3f}"
        )
    bar.close()
    print(
        "task losses: mean squared error on 1024 test points; conflict: fraction of JD's steps "
        "whose two\ntask gradients on the shared trunk have a negative inner product; cosine: "
        "their mean cosine."
    )
    return history


def plot(history: dict[str, list[float]], out: Path) -> None:
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, conflict_ax = fig.subplots(1, 2)
    epochs = range(1, len(history["jd 1"]) + 1)
    for key, style in (("sum 1", "--"), ("sum 2", "--"), ("jd 1", "-"), ("jd 2", "-")):
        method = "weighted sum" if key.startswith("sum") else "JD"
        loss_ax.plot(epochs, history[key], style, label=f"{method}, task {key[-1]}")
    loss_ax.set(title="test loss per task", xlabel="epoch", ylabel="MSE", yscale="log")
    loss_ax.legend()
    conflict_ax.plot(epochs, history["conflict"], label="conflicting steps")
    conflict_ax.plot(epochs, history["cosine"], label="mean cosine")
    conflict_ax.set(title="JD: the task gradients on the trunk", xlabel="epoch")
    conflict_ax.legend()
    for ax in (loss_ax, conflict_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("."), help="folder for the figure (created if needed)"
    )
    parser.add_argument("--quick", action="store_true", help="2 epochs on 256 samples (tests)")
    args = parser.parse_args(argv)
    figure = args.out / ("mtl_quick.png" if args.quick else "mtl.png")  # (quick never overwrites)
    start = time.perf_counter()
    epochs, samples = (2, 256) if args.quick else (args.epochs, args.samples)
    history = train(epochs, args.batch_size, args.lr, samples, args.seed)
    plot(history, figure)
    print(f"figure saved to {figure}; done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
