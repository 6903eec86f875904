"""Step hooks registered on the wrapper run around the base's update, on the gradient it applies:
a clipping pre-hook clips the Jacobian-descent gradient of ``step(losses)`` (it ran before that
gradient existed and clipped nothing), and torch's global step hooks run once per step (they ran
for the wrapper and again for the base)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_backward
from torch import Tensor, nn
from torch.optim import SGD, Optimizer
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from pjd_optim import PartialJDOptimizer

F64 = torch.float64
MAX_NORM = 0.05


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def losses_of(model: nn.Module) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, generator=generator, dtype=F64)
    y = torch.arange(7) % 3
    return F.cross_entropy(model(x), y, reduction="none")


def clip(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, MAX_NORM)


def expected_parameters(model: nn.Sequential, lr: float) -> list[Tensor]:
    """The oracle's JD gradient, clipped to ``MAX_NORM``, one SGD step."""
    twin = copy.deepcopy(model)
    params = list(twin.parameters())
    oracle_backward(losses_of(twin), list(twin[2].parameters()), params)
    torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    with torch.no_grad():
        return [p - lr * p.grad for p in params if p.grad is not None]


def step_losses(optimizer: PartialJDOptimizer, model: nn.Module) -> None:
    optimizer.step(losses_of(model))


def backward_then_step(optimizer: PartialJDOptimizer, model: nn.Module) -> None:
    optimizer.backward(losses_of(model))
    optimizer.step()


def closure_returning_losses(optimizer: PartialJDOptimizer, model: nn.Module) -> None:
    optimizer.step(lambda: losses_of(model))


def weighted_loss_backward(optimizer: PartialJDOptimizer, model: nn.Module) -> None:
    loss = optimizer.weighted_loss(losses_of(model))
    torch.autograd.backward(loss)
    optimizer.step()


STEPS = [step_losses, backward_then_step, closure_returning_losses, weighted_loss_backward]


@pytest.mark.parametrize("take_step", STEPS, ids=lambda f: f.__name__)
def test_a_clipping_pre_hook_clips_the_gradient_the_base_applies(
    take_step: Callable[[PartialJDOptimizer, nn.Module], None],
) -> None:
    model = mlp()
    expected = expected_parameters(model, lr=0.5)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.5), model, considered=model[2])
    optimizer.register_step_pre_hook(clip)
    take_step(optimizer, model)
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)


def test_hooks_run_once_each_in_torch_order_with_the_step_arguments() -> None:
    model = mlp()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    calls: list[tuple[str, int, int]] = []

    def record(name: str) -> Callable[[Optimizer, Any, Any], None]:
        def hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
            calls.append((name, id(opt), len(args)))

        return hook

    handles = [
        optimizer.register_step_pre_hook(record("pre")),
        optimizer.register_step_post_hook(record("post")),
        register_optimizer_step_pre_hook(record("global pre")),
        register_optimizer_step_post_hook(record("global post")),
    ]
    try:
        losses = losses_of(model)
        optimizer.step(losses)
        base, wrapper = id(optimizer.base), id(optimizer)
        assert calls == [
            ("pre", wrapper, 2),
            ("global pre", base, 1),
            ("global post", base, 1),
            ("post", wrapper, 2),
        ]
        calls.clear()
        optimizer.zero_grad()
        optimizer.backward(losses_of(model))
        optimizer.step()
        assert [name for name, _, _ in calls] == ["pre", "global pre", "global post", "post"]
    finally:
        for handle in handles:
            handle.remove()


def test_a_pre_hook_returning_arguments_is_a_clear_error() -> None:
    model = mlp()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: (args, kwargs))
    with pytest.raises(RuntimeError, match="returned new arguments"):
        optimizer.step(losses_of(model))


def test_hooks_survive_a_scheduler_and_a_copy() -> None:
    model = mlp()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.5), model, considered=model[2])
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.step(losses_of(model))
    assert calls == ["pre"]
    twin = copy.deepcopy(optimizer)  # (a copy has no hooks, as torch's optimizers)
    twin.step(losses_of(twin.model))
    assert calls == ["pre"]


def test_the_step_is_one_profiler_range_and_warns_at_the_caller() -> None:
    model = mlp()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.step(losses_of(model))
    names = {event.name for event in profile.events()}
    assert "Optimizer.step#PartialJDOptimizer.step" in names
    assert "Optimizer.step#SGD.step" in names
    optimizer.zero_grad()
    torch.autograd.backward(losses_of(model).sum())
    with pytest.warns(UserWarning, match="plain step") as record:
        optimizer.step()
    assert record[0].filename == __file__
