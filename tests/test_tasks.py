"""Task objectives: ``step([loss_1, …, loss_k])`` against an oracle (one ``autograd.grad`` per
task loss) and against TorchJD's ``mtl_backward``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytest
import torch
from oracle import assert_same_parameters, assert_unchanged, relative_error, snapshot
from torch import Tensor, nn
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from pjd_optim import PartialJDOptimizer, UPGrad

F64 = torch.float64


class TwoTasks(nn.Module):
    """TorchJD's MTL example as one module: a shared trunk and one head per task."""

    def __init__(self, trunk: nn.Module, width: int) -> None:
        super().__init__()
        self.shared = trunk
        self.task1, self.task2 = Linear(width, 1), Linear(width, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.shared(x)
        return self.task1(features), self.task2(features)


def torchjd_example() -> TwoTasks:
    torch.manual_seed(0)
    return TwoTasks(Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU()), 3).double()


def data(steps: int = 4) -> list[tuple[Tensor, Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 10, generator=gen, dtype=F64),
            torch.randn(16, 1, generator=gen, dtype=F64),
            torch.randn(16, 1, generator=gen, dtype=F64),
        )
        for _ in range(steps)
    ]


def task_losses(model: TwoTasks, x: Tensor, y1: Tensor, y2: Tensor) -> list[Tensor]:
    out1, out2 = model(x)
    return [MSELoss()(out1, y1), MSELoss()(out2, y2)]


def test_port_of_torchjds_mtl_example_equals_mtl_backward_with_upgrad() -> None:
    """Shared parameters get the UPGrad combination of the task gradients, each head the plain
    gradient of its own loss: TorchJD 0.18's ``mtl_backward`` + ``jac_to_grad(UPGrad())``."""
    autojac = pytest.importorskip("torchjd.autojac")
    aggregation = pytest.importorskip("torchjd.aggregation")
    ours_model = torchjd_example()
    theirs = copy.deepcopy(ours_model)
    optimizer = PartialJDOptimizer(
        SGD(ours_model.parameters(), lr=0.1), ours_model, considered=ours_model.shared
    )
    their_optimizer = SGD(theirs.parameters(), lr=0.1)
    aggregator = aggregation.UPGrad()
    for x, y1, y2 in data(6):
        optimizer.step(task_losses(ours_model, x, y1, y2))
        optimizer.zero_grad()
        features = theirs.shared(x)
        loss1 = MSELoss()(theirs.task1(features), y1)
        loss2 = MSELoss()(theirs.task2(features), y2)
        autojac.mtl_backward([loss1, loss2], features=features)
        autojac.jac_to_grad(theirs.shared.parameters(), aggregator)
        their_optimizer.step()
        their_optimizer.zero_grad()
    assert_same_parameters(ours_model, theirs)


def oracle_task_grads(
    losses: Sequence[Tensor],
    considered: Sequence[Tensor],
    heads: Sequence[Tensor],
    params: Sequence[Tensor],
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Gramian (one ``autograd.grad`` per task loss), UPGrad's weights, and the expected
    ``.grad`` of ``params``: ``heads`` the plain sum ``Σ_j ∇ℓ_j``, the rest ``Σ_j w_j ∇ℓ_j``."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, considered, retain_graph=True, materialize_grads=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    J = torch.stack(rows)
    gramian = J @ J.T
    weights = UPGrad()(gramian)
    head_ids = {id(p) for p in heads}
    expected = []
    for p in params:
        coefficients = torch.ones_like(weights) if id(p) in head_ids else weights
        total = sum(c * loss for c, loss in zip(coefficients, losses, strict=True))
        assert isinstance(total, Tensor)
        (g,) = torch.autograd.grad(total, p, retain_graph=True, materialize_grads=True)
        expected.append(g)
    return gramian, weights, expected


class Mixed(nn.Module):
    """A trunk (not considered) below a considered block with BatchNorm in train mode (task
    objectives do not need per-instance independence), a conv, a norm, attention, then a layer
    after the considered part feeding both tasks and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Conv1d(2, 4, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv1d(4, 4, 3, padding=1),
            nn.BatchNorm1d(4),
            nn.Tanh(),
            nn.Flatten(),
            nn.LayerNorm(24),
            nn.Linear(24, 8),
        )
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.both = nn.Linear(8, 8)
        self.head1, self.head2 = nn.Linear(8, 2), nn.Linear(8, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.block(torch.relu(self.trunk(x)))
        tokens = h.view(-1, 2, 4)
        h = h + self.attn(tokens, tokens, tokens)[0].flatten(1)
        h = torch.tanh(self.both(h))
        return self.head1(h), self.head2(h)


@pytest.mark.parametrize("gramian_mode", ["hooks", "autograd"])
def test_task_gramian_and_gradients_match_the_oracle(gramian_mode: str) -> None:
    torch.manual_seed(0)
    model = Mixed().double().train()
    reference = copy.deepcopy(model)
    considered: list[nn.Module] = [model.block, model.attn]
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1),
        model,
        considered=considered,
        gramian_mode=gramian_mode,  # type: ignore[arg-type]
    )
    x = torch.randn(6, 2, 6, dtype=F64)
    target = torch.randn(6, 2, dtype=F64)

    def losses_of(m: Mixed) -> list[Tensor]:
        out1, out2 = m(x)
        per_instance = torch.stack([(out1 - target).pow(2).sum(1), out2.squeeze(1).exp()], dim=1)
        return list(per_instance.mean(dim=0).unbind())  # [B, 2] reduced to 2 task objectives

    weights = optimizer.backward(losses_of(model))
    assert optimizer.last_step is not None
    ref_params = dict(reference.named_parameters())
    considered_ref = [p for m in (reference.block, reference.attn) for p in m.parameters()]
    heads = [p for m in (reference.both, reference.head1, reference.head2) for p in m.parameters()]
    names = [n for n, _ in model.named_parameters()]
    gramian, expected_w, expected = oracle_task_grads(
        losses_of(reference), considered_ref, heads, [ref_params[n] for n in names]
    )
    assert relative_error(optimizer.last_step.gramian, gramian) < 1e-10
    assert relative_error(weights, expected_w) < 1e-10
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        assert p.grad is not None and relative_error(p.grad, e) < 1e-10, name


def test_one_task_is_the_plain_gradient_and_hooks_equal_autograd() -> None:
    model = torchjd_example()
    twin = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    hooks = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model.shared)
    autograd = PartialJDOptimizer(
        SGD(twin.parameters(), lr=0.1), twin, considered=twin.shared, gramian_mode="autograd"
    )
    x, y1, y2 = data(1)[0]
    hooks.backward([sum(task_losses(model, x, y1, y2))])  # type: ignore[list-item]
    autograd.backward([sum(task_losses(twin, x, y1, y2))])  # type: ignore[list-item]
    loss = sum(task_losses(reference, x, y1, y2))
    assert isinstance(loss, Tensor)
    torch.autograd.backward(loss)
    for a, b, c in zip(model.parameters(), twin.parameters(), reference.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None and c.grad is not None
        assert relative_error(a.grad, c.grad) < 1e-12 and relative_error(b.grad, c.grad) < 1e-12


BAD: dict[str, tuple[Callable[[TwoTasks, Tensor], object], type[Exception], str]] = {
    "empty": (lambda m, x: [], ValueError, "empty"),
    "not_scalar": (lambda m, x: [m(x)[0].squeeze(1), m(x)[1].sum()], ValueError, "scalars"),
    "no_grad": (lambda m, x: [m(x)[0].sum().detach(), m(x)[1].sum()], ValueError, "grad"),
    "not_tensor": (lambda m, x: [1.0, m(x)[1].sum()], TypeError, "tensors"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_task_losses_raise_before_anything_changes(name: str) -> None:
    model = torchjd_example()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model.shared)
    make, error, message = BAD[name]
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=message):
        optimizer.step(make(model, data(1)[0][0]))  # type: ignore[call-overload]
    assert_unchanged(before, snapshot(model, optimizer))


def rnn_example() -> tuple[nn.RNN, Tensor, Tensor]:
    """TorchJD's RNN example: one loss per time step, each a mean over the whole batch."""
    torch.manual_seed(0)
    rnn = nn.RNN(input_size=10, hidden_size=20, num_layers=2).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 10, generator=gen, dtype=F64)  # [time, batch, features]
    target = torch.randn(5, 3, 20, generator=gen, dtype=F64)
    return rnn, x, target


def per_step_losses(rnn: nn.RNN, x: Tensor, target: Tensor) -> Tensor:
    output, _ = rnn(x)
    losses: Tensor = ((output - target) ** 2).mean(dim=[1, 2])  # [time]: each mixes the batch
    return losses


@pytest.mark.parametrize("how", ["autograd", "task losses"])
def test_per_time_step_losses_mixing_the_batch(how: str) -> None:
    """Not per-instance losses: ``gramian_mode="autograd"`` takes them as a tensor, and hooks
    take them as task objectives (a list); both equal the oracle's full JD step."""
    rnn, x, target = rnn_example()
    reference = copy.deepcopy(rnn)
    mode = "autograd" if how == "autograd" else "hooks"
    optimizer = PartialJDOptimizer(
        SGD(rnn.parameters(), lr=0.1),
        rnn,
        considered=rnn,
        gramian_mode=mode,  # type: ignore[arg-type]
    )
    losses = per_step_losses(rnn, x, target)
    weights = optimizer.backward(losses if how == "autograd" else list(losses.unbind()))
    expected_losses = list(per_step_losses(reference, x, target).unbind())
    params = list(reference.parameters())
    gramian, expected_w, expected = oracle_task_grads(expected_losses, params, [], params)
    assert optimizer.last_step is not None
    assert relative_error(optimizer.last_step.gramian, gramian) < 1e-10
    assert relative_error(weights, expected_w) < 1e-10
    for p, e in zip(rnn.parameters(), expected, strict=True):
        assert p.grad is not None and relative_error(p.grad, e) < 1e-10


def test_per_time_step_losses_as_per_instance_losses_are_a_clear_error() -> None:
    rnn, x, target = rnn_example()
    optimizer = PartialJDOptimizer(SGD(rnn.parameters(), lr=0.1), rnn, considered=rnn)
    with pytest.raises(ValueError, match=r"feed several losses.*task losses.*autograd"):
        optimizer.step(per_step_losses(rnn, x, target))
    assert all(p.grad is None for p in rnn.parameters())
