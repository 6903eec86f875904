"""Task objectives (a list of scalar losses) with a parameter tied between a considered module
and another one, and below a considered Linear with or without bias, against the oracle."""

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import relative_error
from torch import Tensor, nn
from torch.optim import SGD

from pjd_optim import (
    PartialJDOptimizer,
    UPGrad,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


# -- task objectives with a parameter tied across modules ------------------------------------------


class TiedLM(nn.Module):
    """An embedding tied to the output projection, a mixing layer between them, two task heads
    reading the logits (a language-model loss and an auxiliary one)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 5)
        self.mix = nn.Linear(5, 5)
        self.out = nn.Linear(5, 9, bias=True)
        self.out.weight = self.embed.weight
        self.aux = nn.Linear(9, 1)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.out(torch.tanh(self.mix(self.embed(ids))))
        return logits, self.aux(logits).squeeze(-1)


def task_losses(model: TiedLM, ids: Tensor, targets: Tensor) -> list[Tensor]:
    logits, aux = model(ids)
    lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return [lm, aux.pow(2).mean()]


@pytest.mark.parametrize("considered", ["embed", "out", "embed_and_mix"])
def test_task_objectives_with_a_weight_tied_across_modules_match_the_oracle(
    considered: str,
) -> None:
    """The tied weight is considered through either module: its Jacobian sums both uses (the
    embedding's and the output layer's), and every ``.grad`` is the oracle's (one
    ``autograd.grad`` per task loss): the considered parameters and those below any of their
    uses get ``Σ w_j ∇ℓ_j`` (``mix`` feeds the output layer's use of the tied weight), the heads
    after the considered part the plain sum."""
    torch.manual_seed(0)
    model = TiedLM().double()
    reference = copy.deepcopy(model)
    modules: dict[str, list[nn.Module]] = {
        "embed": [model.embed],
        "out": [model.out],
        "embed_and_mix": [model.embed, model.mix],
    }
    names = {
        "embed": ["embed.weight"],
        "out": ["embed.weight", "out.bias"],
        "embed_and_mix": ["embed.weight", "mix.weight", "mix.bias"],
    }[considered]
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=modules[considered]
    )
    ids = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step(task_losses(model, ids, targets))
    assert optimizer.last_step is not None
    check_task_step(
        optimizer, model, reference, before, names, task_losses(reference, ids, targets)
    )


def check_task_step(
    optimizer: PartialJDOptimizer,
    model: nn.Module,
    reference: nn.Module,
    before: dict[str, Tensor],
    considered: list[str],
    losses: list[Tensor],
) -> None:
    """Gramian, weights and the SGD update of every parameter against the oracle: the heads
    (parameters used after every use of a considered one) move by the plain sum, the rest by the
    weighted sum."""
    assert optimizer.last_step is not None
    ref = dict(reference.named_parameters())
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, [ref[n] for n in considered], retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    jacobian = torch.stack(rows)
    gramian = jacobian @ jacobian.T
    w = UPGrad()(gramian)
    assert relative_error(optimizer.last_step.gramian, gramian) < 1e-10
    assert relative_error(optimizer.last_step.weights, w) < 1e-9
    heads = {"out.bias", "aux.weight", "aux.bias", "head1.weight", "head1.bias", "head2.weight",
             "head2.bias"} - set(considered)  # fmt: skip
    after = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        coefficients = torch.ones_like(w) if name in heads else w
        total = sum(c * loss for c, loss in zip(coefficients, losses, strict=True))
        assert isinstance(total, Tensor)
        (expected,) = torch.autograd.grad(total, p, retain_graph=True)
        moved = (before[name] - after[name].detach()) / 0.1  # SGD: p ← p − lr · grad
        assert relative_error(moved, expected) < 1e-9, name


class TwoHeads(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.mid = nn.Linear(4, 4, bias=bias)
        self.head1, self.head2 = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = torch.tanh(self.mid(torch.tanh(self.trunk(x))))
        return [self.head1(features).pow(2).mean(), self.head2(features).exp().mean()]


@pytest.mark.parametrize("bias", [True, False])
def test_task_objectives_below_a_considered_linear_with_or_without_bias(bias: bool) -> None:
    """The trunk below the considered layer gets the weighted sum, whether that layer has a bias
    (its weight and bias used by one node) or not (its weight reached through a transposition)."""
    torch.manual_seed(0)
    model = TwoHeads(bias).double()
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model.mid)
    x = torch.randn(6, 3, dtype=F64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step(model(x))
    names = ["mid.weight", "mid.bias"] if bias else ["mid.weight"]
    check_task_step(optimizer, model, reference, before, names, reference(x))
