"""Non-finite steps never reach the parameters or the optimizer state: a closure returning
``None`` after a non-finite backward, a JD step after one, NaN gradients from below the considered
part (step, backward then step, resumed), the exact check where a norm overflows; and the
plain-loop warning after a JD step."""

import contextlib
import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from statecase import assert_same, batch, losses_of, mlp, parameters_of, same_tensors
from torch import Tensor, nn
from torch.optim import SGD, Adam

from pjd_optim import (
    PartialJDOptimizer,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


# -- a None-returning closure after a non-finite backward ------------------------------------------


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_none_returning_closure_after_a_non_finite_backward_raises_or_skips(
    nonfinite: str,
) -> None:
    """Lightning's order: the closure runs ``zero_grad`` and ``backward(losses)`` itself and
    returns ``None``; on non-finite losses that step raises or is skipped (counted), never taken
    on the non-finite gradients, and nothing (parameters, base state) changes."""
    model = mlp()
    optimizer = PartialJDOptimizer(
        Adam(model.parameters(), lr=0.1),
        model,
        considered=model[2],
        nonfinite=nonfinite,  # type: ignore[arg-type]
    )
    optimizer.step(losses_of(model, batch(0)))  # some Adam state
    before = parameters_of(model), copy.deepcopy(optimizer.state_dict())

    def none_closure() -> None:
        optimizer.zero_grad()
        optimizer.backward(losses_of(model, batch(1)) * float("inf"))

    if nonfinite == "raise":
        with pytest.raises(ValueError, match="not finite"):
            optimizer.step(none_closure)
    else:
        assert optimizer.step(none_closure) is None
        assert optimizer.skipped_steps == 1
    assert same_tensors(parameters_of(model), before[0])
    assert_same(optimizer.state_dict(), before[1], "state")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer.zero_grad()  # and training goes on
    optimizer.step(lambda: losses_of(model, batch(2)))
    assert not same_tensors(parameters_of(model), before[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_jd_step_after_a_non_finite_backward_never_steps_on_inf(nonfinite: str) -> None:
    """Gradient accumulation whose last micro-batch goes through ``step(losses)``: an earlier
    micro-batch overflowed, so the accumulated gradient is not finite; the step must raise or
    skip as ``nonfinite`` says, as a plain ``step()`` does."""
    model = mlp()
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1),
        model,
        considered=model[2],
        nonfinite=nonfinite,  # type: ignore[arg-type]
    )
    optimizer.backward(losses_of(model, batch(0)) * float("inf"))
    with contextlib.suppress(ValueError):
        optimizer.step(losses_of(model, batch(1)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


class AbsTrunk(nn.Module):
    """``b(|a(x)|)`` with ``|h| = sqrt(h·h)``: two units of ``a`` exactly 0, where the backward
    of ``sqrt`` is ``0·inf = NaN``; the losses and the Gramian (``b`` considered) are finite."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def zero_units(self) -> None:
        with torch.no_grad():
            self.a.weight[:2], self.a.bias[:2] = 0.0, 0.0

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.b(torch.sqrt(self.a(x) * self.a(x)))
        return out


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("how", ["step(losses)", "backward, step()", "resumed"])
def test_nan_gradients_below_the_considered_part_never_reach_the_parameters(
    nonfinite: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite losses and Gramian, NaN in the trunk's backward: ``step(losses)`` raises or skips
    with nothing changed (gradients restored); ``backward(losses)`` leaves them, as for
    non-finite losses, and the ``step()`` after it raises or skips. NaN used to reach the
    trunk's weights either way."""
    if how == "resumed":
        from pjd_optim import _resume

        monkeypatch.setattr(_resume, "MIN_SAVED_FLOPS", 0)
    torch.manual_seed(0)
    model = AbsTrunk()
    optimizer = PartialJDOptimizer(
        Adam(model.parameters(), lr=0.1),
        model,
        considered=[model.b],
        nonfinite=nonfinite,  # type: ignore[arg-type]
    )
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    optimizer.step((model(x) - y).pow(2).mean(dim=1))  # some Adam state (finite)
    optimizer.zero_grad()
    model.zero_units()
    before = parameters_of(model), copy.deepcopy(optimizer.state_dict())
    losses = (model(x) - y).pow(2).mean(dim=1)
    assert torch.isfinite(losses).all()
    if how == "backward, step()":
        optimizer.backward(losses)
        assert not torch.isfinite(model.a.weight.grad).all()  # type: ignore[arg-type]
        act: Callable[[], object] = optimizer.step
    else:
        act = lambda: optimizer.step(losses)  # noqa: E731
    if nonfinite == "raise":
        with pytest.raises(ValueError, match=r"not finite|non-finite"):
            act()
    else:
        act()
        assert optimizer.skipped_steps == 1
    if how != "backward, step()":
        assert all(p.grad is None for p in model.parameters())
    assert same_tensors(parameters_of(model), before[0])
    assert_same(optimizer.state_dict(), before[1], "state")


# -- the plain-loop warning after a JD step --------------------------------------------------------


def caught_messages(action: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught]


def test_the_plain_loop_warning_comes_once_after_jd_steps() -> None:
    """JD steps, then the plain loop (``loss.backward()``, ``step()``): the first plain step warns
    that it was plain; later ones do not; JD steps (``step(losses)``, ``backward`` + ``step()``)
    never warn."""
    model = mlp()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])

    def jd_steps() -> None:
        optimizer.step(losses_of(model, batch(0)))
        optimizer.zero_grad()
        optimizer.backward(losses_of(model, batch(1)))
        optimizer.step()
        optimizer.zero_grad()

    def plain_step(n: int) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.backward(losses_of(model, batch(n)).mean())
            optimizer.step()
            optimizer.zero_grad()

        return run

    assert caught_messages(jd_steps) == []
    first = caught_messages(plain_step(2))
    assert len(first) == 1 and "without Jacobian descent" in first[0]
    assert caught_messages(plain_step(3)) == []
    assert caught_messages(jd_steps) == []


def test_a_plain_step_right_after_a_jd_step_without_zero_grad_warns() -> None:
    """``step(losses)`` consumed its backward: a following ``step()`` re-applies the gradient left
    in ``.grad`` without Jacobian descent, and says so."""
    model = mlp()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    assert caught_messages(lambda: optimizer.step(losses_of(model, batch(0)))) == []
    messages = caught_messages(optimizer.step)
    assert len(messages) == 1 and "without Jacobian descent" in messages[0]


def test_the_non_finite_check_is_exact_where_a_norm_overflows() -> None:
    """Finite gradients whose 2-norm overflows (float16 above 256, float32 above 1e19) are
    finite: the step is not refused; a NaN entry in any of them is found."""
    from pjd_optim._checks import nonfinite_gradient

    big = torch.zeros(3, requires_grad=True)
    half = torch.zeros(2, dtype=torch.float16, requires_grad=True)
    small = torch.zeros(2, requires_grad=True)
    big.grad = torch.tensor([3e19, 3e19, 1.0])
    half.grad = torch.tensor([300.0, 300.0], dtype=torch.float16)
    small.grad = torch.tensor([1.0, 2.0])
    assert nonfinite_gradient([big, half, small]) is None
    for p in (big, half, small):
        saved = p.grad
        assert saved is not None
        p.grad = saved.clone()
        p.grad[-1] = float("nan")
        found = nonfinite_gradient([big, half, small])
        assert found is not None and found[0] is p and found[1] is p.grad
        p.grad = saved
