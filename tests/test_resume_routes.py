"""A trunk tensor entering the considered part by another route than as a call's input (moved
or mixed across rows between the calls: in-batch pairs, a rolled or flipped batch, a batch mean
in a residual): the resumed backward scaled its rows by the weights of the call it enters, and
the trunk's gradients were 1e-4 to 8e-2 off. Its rows are now named by the tagged passes, so the
step falls back to ``losses.backward(w)`` where a row feeds several losses, and still resumes
where the route keeps each row's loss (a scaled copy, a row-wise residual)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_backward, relative_error
from torch import Tensor, nn
from torch.optim import SGD

from pjd_optim import PartialJDOptimizer

B = 16
PAIR = torch.randperm(B, generator=torch.Generator().manual_seed(1))
LABELS = torch.arange(B) % 7


def ce(z: Tensor) -> Tensor:
    return F.cross_entropy(z, LABELS, reduction="none")


ROUTES: dict[str, tuple[Callable[[Tensor, nn.Module], Tensor], bool]] = {
    # name: (losses from the trunk features h and the considered head, whether it may resume)
    "pairs": (lambda h, head: (head(h) - head(h[PAIR])).pow(2).sum(1), False),
    "mixup": (lambda h, head: 0.7 * ce(head(h)) + 0.3 * ce(head(h[PAIR])), False),
    "roll": (lambda h, head: ce(head(h)) + 0.5 * ce(head(h.roll(1, 0))), False),
    "flip": (lambda h, head: ce(head(h)) + head(h.flip(0))[:, 0], False),
    "batch mean": (lambda h, head: ce(head(h)) + ce(head(h + h.mean(0))), False),
    "scaled copy": (lambda h, head: ce(head(h)) + ce(head(2 * h)), True),
    "residual": (lambda h, head: ce(head(h) + h[:, :256]), True),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_second_route_into_the_considered_part_is_exact(route: str) -> None:
    losses_of, resumes = ROUTES[route]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 512), nn.Tanh(), nn.Linear(512, 256)).double()
    reference = copy.deepcopy(model)
    x = torch.randn(B, 32, dtype=torch.float64)

    def losses(m: nn.Sequential) -> Tensor:
        return losses_of(m[1](m[0](x)), m[2])

    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    weights = optimizer.backward(losses(model))
    assert optimizer.last_step is not None and optimizer.last_step.resumed == resumes
    expected = oracle_backward(
        losses(reference), list(reference[2].parameters()), list(reference.parameters())
    )
    assert relative_error(weights, expected) < 1e-10
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert relative_error(p.grad, q.grad) < 1e-10


def test_a_boundary_entering_two_calls_whose_rows_feed_other_losses_falls_back() -> None:
    """A language-model head and a value head read the same features, the value term shifted by
    one loss: each call's rows feed single losses, but a feature row feeds two. Refused once the
    head was large enough to resume (the graph above the boundary freed); now exact."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(32, 512), nn.Tanh())
    model = nn.ModuleDict({"trunk": trunk, "head": nn.Linear(512, 256), "value": nn.Linear(512, 1)})
    model = model.double()
    reference = copy.deepcopy(model)
    x = torch.randn(B, 32, dtype=torch.float64)

    def losses(m: nn.ModuleDict) -> Tensor:
        h = m["trunk"](x)
        out: Tensor = ce(m["head"](h)) + 0.5 * m["value"](h).squeeze(1).roll(1, 0).pow(2)
        return out

    considered = [model["head"], model["value"]]
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=considered)
    weights = optimizer.backward(losses(model))
    assert optimizer.last_step is not None and not optimizer.last_step.resumed
    params = [*reference["head"].parameters(), *reference["value"].parameters()]
    expected = oracle_backward(losses(reference), params, list(reference.parameters()))
    assert relative_error(weights, expected) < 1e-10
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert relative_error(p.grad, q.grad) < 1e-10
