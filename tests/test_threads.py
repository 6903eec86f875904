"""Threads: a step collects exactly its own taps, whatever thread runs which backward."""

from __future__ import annotations

import copy
import threading

import torch
from oracle import (
    assert_same_parameters,
    oracle_backward,
    oracle_grads,
    oracle_gramian,
    relative_error,
    trainable,
)
from torch import Tensor, nn
from torch.optim import SGD

from pjd_optim import PartialJDOptimizer, UPGrad


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def losses_of(model: nn.Module, x: Tensor) -> Tensor:
    out: Tensor = model(x).pow(2).sum(dim=1)
    return out


def oracle_training(model: nn.Sequential, xs: Tensor, lr: float = 0.1) -> None:
    """SGD steps on the oracle's gradients, the last layer considered."""
    sgd = SGD(model.parameters(), lr=lr)
    for x in xs:
        oracle_backward(losses_of(model, x), list(model[2].parameters()), trainable(model))
        sgd.step()
        sgd.zero_grad()


def test_optimizers_stepping_concurrently_in_threads_each_match_the_oracle() -> None:
    """Four optimizers, each on its own model, step at the same time in four threads."""
    batches = [
        torch.randn(5, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
        for s in range(4)
    ]
    models = [mlp(seed) for seed in range(4)]
    references = [copy.deepcopy(m) for m in models]
    errors: list[BaseException] = []

    def train(model: nn.Sequential, xs: Tensor) -> None:
        try:
            optimizer = PartialJDOptimizer(
                SGD(model.parameters(), lr=0.1), model, considered=model[2]
            )
            for x in xs:
                optimizer.step(losses_of(model, x))
                optimizer.zero_grad()
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=train, args=(m, b)) for m, b in zip(models, batches, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for model, reference, xs in zip(models, references, batches, strict=True):
        oracle_training(reference, xs)
        assert_same_parameters(model, reference)


def test_a_backward_through_the_same_taps_during_a_collection_pass_is_not_collected() -> None:
    """While a step's collection pass runs, another backward (here started from a tensor hook of
    that pass, the way another thread's could interleave) goes through taps of the same optimizer
    on another graph. Only the step's own graph is collected: the step stays exact."""
    model = mlp(0)
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    gen = torch.Generator().manual_seed(1)
    x, other_x = (
        torch.randn(5, 4, dtype=torch.float64, generator=gen),
        torch.randn(3, 4, dtype=torch.float64, generator=gen),
    )
    other = losses_of(model, other_x).sum()  # another graph through the same taps
    out = model(x)
    interleaved: list[Tensor] = []

    def run_other_backward(grad: Tensor) -> Tensor:
        if not interleaved:
            interleaved.extend(
                torch.autograd.grad(other, model.get_parameter("2.weight"), retain_graph=True)
            )
        return grad

    out.register_hook(run_other_backward)
    weights = optimizer.backward(out.pow(2).sum(dim=1))
    assert interleaved  # the other backward did run during the step
    losses = losses_of(reference, x)
    expected = UPGrad()(oracle_gramian(losses, list(reference[2].parameters())))
    assert relative_error(weights, expected) < 1e-10
    for p, g in zip(
        model.parameters(), oracle_grads(losses, trainable(reference), weights), strict=True
    ):
        assert p.grad is not None and relative_error(p.grad, g) < 1e-10
