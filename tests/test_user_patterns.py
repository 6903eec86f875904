"""Patterns of training scripts around the step: gradient hooks on tensors and parameters,
parameters replaced after the optimizer was built, base optimizers that need a closure,
TorchScript modules. Each is exact against the oracle or refused before anything changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_unchanged, oracle_grads, oracle_gramian, relative_error, snapshot
from torch import Tensor, nn

from pjd_optim import PartialJDOptimizer, _resume

F64 = torch.float64


class Net(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.trunk = nn.Linear(16, hidden)
        self.head = nn.Linear(hidden, 8)
        self.boundary = ""  # "hook": a hook doubling the head's input gradient; "retain"

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.trunk(x))
        if self.boundary == "hook":
            h.register_hook(double)  # type: ignore[no-untyped-call]
        elif self.boundary == "retain":
            h.retain_grad()
        out: Tensor = self.head(h)
        return out


def double(g: Tensor) -> Tensor:
    return 2 * g


def batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(24, 16, generator=gen, dtype=F64), torch.randint(0, 8, (24,), generator=gen)


def losses_of(model: nn.Module) -> Tensor:
    x, y = batch()
    return F.cross_entropy(model(x), y, reduction="none")


def assert_autograd_mode_exact(model: Net) -> None:
    """``gramian_mode="autograd"`` over the head: its Gramian against the oracle."""
    optimizer = PartialJDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                   considered=model.head, gramian_mode="autograd")  # fmt: skip
    optimizer.backward(losses_of(model))
    assert optimizer.last_step is not None
    expected = oracle_gramian(losses_of(model), list(model.head.parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12


@pytest.mark.parametrize("boundary", ["hook", "retain"])
def test_a_gradient_hook_at_the_boundary_runs_once(
    monkeypatch: pytest.MonkeyPatch, boundary: str
) -> None:
    """A hook doubling the gradient of the head's input (or ``retain_grad`` there): the step
    does not resume the trunk's backward from that tensor (the hook ran in both backwards: the
    trunk's ``.grad`` was twice the oracle's). Every ``.grad`` against the oracle."""
    monkeypatch.setattr(_resume, "MIN_SAVED_FLOPS", 0)  # (would resume at any size)
    torch.manual_seed(0)
    model = Net(32).double()
    model.boundary = boundary
    optimizer = PartialJDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                   considered=model.head)  # fmt: skip
    weights = optimizer.backward(losses_of(model))
    assert optimizer.last_step is not None and not optimizer.last_step.resumed
    expected = oracle_grads(losses_of(model), list(model.parameters()), weights)
    for p, g in zip(model.parameters(), expected, strict=True):
        assert p.grad is not None and relative_error(p.grad, g) < 1e-12
    model.boundary = ""  # (without the hook the same step resumes)
    model.zero_grad()
    optimizer.backward(losses_of(model))
    assert optimizer.last_step is not None and optimizer.last_step.resumed


def test_gradient_hooks_on_considered_parameters_are_refused() -> None:
    """A hook masking rows of the head's gradient (class-incremental training): autograd applies
    it to ``.grad``, the Gramian cannot see it (it was 160% off): refused, naming the
    parameters, before anything changes; ``gramian_mode="autograd"`` honours it."""
    torch.manual_seed(0)
    model = Net(32).double()
    mask = torch.zeros(8, 1, dtype=F64)
    mask[6:] = 1
    model.head.weight.register_hook(lambda g: g * mask)  # type: ignore[no-untyped-call]
    optimizer = PartialJDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                   considered=model.head)  # fmt: skip
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"\['head.weight'\] have gradient hooks"):
        optimizer.step(losses_of(model))
    assert_unchanged(before, snapshot(model, optimizer))
    assert_autograd_mode_exact(model)


@pytest.mark.parametrize("how", ["frozen", "trainable", "parametrized"])
def test_a_considered_parameter_replaced_after_the_build_is_refused(how: str) -> None:
    """``head.weight = nn.Parameter(...)`` (frozen: the Gramian still counted the old weight,
    1160% off), or a parametrization added after the build: the optimizers hold the old
    parameter, refused before anything changes."""
    torch.manual_seed(0)
    model = Net(32).double()
    optimizer = PartialJDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                   considered=model.head)  # fmt: skip
    if how == "parametrized":
        torch.nn.utils.parametrizations.spectral_norm(model.head)
    else:
        weight = model.head.weight.detach().clone()
        model.head.weight = nn.Parameter(weight, requires_grad=how == "trainable")
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"\['head.weight'\] were replaced after the optimizer"):
        optimizer.step(losses_of(model))
    assert_unchanged(before, snapshot(model, optimizer))


def test_a_base_optimizer_that_needs_a_closure_is_refused() -> None:
    """LBFGS re-evaluates the loss within its step (a raw TypeError, after ``.grad`` was
    written): refused when the wrapper is built."""
    model = Net(8)
    with pytest.raises(ValueError, match=r"LBFGS.step needs a closure"):
        PartialJDOptimizer(torch.optim.LBFGS(model.parameters()), model, considered=model.head)


def test_a_torchscript_module_is_refused_clearly() -> None:
    """A scripted considered module takes no forward hooks (a raw RuntimeError when the wrapper
    was built): refused, naming it; ``gramian_mode="autograd"`` is exact."""
    torch.manual_seed(0)
    model = Net(32).double()
    model.head = torch.jit.script(model.head)  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"\['head'\] are TorchScript modules"):
        PartialJDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                           considered=model.head)  # fmt: skip
    assert_autograd_mode_exact(model)
