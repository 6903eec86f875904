"""The step's contract with torch's loop: zero_grad between backward and step, a step with no
gradient, a weighting class for an instance, pickles with a scheduler, zero_grad's zeros."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
from torch.optim import SGD, Adam, Optimizer
from torch.optim.lr_scheduler import LRScheduler, StepLR

from pjd_optim import PartialJDOptimizer
from pjd_optim.weightings import MGDA, DualProj, Mean, UPGrad


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(seed: int) -> Tensor:
    return torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def losses_of(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out: Tensor = (model(x) - 1.0).pow(2).sum(dim=1)
    return out


def sgd_optimizer(model: nn.Sequential) -> PartialJDOptimizer:
    return PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])


def parameters_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught]


# -- zero_grad between backward(losses) and step() -------------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_backward_and_step_makes_the_step_warn_that_the_gradient_was_cleared(
    set_to_none: bool,
) -> None:
    model = mlp()
    optimizer = sgd_optimizer(model)
    optimizer.backward(losses_of(model, batch(0)))
    optimizer.zero_grad(set_to_none=set_to_none)
    before = parameters_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    assert len(caught) == 1 and caught[0].category is UserWarning, messages(caught)
    message = messages(caught)[0]
    assert "cleared by zero_grad() before step()" in message
    assert "applies whatever is in .grad" in message
    assert "zero_grad() before backward(losses)" in message and "step(losses)" in message
    assert same(before, parameters_of(model))  # SGD on no (or zero) gradient: nothing moved


def test_step_with_no_gradient_and_no_backward_is_silent_and_the_plain_warning_still_comes() -> (
    None
):
    model = mlp()
    optimizer = sgd_optimizer(model)
    before = parameters_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()  # every .grad is None
        optimizer.zero_grad()
        optimizer.step()
    assert messages(caught) == []
    assert same(before, parameters_of(model))
    torch.autograd.backward(losses_of(model, batch(0)).mean())  # the plain loop: warned once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    assert len(caught) == 1 and "without Jacobian descent" in messages(caught)[0]


def test_distributed_checkpoint_state_initialisation_steps_silently_and_changes_nothing() -> None:
    """``get_optimizer_state_dict`` initialises an empty state by ``step()`` on zero gradients
    (``lr = 0``), outside any process group too."""
    model = mlp()
    optimizer = PartialJDOptimizer(Adam(model.parameters(), lr=0.1), model, considered=model[2])
    before = parameters_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = get_optimizer_state_dict(model, optimizer)
    assert messages(caught) == []
    assert len(state["state"]) == len(before) == len(optimizer.state)
    assert same(before, parameters_of(model))
    assert all(p.grad is None for p in model.parameters())


def test_zero_grad_before_backward_or_a_second_backward_after_it_steps_silently() -> None:
    model, twin = mlp(), mlp()
    optimizer, reference = sgd_optimizer(model), sgd_optimizer(twin)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.zero_grad()  # the usual order
        optimizer.backward(losses_of(model, batch(0)))
        optimizer.step()
        optimizer.backward(losses_of(model, batch(1)))  # a backward, cleared, then another one
        optimizer.zero_grad()
        optimizer.backward(losses_of(model, batch(2)))
        optimizer.step()
        optimizer.zero_grad()
        reference.step(losses_of(twin, batch(0)))
        reference.zero_grad()
        reference.step(losses_of(twin, batch(2)))
    assert messages(caught) == []
    assert same(parameters_of(model), parameters_of(twin))


def test_grad_scaler_loop_with_an_overflowed_step_stays_silent() -> None:
    """``GradScaler.step`` skips ``optimizer.step()`` on an overflow: the backward stays pending
    when the next iteration's ``zero_grad()`` clears it, and the next backward steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    optimizer = sgd_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = batch(0).float()
    before = parameters_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for overflow in (True, False):
            optimizer.zero_grad()
            losses = losses_of(model, x) * (float("inf") if overflow else 1.0)
            optimizer.backward(scaler.scale(losses))
            scaler.step(optimizer)
            scaler.update()
            if overflow:
                assert same(before, parameters_of(model))
    assert messages(caught) == []
    assert not same(before, parameters_of(model))


# -- a weighting class for an instance -------------------------------------------------------------


class Custom:
    def __call__(self, gramian: Tensor, /) -> Tensor:
        return gramian.diagonal()


@pytest.mark.parametrize("weighting", [UPGrad, Mean, MGDA, DualProj, Custom])
def test_a_weighting_class_instead_of_an_instance_is_a_type_error_and_hooks_nothing(
    weighting: type,
) -> None:
    model = mlp()
    base = SGD(model.parameters(), lr=0.1)
    groups_before = copy.copy(base.param_groups)
    name = weighting.__name__
    bad: Any = weighting
    with pytest.raises(
        TypeError, match=rf"weighting={name} is a class: pass an instance, {name}\(\)"
    ):
        PartialJDOptimizer(base, model, considered=model[2], weighting=bad)
    assert not any(m._forward_hooks for m in model.modules())
    assert base.param_groups == groups_before


# -- pickles and copies with a scheduler attached --------------------------------------------------


def assert_same_base_state(a: Optimizer, b: Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key, values in sa["state"].items():
        assert values.keys() == sb["state"][key].keys()
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][key][name]))


def assert_same_steps(a: PartialJDOptimizer, b: PartialJDOptimizer) -> None:
    assert a.skipped_steps == b.skipped_steps
    assert a.last_step is not None and b.last_step is not None
    for field in dataclasses.fields(a.last_step):
        mine, theirs = getattr(a.last_step, field.name), getattr(b.last_step, field.name)
        if isinstance(mine, Tensor):
            assert isinstance(theirs, Tensor) and torch.equal(mine, theirs), field.name
        else:
            assert mine == theirs, field.name


def roundtrip_pickle(optimizer: PartialJDOptimizer) -> PartialJDOptimizer:
    restored = pickle.loads(pickle.dumps(optimizer))
    assert isinstance(restored, PartialJDOptimizer)
    return restored


def roundtrip_deepcopy(optimizer: PartialJDOptimizer) -> PartialJDOptimizer:
    return copy.deepcopy(optimizer)


ROUNDTRIPS = {"pickle": roundtrip_pickle, "deepcopy": roundtrip_deepcopy}


@pytest.mark.parametrize("roundtrip", sorted(ROUNDTRIPS))
@pytest.mark.parametrize("on", ["wrapper", "base_before_wrapping"])
def test_pickle_and_deepcopy_with_a_scheduler_attached_keep_everything_and_step(
    roundtrip: str, on: str
) -> None:
    model = mlp()
    base = Adam(model.parameters(), lr=0.1)
    scheduler: LRScheduler | None = (
        StepLR(base, step_size=1, gamma=0.5) if on != "wrapper" else None
    )
    optimizer = PartialJDOptimizer(
        base,
        model,
        considered=model[2],
        weighting=UPGrad(norm_eps=1e-3, reg_eps=1e-3),
        distributed="global",
        nonfinite="skip",
    )
    if scheduler is None:
        scheduler = StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step(losses_of(model, batch(0)) * float("nan"))  # skipped
    optimizer.step(losses_of(model, batch(1)))
    optimizer.zero_grad()
    scheduler.step()
    params = parameters_of(model)

    restored = ROUNDTRIPS[roundtrip](optimizer)

    assert restored.model is not model and restored.base is not base
    assert same(params, parameters_of(restored.model))
    assert_same_steps(restored, optimizer)
    assert type(restored.weighting) is UPGrad and repr(restored.weighting) == repr(
        optimizer.weighting
    )
    assert (restored.gramian_mode, restored.distributed, restored.nonfinite) == (
        "hooks",
        "global",
        "skip",
    )
    assert_same_base_state(restored.base, base)
    assert restored.state_dict()["param_groups"][0]["lr"] == 0.05
    with warnings.catch_warnings(record=True) as caught:  # a new scheduler on the copy
        warnings.simplefilter("always")
        restored_scheduler = StepLR(restored, step_size=1, gamma=0.5)
        restored.step(losses_of(restored.model, batch(2)))
        restored_scheduler.step()
    assert messages(caught) == []
    assert restored.last_step is not None and restored.last_step.weights.shape == (5,)
    assert not same(params, parameters_of(restored.model))
    assert same(params, parameters_of(model))  # the original is untouched
    optimizer.step(losses_of(model, batch(2)))  # and still steps, its scheduler too
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.025


# -- zero_grad(set_to_none=False) ------------------------------------------------------------------


def test_zero_grad_set_to_none_false_leaves_zero_gradients_where_there_were_gradients() -> None:
    model = mlp()
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    base = SGD([*model.parameters(), unused], lr=0.1)
    optimizer = PartialJDOptimizer(base, model, considered=model[2])
    optimizer.backward(losses_of(model, batch(0)))
    assert all(p.grad is not None for p in model.parameters()) and unused.grad is None
    optimizer.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not bool(p.grad.any())
    assert unused.grad is None
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
