"""Edges a mutation audit found unpinned, each against the per-loss oracle or the documented
contract: a non-finite micro-batch accumulated under ``weighted_loss``, ``model.zero_grad()``
after a non-finite backward, considered parameters used by hand (under autocast, in a call's own
input, in the trunk below every considered call), a row feeding a second loss slightly, a last
position feeding a loss of shifted tokens, a module whose state changed after its forward, tags
that are powers of two up to the documented count, tags that cannot name rows."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_gramian, relative_error
from torch import Tensor, nn
from torch.optim import SGD

from pjd_optim import Mean, NonFinite, PartialJDOptimizer
from pjd_optim import _rowmap as rowmap

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def mlp_and_optimizer(nonfinite: str) -> tuple[nn.Sequential, PartialJDOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    base = SGD(model.parameters(), lr=0.1)
    mode: NonFinite = "raise" if nonfinite == "raise" else "skip"
    return model, PartialJDOptimizer(base, model, considered=model[2], nonfinite=mode)


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_non_finite_micro_batch_before_a_finite_one_is_never_stepped(nonfinite: str) -> None:
    """Two ``weighted_loss`` backwards accumulated, the first non-finite: ``step()`` refuses or
    skips (the second, finite, must not clear the first's record)."""
    model, optimizer = mlp_and_optimizer(nonfinite)
    x, t = torch.randn(6, 5), torch.randn(6, 2)
    before = [p.detach().clone() for p in model.parameters()]
    bad = (model(x) - t).pow(2).mean(dim=1) * torch.tensor([1, 1, float("inf"), 1, 1, 1])
    torch.autograd.backward(optimizer.weighted_loss(bad))
    torch.autograd.backward(optimizer.weighted_loss((model(x) - t).pow(2).mean(dim=1)))
    if nonfinite == "raise":
        with pytest.raises(ValueError):
            optimizer.step()
    else:
        optimizer.step()
        assert optimizer.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_the_models_zero_grad_clears_a_non_finite_backward(nonfinite: str) -> None:
    """After a non-finite ``backward(losses)``, ``model.zero_grad()`` (the module's) removes its
    gradients: a plain ``step()`` is then a no-op, and training goes on."""
    model, optimizer = mlp_and_optimizer(nonfinite)
    x, t = torch.randn(6, 5), torch.randn(6, 2)
    optimizer.backward(
        (model(x) - t).pow(2).mean(dim=1) * torch.tensor([1, 1, float("inf"), 1, 1, 1])
    )
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert optimizer.skipped_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    (model(x) - t).pow(2).mean().backward()
    optimizer.step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def refused_or_exact(
    model: nn.Module, considered: Sequence[nn.Module], losses_of: Callable[[nn.Module], Tensor]
) -> bool:
    """The step is refused (``True``) or its Gramian is the oracle's (``False``)."""
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=considered, weighting=Mean()
    )
    try:
        optimizer.backward(losses_of(model))
    except ValueError:
        return True
    assert optimizer.last_step is not None
    ids = {id(p) for module in considered for p in module.parameters()}
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    params = [q for p, q in pairs if id(p) in ids]
    expected = oracle_gramian(losses_of(reference), params)
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-4
    return False


class TiedByHand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(5, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        out: Tensor = self.head(h) + F.linear(h.flip(1), self.head.weight)
        return out


@pytest.mark.parametrize("bf16", [False, True])
def test_a_weight_used_in_its_call_and_by_hand_is_refused(bf16: bool) -> None:
    """Under autocast the cast of ``head.weight`` is one cached node, taken inside ``head``'s
    call and outside it."""
    torch.manual_seed(0)
    model = TiedByHand()
    x, t = torch.randn(6, 5), torch.randn(6, 4)

    def losses_of(m: nn.Module) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(x)
        losses: Tensor = (out.float() - t).pow(2).mean(dim=1)
        return losses

    assert refused_or_exact(model, [model.head], losses_of)


class BiasBeforeCall(nn.Module):
    """A parent adding its child's bias to the child's input itself."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(5, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(torch.tanh(self.body(x)) + self.head.bias)
        return out


@pytest.mark.parametrize("considered", ["head", "body and head"])
def test_a_considered_bias_used_in_its_own_calls_input_is_refused(considered: str) -> None:
    """Outside every call of its module: with ``body`` considered, in no call's region; with the
    head alone, in the trunk below the only considered call (the walk used to stop there, and
    the Gramian was silently 50% off)."""
    torch.manual_seed(0)
    model = BiasBeforeCall().double()
    x, t = torch.randn(6, 5, dtype=F64), torch.randn(6, 4, dtype=F64)
    modules: list[nn.Module] = [model.head] if considered == "head" else [model.body, model.head]

    def losses_of(m: nn.Module) -> Tensor:
        losses: Tensor = (m(x) - t).pow(2).mean(dim=1)
        return losses

    assert refused_or_exact(model, modules, losses_of)


def test_a_row_feeding_a_second_loss_slightly_is_refused_or_exact() -> None:
    """Row 1 also feeds loss 0, at 1e-8 of its size (float64): never taken as clean."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    reference = copy.deepcopy(model)
    x, t = torch.randn(6, 5, dtype=F64), torch.randn(6, 3, dtype=F64)
    with torch.no_grad():
        eps = float(1e-8 * (2 * (model(x)[1, :3] - t[1])).abs().max())

    def losses_of(m: nn.Module) -> Tensor:
        y = m(x)
        leak = torch.zeros(6, dtype=F64)
        leak[0] = eps * y[1, 0]
        losses: Tensor = (y[:, :3] - t).pow(2).sum(dim=1) + leak
        return losses

    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=model[2], weighting=Mean()
    )
    for _ in range(40):  # fresh tags at every step
        try:
            optimizer.backward(losses_of(model))
        except ValueError:
            continue
        assert optimizer.last_step is not None
        expected = oracle_gramian(losses_of(reference), list(reference[2].parameters()))
        assert relative_error(optimizer.last_step.gramian, expected) < 1e-11
        model.zero_grad()


def test_a_last_position_feeding_a_loss_of_shifted_tokens_is_not_dropped() -> None:
    """Per-token losses on the first ``T − 1`` positions (the expected map leaves the last one
    feeding nothing); loss 0 also reads the last position of row 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, target = torch.randn(6, 4, 5, dtype=F64), torch.randn(6, 4, 3, dtype=F64)

    def losses_of(m: nn.Module) -> Tensor:
        tokens: Tensor = (m(x) - target).pow(2).mean(dim=-1)
        shifted = tokens[:, :-1].flatten()
        extra = torch.zeros_like(shifted)
        extra[0] = tokens[0, -1]
        return shifted + extra

    refused_or_exact(model, [model[2]], losses_of)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5))
        self.scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.weight.T) * self.scale


def test_a_state_change_of_two_percent_after_the_forward_is_refused() -> None:
    """The generic rule's re-run must reproduce the forward that happened (float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), Scaled())
    x, t = torch.randn(8, 5), torch.randn(8, 3)
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=model[2], weighting=Mean()
    )
    losses = (model(x) - t).pow(2).mean(dim=1)
    scaled = model[2]
    assert isinstance(scaled, Scaled)
    scaled.scale = 1.02
    with pytest.raises(ValueError, match="re-run"):
        optimizer.backward(losses)


@pytest.mark.parametrize(
    ("m", "dtype"),
    [(65, torch.float32), (65, torch.bfloat16), (9, torch.float16), (129, torch.float64)],
)
def test_tags_are_powers_of_two_up_to_the_documented_count(m: int, dtype: torch.dtype) -> None:
    tags = rowmap.TagSource().draw(m, torch.zeros(m, dtype=dtype), dtype)
    exponents = torch.log2(tags.exact)
    assert torch.equal(exponents, exponents.round())
    assert float(tags.spacing).is_integer()


def test_rows_off_the_expected_map_are_unknown_where_the_tags_cannot_name() -> None:
    """800 losses under bfloat16: the tags confirm the expected map, and name no other loss."""
    m = 800
    tags = rowmap.TagSource().draw(m, torch.zeros(m, dtype=torch.bfloat16), torch.bfloat16)
    assert not tags.identifies
    g = torch.randn(m, 7, generator=torch.Generator().manual_seed(0)) + 3.0
    truth = torch.arange(m).roll(1)
    truth[:400] = torch.arange(400)
    h = tags.exact.float()[truth].unsqueeze(1) * g
    sigma = rowmap.identify(rowmap.ratios(g, h, tags.delta), tags, torch.arange(m))
    assert torch.equal(sigma[:400], torch.arange(400))
    assert bool((sigma[400:] == rowmap.UNKNOWN).all())


@pytest.mark.parametrize("batch", [41, 64])
def test_a_cosine_loss_near_convergence_is_followed_not_refused(batch: int) -> None:
    """float32, per-sample ``1 − cos`` at an angle of 1e-3 (its backward cancels): with tags
    that are not powers of two (beyond 41 losses, before their cap was raised to 65) every draw
    refused the step; powers of two scale the tagged pass exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    x = torch.randn(batch, 16)
    with torch.no_grad():
        out = model(x)
        target = out + 1e-3 * out.norm(dim=1, keepdim=True) * torch.randn(batch, 8) / 8**0.5
    for _ in range(3):
        optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
        losses = 1 - F.cosine_similarity(model(x), target, dim=1)
        expected = oracle_gramian(losses, list(model[2].parameters()))
        optimizer.backward(losses)
        assert optimizer.last_step is not None
        assert relative_error(optimizer.last_step.gramian, expected) < 1e-5
        optimizer.close()
        model.zero_grad(set_to_none=True)
