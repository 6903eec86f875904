"""How much longer the Jacobian-descent gradient is than the mean loss's: the ratio of their norms
over training steps, for choosing a gradient-clipping threshold.

Run: ``python tests/benchmarks/grad_norms.py`` (about a minute on 2 CPU cores). Prints, per
workload, the median and the 10th/90th percentiles of ``‖Σ wᵢ∇ℓᵢ‖ / ‖mean ∇ℓᵢ‖`` (all trainable
parameters) and of ``sum(w)``, over the steps of a short training run with UPGrad.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pjd_optim import PartialJDOptimizer


def grad_norm(model: nn.Module) -> float:
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm())


def ratios(model: nn.Module, considered: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> None:
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, considered=considered
    )
    norms, sums = [], []
    for x, y in batches:
        losses = F.cross_entropy(model(x), y, reduction="none")
        torch.autograd.backward(losses.mean(), retain_graph=True)
        mean_norm = grad_norm(model)
        optimizer.zero_grad()
        weights = optimizer.backward(losses)
        norms.append(grad_norm(model) / mean_norm)
        sums.append(float(weights.sum()))
        optimizer.step()
        optimizer.zero_grad()

    def spread(values: list[float]) -> str:
        q = statistics.quantiles(values, n=10)
        return f"median {statistics.median(values):.2f} (10%: {q[0]:.2f}, 90%: {q[-1]:.2f})"

    print(f"  ‖JD‖ / ‖mean‖: {spread(norms)};  sum(w): {spread(sums)}")


def digits_mlp() -> tuple[nn.Module, nn.Module, list[tuple[Tensor, Tensor]]]:
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32) / 16
    y = torch.tensor(labels)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 32 * 50, 32)]
    return model, model[2:], batches


def small_cnn() -> tuple[nn.Module, nn.Module, list[tuple[Tensor, Tensor]]]:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(10, 3, 16, 16, generator=generator)
    batches = []
    for _ in range(50):
        y = torch.randint(0, 10, (32,), generator=generator)
        x = centres[y] + 2 * torch.randn(32, 3, 16, 16, generator=generator)
        batches.append((x, y))
    return model, model[-1], batches


WORKLOADS: dict[str, Callable[[], tuple[nn.Module, nn.Module, list[tuple[Tensor, Tensor]]]]] = {
    "digits MLP 64-64-64-10 (last two layers considered), B=32, 50 steps": digits_mlp,
    "small CNN on noisy 16px prototypes (head considered), B=32, 50 steps": small_cnn,
}


def main() -> None:
    torch.manual_seed(0)
    for name, build in WORKLOADS.items():
        print(name)
        ratios(*build())


if __name__ == "__main__":
    main()
