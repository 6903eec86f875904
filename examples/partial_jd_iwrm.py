"""Partial Jacobian descent for instance-wise risk minimisation (IWRM).

IWRM treats every training example's loss as an objective of its own: instead of descending the
mean loss, each step descends a direction that does not increase any per-example loss to first
order (UPGrad). *Partial* Jacobian descent only looks at the Jacobian of the last layers to choose
the weights of the losses, which makes the step cost about as much as a plain one; the weighted
gradient then flows into every trainable parameter.

Part 1 is the seed example of DESIGN.md §1 (TorchJD's ``Engine(model[2:])`` + ``UPGradWeighting``
example) on our API: the only change to an ordinary training loop is wrapping the optimizer and
passing per-instance losses to ``step``.

Part 2 trains the same kind of MLP on scikit-learn's digits twice, from the same initialisation and
with the same batches: once with plain mean-loss SGD and once with partial JD (last two ``Linear``
layers considered, same learning rate), and prints a per-epoch table with the fraction of
conflicting loss pairs seen by JD.

Run ``python examples/partial_jd_iwrm.py`` (``--epochs N``, ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn import CrossEntropyLoss, Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from pjd_optim import PartialJDOptimizer, UPGrad


def seed_example() -> None:
    """Part 1: DESIGN.md §1 (the group list is annotated for ``mypy --strict``)."""
    model = Sequential(Linear(10, 8), ReLU(), Linear(8, 5), ReLU(), Linear(5, 1))
    groups: list[dict[str, Any]] = [
        {"params": model[0].parameters()},
        {"params": model[2:].parameters(), "considered": True},  # Gramian over these only
    ]
    base = SGD(groups, lr=0.1)
    optimizer = PartialJDOptimizer(base, model)  # weighting=UPGrad() by default
    loss_fn = MSELoss(reduction="none")

    for x, y in zip(torch.randn(8, 16, 10), torch.randn(8, 16)):  # noqa: B905 (verbatim)
        losses = loss_fn(model(x).squeeze(dim=1), y)  # shape [16]
        optimizer.step(losses)  # Gramian -> weights -> backward(weights) -> base.step()
        optimizer.zero_grad()

    info = optimizer.last_step
    assert info is not None
    print("Part 1: seed example (8 steps, batches of 16, random regression data)")
    print(
        f"  last step: Gramian {tuple(info.gramian.shape)}, weights sum {info.weights.sum():.3f} "
        f"(min {info.weights.min():.4f}), conflicting pairs {info.conflict:.0%}, "
        f"min cosine {info.min_cosine:+.3f}"
    )


def digits_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardised digits features (64 pixels) and labels, split 75/25 (stratified)."""
    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.25, random_state=seed, stratify=labels
    )
    x_tr = torch.from_numpy(x_train).float()
    x_te = torch.from_numpy(x_test).float()
    mean, std = x_tr.mean(dim=0), x_tr.std(dim=0).clamp_min(1e-3)  # some pixels are always 0
    return (
        (x_tr - mean) / std,
        torch.from_numpy(y_train),
        (x_te - mean) / std,
        torch.from_numpy(y_test),
    )


def mlp(hidden: int = 64) -> Sequential:
    return Sequential(
        Linear(64, hidden), ReLU(), Linear(hidden, hidden), ReLU(), Linear(hidden, 10)
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``(x, y)``."""
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    return float(loss), float((logits.argmax(dim=1) == y).float().mean())


def compare_on_digits(
    epochs: int, batch_size: int, lr: float, max_steps: int | None, seed: int
) -> None:
    """Part 2: mean-loss SGD vs partial JD (UPGrad over the last two layers), all else equal."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_data(seed)
    sgd_model = mlp()
    jd_model = copy.deepcopy(sgd_model)  # the same initial weights

    sgd = SGD(sgd_model.parameters(), lr=lr)
    groups: list[dict[str, Any]] = [
        {"params": jd_model[0].parameters()},
        {"params": jd_model[2:].parameters(), "considered": True},  # the last two Linear layers
    ]
    jd_base = SGD(groups, lr=lr)
    jd = PartialJDOptimizer(jd_base, jd_model, weighting=UPGrad())
    loss_fn = CrossEntropyLoss(reduction="none")
    order = torch.Generator().manual_seed(seed)

    print(
        f"\nPart 2: digits, MLP 64-64-64-10, SGD lr={lr}, batches of {batch_size}, "
        f"{len(x_train)} train / {len(x_test)} test"
    )
    header = (
        f"{'epoch':>5} | {'SGD loss':>8} {'SGD acc':>7} | {'JD loss':>8} {'JD acc':>7} | "
        f"{'conflict':>8} {'sum(w)':>6}"
    )
    print(header)
    print("-" * len(header))
    for epoch in range(epochs + 1):
        conflicts: list[float] = []
        weight_sums: list[float] = []
        if epoch > 0:  # epoch 0: the common initial model
            sgd_model.train()
            jd_model.train()
            batches = torch.split(torch.randperm(len(x_train), generator=order), batch_size)
            full = len(x_train) // batch_size  # the last incomplete batch is dropped
            for index in batches[: min(full, max_steps or full)]:  # same batches for both
                x, y = x_train[index], y_train[index]

                sgd.zero_grad()
                loss_fn(sgd_model(x), y).mean().backward()
                sgd.step()

                jd.zero_grad()
                jd.step(loss_fn(jd_model(x), y))  # per-instance losses, shape [batch]
                info = jd.last_step
                assert info is not None
                conflicts.append(info.conflict)
                weight_sums.append(float(info.weights.sum()))

        sgd_model.eval()
        jd_model.eval()
        sgd_loss, _ = evaluate(sgd_model, x_train, y_train)
        _, sgd_acc = evaluate(sgd_model, x_test, y_test)
        jd_loss, _ = evaluate(jd_model, x_train, y_train)
        _, jd_acc = evaluate(jd_model, x_test, y_test)
        conflict = f"{sum(conflicts) / len(conflicts):8.1%}" if conflicts else f"{'-':>8}"
        w_sum = f"{sum(weight_sums) / len(weight_sums):6.2f}" if weight_sums else f"{'-':>6}"
        print(
            f"{epoch:>5} | {sgd_loss:8.4f} {sgd_acc:7.2%} | {jd_loss:8.4f} {jd_acc:7.2%} | "
            f"{conflict} {w_sum}"
        )
    print(
        "loss: mean cross-entropy on the whole training set after the epoch; acc: test accuracy;\n"
        "conflict: mean fraction of loss pairs (i<j) of a batch whose gradients w.r.t. the\n"
        "considered layers have a negative inner product; sum(w): mean sum of JD's weights\n"
        "(plain SGD on the mean loss has sum(w) = 1, so JD's steps are also longer)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the model is tiny)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        seed_example()
        epochs = 1 if args.quick else args.epochs
        max_steps = 4 if args.quick else None
        compare_on_digits(epochs, args.batch_size, args.lr, max_steps, args.seed)
    finally:
        torch.set_num_threads(threads)
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
