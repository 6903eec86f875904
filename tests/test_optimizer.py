"""The user-facing contract: step/backward/closure, groups, hooks, state shared with the base."""

from __future__ import annotations

import copy
import gc
import warnings
from typing import Any

import pytest
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
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD, Adam
from torch.optim.lr_scheduler import StepLR

from pjd_optim import Mean, PartialJDOptimizer, UPGrad
from pjd_optim._hooks import ModuleCall  # the engine's record of a call


def seed_model() -> Sequential:
    torch.manual_seed(0)
    return Sequential(Linear(10, 8), ReLU(), Linear(8, 5), ReLU(), Linear(5, 1))


def seed_optimizer(model: Sequential, lr: float = 0.1) -> PartialJDOptimizer:
    groups: list[dict[str, Any]] = [
        {"params": model[0].parameters()},
        {"params": model[2:].parameters(), "considered": True},
    ]
    base = SGD(groups, lr=lr)
    return PartialJDOptimizer(base, model)


def seed_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    losses: Tensor = MSELoss(reduction="none")(model(x).squeeze(dim=1), y)
    return losses


def test_design_example_runs_and_matches_oracle_sgd_update() -> None:
    model = seed_model()
    reference = copy.deepcopy(model)
    optimizer = seed_optimizer(model)
    ref_optimizer = SGD(reference.parameters(), lr=0.1)
    for x, y in zip(torch.randn(3, 16, 10), torch.randn(3, 16), strict=True):
        losses = seed_losses(reference, x, y)
        oracle_backward(losses, list(reference[2:].parameters()), trainable(reference))
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        optimizer.step(seed_losses(model, x, y))
        optimizer.zero_grad()
        assert_same_parameters(model, reference, 1e-4)


def test_matches_torchjd_engine_on_seed_example() -> None:
    autogram = pytest.importorskip("torchjd.autogram")
    aggregation = pytest.importorskip("torchjd.aggregation")
    model = seed_model()
    reference = copy.deepcopy(model)
    optimizer = seed_optimizer(model)
    ref_optimizer = SGD(reference.parameters(), lr=0.1)
    engine = autogram.Engine(reference[2:], batch_dim=0)
    weighting = aggregation.UPGradWeighting()
    for x, y in zip(torch.randn(4, 16, 10), torch.randn(4, 16), strict=True):
        losses = seed_losses(reference, x, y)
        torch.autograd.backward(losses, weighting(engine.compute_gramian(losses)))
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        optimizer.step(seed_losses(model, x, y))
        optimizer.zero_grad()
    assert_same_parameters(model, reference, 1e-4)


def test_step_without_losses_is_a_plain_base_step_and_warns_once_without_backward() -> None:
    """The old loop ``loss.backward(); optimizer.step()`` still steps, but says that it did no
    Jacobian descent (once)."""
    model = seed_model()
    optimizer = seed_optimizer(model)
    messages: list[list[str]] = []
    for _ in range(2):
        torch.autograd.backward(seed_losses(model, torch.randn(4, 10), torch.randn(4)).mean())
        expected = [p - 0.1 * p.grad for p in model.parameters() if p.grad is not None]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert optimizer.step() is None
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p, e)
        optimizer.zero_grad()
        messages.append([str(w.message) for w in caught])
    assert len(messages[0]) == 1 and "without Jacobian descent" in messages[0][0]
    assert messages[1] == []
    optimizer.backward(seed_losses(model, torch.randn(4, 10), torch.randn(4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # after backward(losses): no warning


def test_step_with_closure_equals_step_with_losses() -> None:
    x, y = torch.randn(8, 10), torch.randn(8)
    a, b = seed_model(), seed_model()
    opt_a, opt_b = seed_optimizer(a), seed_optimizer(b)
    opt_a.step(seed_losses(a, x, y))
    returned = opt_b.step(lambda: seed_losses(b, x, y))
    assert returned.shape == (8,)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_backward_twice_accumulates_each_micro_batch_weighted_by_its_own_gramian() -> None:
    model = seed_model()
    reference = copy.deepcopy(model)
    optimizer = seed_optimizer(model)
    batches = list(zip(torch.randn(2, 6, 10), torch.randn(2, 6), strict=True))
    expected = [torch.zeros_like(p) for p in reference.parameters()]
    for x, y in batches:
        losses = seed_losses(reference, x, y)
        weights = UPGrad()(oracle_gramian(losses, list(reference[2:].parameters())))
        for e, g in zip(expected, oracle_grads(losses, trainable(reference), weights), strict=True):
            e += g
        optimizer.backward(seed_losses(model, x, y))
    for p, e in zip(model.parameters(), expected, strict=True):
        assert p.grad is not None and relative_error(p.grad, e) < 1e-4


def test_multi_objective_losses_are_flattened_sample_major() -> None:
    torch.manual_seed(1)
    model = Sequential(Linear(4, 6), ReLU(), Linear(6, 3)).double()
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    weights = optimizer.backward((model(x) - y) ** 2)  # [5, 3] -> 15 objectives
    losses = (reference(x) - y) ** 2
    expected = oracle_gramian(losses, trainable(reference))
    assert optimizer.last_step is not None
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-10
    assert relative_error(weights, UPGrad()(expected)) < 1e-8


def test_two_forwards_concatenated_into_one_step() -> None:
    torch.manual_seed(2)
    model = Sequential(Linear(4, 6), ReLU(), Linear(6, 1)).double()
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    weights = optimizer.backward(torch.cat([model(x2), model(x1)]).squeeze(1) ** 2)
    losses = torch.cat([reference(x2), reference(x1)]).squeeze(1) ** 2
    expected = oracle_gramian(losses, list(reference[2].parameters()))
    assert optimizer.last_step is not None
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-10
    grads = oracle_grads(losses, trainable(reference), weights)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is not None and relative_error(p.grad, g) < 1e-10


def test_no_grad_and_unstepped_forwards_leave_nothing_behind() -> None:
    model = seed_model()
    optimizer = seed_optimizer(model, lr=0.01)
    for _ in range(200):
        x, y = torch.randn(8, 10), torch.randn(8)
        with torch.no_grad():
            model(x)
        with torch.inference_mode():
            model(x)
        seed_losses(model, x, y)  # a validation forward without no_grad, never stepped
        optimizer.step(seed_losses(model, x, y))
        optimizer.zero_grad()
    assert not [o for o in live_objects() if isinstance(o, ModuleCall)]


def live_objects() -> list[object]:
    """Live tensors and call records (``isinstance`` on torch's deprecated aliases warns)."""
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return [o for o in gc.get_objects() if isinstance(o, (Tensor, ModuleCall))]


def live_tensors() -> int:
    return sum(1 for o in live_objects() if isinstance(o, Tensor))


def test_soak_with_validation_forwards_keeps_live_tensors_constant() -> None:
    model = seed_model()
    optimizer = seed_optimizer(model, lr=0.01)
    x, y = torch.randn(8, 10), torch.randn(8)

    def steps(count: int) -> None:
        for _ in range(count):
            seed_losses(model, x, y)  # validation forward with grad enabled, never stepped
            optimizer.step(seed_losses(model, x, y))
            optimizer.zero_grad()

    steps(5)
    before = live_tensors()
    steps(300)
    assert live_tensors() == before


def test_model_wrapped_after_construction_still_steps_exactly() -> None:
    model = seed_model()
    reference = copy.deepcopy(model)
    optimizer = seed_optimizer(model)
    wrapped = nn.Sequential(model)  # e.g. a wrapper added by a training framework
    x, y = torch.randn(8, 10), torch.randn(8)
    weights = optimizer.backward(seed_losses(wrapped, x, y))
    losses = seed_losses(reference, x, y)
    expected = UPGrad()(oracle_gramian(losses, list(reference[2:].parameters())))
    assert relative_error(weights, expected) < 1e-4


def test_param_groups_and_state_are_the_base_optimizers() -> None:
    model = seed_model()
    groups: list[dict[str, Any]] = [
        {"params": model[0].parameters(), "lr": 1e-2},
        {"params": model[2:].parameters(), "lr": 1e-3, "considered": True},
    ]
    base = Adam(groups)
    optimizer = PartialJDOptimizer(base, model)
    scheduler = StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = torch.randn(8, 10), torch.randn(8)
    optimizer.step(seed_losses(model, x, y))
    scheduler.step()
    assert optimizer.param_groups is base.param_groups and optimizer.state is base.state
    assert [g["lr"] for g in base.param_groups] == [5e-3, 5e-4]
    state = copy.deepcopy(optimizer.state_dict())
    optimizer.step(seed_losses(model, x, y))
    optimizer.load_state_dict(state)
    assert optimizer.param_groups is base.param_groups and optimizer.state is base.state
    assert [len(g["params"]) for g in base.param_groups] == [2, 4]
    assert int(base.state[model.get_parameter("0.weight")]["step"]) == 1


def test_considered_argument_leaves_the_groups_as_built() -> None:
    model = seed_model()
    decay = [model[0].weight, model[2].weight, model[4].weight]
    no_decay = [model[0].bias, model[2].bias, model[4].bias]
    base = SGD(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=0.1
    )
    groups = [dict(g, params=list(g["params"])) for g in base.param_groups]
    optimizer = PartialJDOptimizer(base, model, considered=[model[4], model[2].weight])
    assert [dict(g, params=list(g["params"])) for g in base.param_groups] == groups
    considered = {id(p) for p in optimizer.considered_parameters()}
    assert considered == {id(model[4].weight), id(model[4].bias), id(model[2].weight)}


def test_step_and_zero_grad_hooks_and_repr() -> None:
    model = seed_model()
    optimizer = seed_optimizer(model)
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    optimizer.step(seed_losses(model, torch.randn(4, 10), torch.randn(4)))
    assert calls == ["pre", "post"]
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "PartialJDOptimizer" in repr(optimizer)


def test_mean_weighting_gives_the_mean_loss_gradient() -> None:
    model = seed_model()
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=model[4], weighting=Mean()
    )
    x, y = torch.randn(8, 10), torch.randn(8)
    optimizer.backward(seed_losses(model, x, y))
    torch.autograd.backward(seed_losses(reference, x, y).mean())
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad)


def test_close_and_garbage_collection_remove_every_hook() -> None:
    model = seed_model()
    optimizer = seed_optimizer(model)
    assert any(m._forward_hooks for m in model.modules())
    optimizer.close()
    assert not any(m._forward_hooks for m in model.modules())
    with seed_optimizer(model):
        assert any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    optimizer = seed_optimizer(model)
    del optimizer
    gc.collect()
    assert not any(m._forward_hooks for m in model.modules())


def test_last_step_reports_conflict_measures_against_a_brute_force_count() -> None:
    model = seed_model()
    optimizer = seed_optimizer(model)
    optimizer.backward(seed_losses(model, torch.randn(12, 10), torch.randn(12)))
    info = optimizer.last_step
    assert info is not None
    g = info.gramian
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    negative = sum(1 for i, j in pairs if g[i, j] < 0)
    assert info.conflict == pytest.approx(negative / len(pairs))
    cosines = [float(g[i, j] / (g[i, i] * g[j, j]).sqrt()) for i in range(12) for j in range(12)]
    assert info.min_cosine == pytest.approx(min(cosines), abs=1e-6)
    assert info.gramian_seconds > 0 and info.weighting_seconds > 0
