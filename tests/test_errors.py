"""Bad input and failures: clear errors, raised before anything changes; the next step is exact."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from case import Case
from oracle import (
    assert_same_parameters,
    assert_unchanged,
    errors_against_oracle,
    oracle_grads,
    oracle_gramian,
    relative_error,
    snapshot,
    trainable,
)
from torch import Tensor, nn
from torch.nn import Linear, ReLU, Sequential
from torch.optim import SGD, Adam

from pjd_optim import PartialJDOptimizer, UPGrad


def make() -> tuple[Sequential, PartialJDOptimizer]:
    torch.manual_seed(0)
    model = Sequential(Linear(4, 6), ReLU(), Linear(6, 1))
    groups: list[dict[str, Any]] = [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "considered": True},
    ]
    base = Adam(groups)
    return model, PartialJDOptimizer(base, model)


def losses_of(model: nn.Module, x: Tensor) -> Tensor:
    out: Tensor = model(x).squeeze(1).pow(2)
    return out


BAD_LOSSES: dict[str, tuple[Callable[[Sequential, Tensor], object], type[Exception], str]] = {
    "scalar": (lambda m, x: losses_of(m, x).mean(), ValueError, "reduction='none'"),
    "no_grad": (lambda m, x: losses_of(m, x).detach(), ValueError, "require grad"),
    "nan": (lambda m, x: losses_of(m, x) * float("nan"), ValueError, "Non-finite"),
    "inf": (lambda m, x: losses_of(m, x) + float("inf"), ValueError, "Non-finite"),
    "not_tensor": (lambda m, x: [1.0, 2.0], TypeError, "losses"),
    "string": (lambda m, x: "x", TypeError, "per-instance losses"),
    "not_connected": (lambda m, x: (m[0](x) ** 2).sum(1), ValueError, "do not depend"),
    "empty": (lambda m, x: losses_of(m, x)[:0], ValueError, "empty"),
}


@pytest.mark.parametrize("name", sorted(BAD_LOSSES))
def test_bad_losses_raise_before_anything_changes(name: str) -> None:
    model, optimizer = make()
    x = torch.randn(5, 4)
    optimizer.step(losses_of(model, x))  # some optimizer state and .grad exist
    make_losses, error, message = BAD_LOSSES[name]
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=message):
        optimizer.step(make_losses(model, x))  # type: ignore[call-overload]
    assert_unchanged(before, snapshot(model, optimizer))


def test_step_rejects_a_string_statically_and_at_run_time() -> None:
    _, optimizer = make()
    with pytest.raises(TypeError, match="per-instance losses"):
        optimizer.step("x")  # type: ignore[arg-type]


class Boom(RuntimeError):
    pass


def raising_weighting(gramian: Tensor) -> Tensor:
    raise Boom("weighting failed")


@pytest.mark.parametrize(
    "weighting, error",
    [
        (raising_weighting, Boom),
        (lambda g: torch.ones(g.shape[0] + 1), ValueError),
        (lambda g: torch.full((g.shape[0],), float("nan")), ValueError),
        (lambda g: 3.0, ValueError),
    ],
    ids=["raises", "wrong_shape", "nan", "not_tensor"],
)
def test_failing_weighting_leaves_everything_unchanged_and_next_step_is_exact(
    weighting: Callable[[Tensor], Tensor], error: type[Exception]
) -> None:
    model, optimizer = make()
    x = torch.randn(5, 4)
    optimizer.step(losses_of(model, x))
    optimizer.zero_grad()
    optimizer.backward(losses_of(model, x))  # pending .grad that must survive
    before = snapshot(model, optimizer)
    optimizer.weighting = weighting
    with pytest.raises(error):
        optimizer.step(losses_of(model, x))
    assert_unchanged(before, snapshot(model, optimizer))
    optimizer.weighting = UPGrad()
    pending = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    reference = copy.deepcopy(model)
    optimizer.backward(losses_of(model, x))
    losses = losses_of(reference, x)
    weights = UPGrad()(oracle_gramian(losses, list(reference[2].parameters())))
    expected = oracle_grads(losses, trainable(reference), weights)
    for p, old, g in zip(model.parameters(), pending, expected, strict=True):
        assert p.grad is not None and relative_error(p.grad, old + g) < 1e-4


def test_error_in_a_tensor_hook_during_backward_restores_grads() -> None:
    model, optimizer = make()
    x = torch.randn(5, 4)
    optimizer.backward(losses_of(model, x))
    before = snapshot(model, optimizer)
    hidden = model[0](x)

    def hook(grad: Tensor) -> Tensor:
        raise Boom("user hook")

    hidden.register_hook(hook)
    with pytest.raises(Boom):
        optimizer.backward((model[2](torch.relu(hidden)).squeeze(1)) ** 2)
    assert_unchanged(before, snapshot(model, optimizer))


def test_construction_errors() -> None:
    model = Sequential(Linear(3, 2))
    other = Linear(3, 2)
    with pytest.raises(ValueError, match="No parameter is considered"):
        PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="not in `model`"):
        PartialJDOptimizer(
            SGD([*model.parameters(), *other.parameters()], lr=0.1), model, considered=other
        )
    with pytest.raises(ValueError, match="not in `model`"):  # whatever the base optimizes
        PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=other)
    with pytest.raises(ValueError, match="not optimized by the base"):
        PartialJDOptimizer(SGD([model.get_parameter("0.bias")], lr=0.1), model, considered=model)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        PartialJDOptimizer(object(), model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        PartialJDOptimizer(SGD(model.parameters(), lr=0.1), object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="modules or parameters"):
        PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=["x"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="gramian_mode"):
        bad_mode: Any = "x"
        PartialJDOptimizer(
            SGD(model.parameters(), lr=0.1), model, considered=model, gramian_mode=bad_mode
        )
    base = SGD(model.parameters(), lr=0.1)
    groups_before = copy.copy(base.param_groups)
    with pytest.raises(ValueError):
        PartialJDOptimizer(base, model, considered=other)
    assert base.param_groups == groups_before
    assert not any(m._forward_hooks for m in model.modules())


def test_parameter_in_two_groups_is_refused() -> None:
    model = Sequential(Linear(3, 2))
    base = SGD(model.parameters(), lr=0.1)
    base.param_groups.append(dict(base.param_groups[0]))
    with pytest.raises(ValueError, match="two parameter groups"):
        PartialJDOptimizer(base, model, considered=model)


class BatchNormAct(nn.BatchNorm1d):
    """A BatchNorm subclass with a forward of its own, as timm's ``BatchNormAct2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


@pytest.mark.parametrize("considered", ["below", "itself"])
def test_a_batchnorm_subclass_with_its_own_forward_is_refused_in_train_mode(
    considered: str,
) -> None:
    """It takes the generic rule, whose vmapped re-run used to fail with functorch's in-place
    error; it couples the batch as BatchNorm does: the same clear refusal, nothing changed.
    In eval mode the step is exact."""
    torch.manual_seed(0)
    model = Sequential(Linear(4, 6), BatchNormAct(6), Linear(6, 1)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    part = [model[0]] if considered == "below" else [model[1]]
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=part)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"1 \(BatchNormAct\).*statistics of the whole batch"):
        optimizer.step(losses_of(model, x))
    assert_unchanged(before, snapshot(model, optimizer))
    optimizer.close()
    model.eval()
    case = Case(model, x, part, lambda out: out.squeeze(1).pow(2))  # as losses_of
    errors = errors_against_oracle(case, torch.float64)
    assert errors["gramian"] < 1e-10 and errors["grads"] < 1e-10, errors


def test_batchnorm_in_train_mode_after_considered_layer_is_refused_and_autograd_mode_is_exact() -> (
    None
):
    torch.manual_seed(0)
    model = Sequential(Linear(4, 6), nn.BatchNorm1d(6), ReLU(), Linear(6, 1)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[0])
    before = snapshot(model, optimizer)
    with pytest.raises(
        ValueError, match=r"1 \(BatchNorm1d\).*eval.*freeze_batch_norm_2d.*autograd"
    ):
        optimizer.step(losses_of(model, x))
    assert_unchanged(before, snapshot(model, optimizer))
    optimizer.close()
    # BatchNorm below the considered part does not matter: the step is exact (the first layer's
    # bias gradient is 0 up to round-off: BatchNorm removes the mean).
    below = copy.deepcopy(model)
    case = Case(below, x, [below[3]], lambda out: out.squeeze(1).pow(2))  # as losses_of
    errors = errors_against_oracle(case, torch.float64)
    assert errors["gramian"] < 1e-10 and errors["weights"] < 1e-10 and errors["grads"] < 1e-12
    exact = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=model[0], gramian_mode="autograd"
    )
    reference = copy.deepcopy(model)
    weights = exact.backward(losses_of(model, x))
    losses = losses_of(reference, x)
    expected = oracle_gramian(losses, list(reference[0].parameters()))
    assert exact.last_step is not None
    assert relative_error(exact.last_step.gramian, expected) < 1e-10
    for p, g in zip(
        model.parameters(), oracle_grads(losses, trainable(reference), weights), strict=True
    ):
        assert p.grad is not None and relative_error(p.grad, g) < 1e-10


def test_in_place_edit_of_a_frozen_trunks_output_is_refused() -> None:
    """The head's gradients are book-kept from its saved input, so autograd never re-reads that
    tensor: only the package's own check sees that it was edited after the forward."""
    torch.manual_seed(0)
    trunk, head = Linear(4, 6).requires_grad_(False), Linear(6, 1)
    model = Sequential(trunk, ReLU(), head)
    optimizer = PartialJDOptimizer(SGD(head.parameters(), lr=0.1), model, considered=head)
    hidden = torch.relu(trunk(torch.randn(5, 4)))
    losses = head(hidden).squeeze(1) ** 2
    hidden.mul_(2)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="modified in place"):
        optimizer.step(losses)
    assert_unchanged(before, snapshot(model, optimizer))


def test_in_place_edit_of_embedding_ids_is_refused() -> None:
    torch.manual_seed(0)
    embed, head = nn.Embedding(10, 4), Linear(12, 1)
    model = Sequential(embed, nn.Flatten(), head)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model)
    ids = torch.randint(0, 9, (5, 3))
    losses = model(ids).squeeze(1) ** 2
    ids.add_(1)  # the saved ids no longer say which rows were used
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="modified in place"):
        optimizer.step(losses)
    assert_unchanged(before, snapshot(model, optimizer))


def test_batch_size_one_equals_the_plain_step() -> None:
    model, optimizer = make()
    reference = copy.deepcopy(model)
    x = torch.randn(1, 4)
    optimizer.backward(losses_of(model, x))
    torch.autograd.backward(losses_of(reference, x).sum())
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad)


def test_constant_and_huge_losses_give_finite_weights() -> None:
    model, optimizer = make()
    x = torch.randn(5, 4)
    zero = optimizer.backward(losses_of(model, x) * 0.0)
    assert torch.isfinite(zero).all()
    optimizer.zero_grad()
    w1 = optimizer.backward(losses_of(model, x))
    w2 = optimizer.backward(losses_of(model, x) * 1e15)
    torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-6)


def test_results_are_deterministic_run_to_run() -> None:
    def run() -> list[Tensor]:
        model, optimizer = make()
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            optimizer.step(losses_of(model, torch.randn(9, 4, generator=gen)))
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_nonfinite_skip_mode_skips_the_step_and_counts_it() -> None:
    """With gradients pending (accumulation): a skipped step leaves parameters, gradients and
    optimizer state bit-identical, and the next step applies everything."""
    torch.manual_seed(0)
    model = Sequential(Linear(4, 6), ReLU(), Linear(6, 1))
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1, momentum=0.9), model, considered=model[2], nonfinite="skip"
    )
    x, x2 = torch.randn(5, 4), torch.randn(5, 4)
    optimizer.step(losses_of(model, x))  # momentum state
    optimizer.zero_grad()
    optimizer.backward(losses_of(model, x))  # a pending micro-batch
    before = snapshot(model, optimizer)
    losses = losses_of(model, x2) * float("nan")
    assert optimizer.step(losses) is losses
    assert_unchanged(before, snapshot(model, optimizer))
    assert optimizer.skipped_steps == 1 and optimizer.last_step is None
    pending = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    reference = copy.deepcopy(model)  # as it stands, with the optimizer's state
    ref_optimizer = SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ref_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    weights = optimizer.backward(losses_of(model, x2))
    optimizer.step()  # the pending micro-batch and this one
    losses2 = losses_of(reference, x2)
    for q, old, g in zip(
        reference.parameters(),
        pending,
        oracle_grads(losses2, trainable(reference), weights),
        strict=True,
    ):
        q.grad = old + g
    ref_optimizer.step()
    assert optimizer.skipped_steps == 1 and optimizer.last_step is not None
    assert_same_parameters(model, reference, 1e-5)


def test_batchnorm_in_eval_mode_without_running_statistics_is_refused() -> None:
    """``track_running_stats=False`` normalises with the batch's statistics even in eval mode."""
    torch.manual_seed(0)
    model = Sequential(Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), Linear(6, 1))
    model.eval()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[0])
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*track_running_stats=False") as error:
        optimizer.step(losses_of(model, torch.randn(7, 4)))
    assert "train mode" not in str(error.value).split("(BatchNorm in train mode")[0]
    assert_unchanged(before, snapshot(model, optimizer))


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_packed_sequence_into_a_considered_rnn_is_refused_clearly(batch_first: bool) -> None:
    """Its rows are time steps of several samples (it used to raise a reshape RuntimeError, or
    a refusal about rows feeding several losses); nothing changes."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    rnn, head = nn.LSTM(5, 5, batch_first=batch_first).double(), Linear(5, 3).double()
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[rnn])
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    lengths = torch.tensor([4, 2, 3, 1, 4, 2])
    packed = pack_padded_sequence(
        x if batch_first else x.transpose(0, 1), lengths, batch_first, enforce_sorted=False
    )
    _, (last, _) = rnn(packed)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="PackedSequence"):
        optimizer.step(head(last[-1]).pow(2).sum(dim=1))
    assert_unchanged(before, snapshot(model, optimizer))


@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm"])
def test_considered_parametrized_weights_are_refused_when_the_optimizer_is_built(how: str) -> None:
    """Their weight is computed once per forward from the parametrization's parameters: refused
    at construction (it was refused at the step with a message about the weight's rows as batch
    rows); the layer's bias alone is exact."""
    torch.manual_seed(0)
    model = Sequential(Linear(4, 6), ReLU(), Linear(6, 3)).double()
    parametrize = getattr(nn.utils.parametrizations, how)
    parametrize(model[2]).eval()
    with pytest.raises(ValueError, match=r"torch\.nn\.utils\.parametrize"):
        PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model[2]])
    bias = model[2].get_parameter("bias")
    case = Case(
        model, torch.randn(7, 4, dtype=torch.float64), [bias], lambda out: out.pow(2).sum(1)
    )
    errors = errors_against_oracle(case, torch.float64)
    assert errors["gramian"] < 1e-10 and errors["grads"] < 1e-10, errors


class _ScaledTwice(nn.Module):
    """A considered generic-rule module (``Scale``) whose output the parent doubles in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = Linear(4, 4), Linear(4, 2)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.sc = _Scale(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sc(self.a(x))
        h.mul_(2.0)
        out: torch.Tensor = self.head(h)
        return out


class _Scale(nn.Module):
    def __init__(self, scale: nn.Parameter) -> None:
        super().__init__()
        self.g = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.g


def test_an_output_modified_in_place_is_refused_naming_the_cause() -> None:
    """The generic rule checks its re-run against the kept output, which an in-place edit
    changes: the refusal names the edit (it said the module could not be re-run per sample)."""
    torch.manual_seed(0)
    model = _ScaledTwice().double()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model.sc])
    x = torch.randn(5, 4, dtype=torch.float64)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"output of sc \(_Scale\) was modified in place"):
        optimizer.step(model(x).pow(2).sum(dim=1))
    assert_unchanged(before, snapshot(model, optimizer))
