"""Guards of a step around the caller's own backward: a GradScaler over a fused base optimizer
(it stepped on scaled gradients and raised on an overflow, since GradScaler's path for fused
optimizers set ``grad_scale``/``found_inf`` on the wrapper, which the base never read); NaN from
finite losses below the considered part after ``weighted_loss(...).backward()`` (it reached the
parameters); a NaN gradient rewritten out of place after a non-finite ``backward`` (it passed the
guard, which followed the gradient tensor's identity)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_backward
from torch import Tensor, nn

from pjd_optim import NonFinite, PartialJDOptimizer

F64 = torch.float64


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=generator, dtype=F64), torch.arange(6) % 3


def assert_parameters(model: nn.Module, before: dict[str, Tensor]) -> None:
    """The step changed no parameter (NaN gradients rule out comparing the gradients too)."""
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def fused_sgd(model: nn.Module) -> torch.optim.SGD:
    try:
        return torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    except (RuntimeError, ValueError, TypeError):
        pytest.skip("this torch has no fused SGD on the CPU")


@pytest.mark.parametrize("entry", ["backward", "weighted_loss"])
def test_a_grad_scaler_over_a_fused_base_unscales_and_skips_overflows(entry: str) -> None:
    model, reference = mlp(), mlp()
    optimizer = PartialJDOptimizer(fused_sgd(model), model, considered=model[2])
    plain = fused_sgd(reference)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batch()
    losses = F.cross_entropy(model(x), y, reduction="none")
    if entry == "backward":
        optimizer.backward(scaler.scale(losses))
    else:
        torch.autograd.backward(scaler.scale(optimizer.weighted_loss(losses)))
    scaler.step(optimizer)
    scaler.update()
    oracle_backward(
        F.cross_entropy(reference(x), y, reduction="none"),
        list(reference[2].parameters()),
        list(reference.parameters()),
    )
    plain.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)

    overflow = F.cross_entropy(model(x), y, reduction="none") * torch.tensor(
        [torch.inf] + [1.0] * 5
    )
    before = copy.deepcopy(model.state_dict())
    optimizer.zero_grad()
    optimizer.backward(scaler.scale(overflow))
    scaler.step(optimizer)  # (skipped, not an error)
    scaler.update()
    assert scaler.get_scale() == 512.0
    assert_parameters(model, before)


class SqrtAtZero(nn.Module):
    """``sqrt(h²)`` below the head with ``h`` exactly 0 in one unit: 0·inf in the backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.head = nn.Linear(4, 4).double(), nn.Linear(4, 3).double()
        with torch.no_grad():
            self.a.weight[0] = 0.0
            self.a.bias[0] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(torch.sqrt(self.a(x).pow(2)))
        return out


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_nan_from_finite_losses_after_weighted_loss_never_reaches_the_parameters(
    nonfinite: NonFinite,
) -> None:
    model = SqrtAtZero()
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, considered=model.head,
        nonfinite=nonfinite,
    )  # fmt: skip
    x, y = batch()
    before = copy.deepcopy(model.state_dict())
    torch.autograd.backward(optimizer.weighted_loss(F.cross_entropy(model(x), y, reduction="none")))
    if nonfinite == "raise":
        with pytest.raises(ValueError, match="gradients are not finite"):
            optimizer.step()
    else:
        optimizer.step()
        assert optimizer.skipped_steps == 1
    assert_parameters(model, before)


def test_a_nan_gradient_rewritten_out_of_place_is_still_refused() -> None:
    model = mlp()
    optimizer = PartialJDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                   considered=model[2])  # fmt: skip
    x, y = batch()
    losses = F.cross_entropy(model(x), y, reduction="none") * torch.tensor([torch.nan] + [1.0] * 5)
    optimizer.backward(losses)
    for p in model.parameters():
        assert p.grad is not None
        p.grad = p.grad / 2  # (a new tensor: gradient accumulation's averaging, say)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="gradients are not finite"):
        optimizer.step()
    assert_parameters(model, before)


def test_a_closure_that_calls_backward_and_returns_its_losses_steps_once() -> None:
    """torch's closure shape with the Jacobian-descent backward inside (``optimizer.backward(l);
    return l``): one step on that gradient, as the oracle's (a second backward through the freed
    graph raised before)."""
    model, reference = mlp(), mlp()
    optimizer = PartialJDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                   considered=model[2])  # fmt: skip
    x, y = batch()

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        optimizer.backward(losses)
        return losses

    optimizer.step(closure)
    oracle_backward(
        F.cross_entropy(reference(x), y, reduction="none"),
        list(reference[2].parameters()),
        list(reference.parameters()),
    )
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_state_dict_hooks_registered_on_the_wrapper_run() -> None:
    """``register_state_dict_pre/post_hook`` and ``register_load_state_dict_pre/post_hook`` on the
    wrapper run as on a torch optimizer (they never ran: the wrapper's state_dict bypassed them);
    a post hook's returned dict is the state dict."""
    model = mlp()
    optimizer = PartialJDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                   considered=model[2])  # fmt: skip
    calls: list[str] = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("save pre"))

    def tagged(opt: object, state: dict[str, object]) -> dict[str, object]:
        calls.append("save post")
        return {**state, "tag": 1}

    optimizer.register_state_dict_post_hook(tagged)

    def untag(opt: object, state: dict[str, object]) -> dict[str, object]:
        calls.append("load pre")
        return {k: v for k, v in state.items() if k != "tag"}

    optimizer.register_load_state_dict_pre_hook(untag)
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load post"))
    state = optimizer.state_dict()
    assert state["tag"] == 1
    optimizer.load_state_dict(state)
    assert calls == ["save pre", "save post", "load pre", "load post"]
