"""``weighted_loss``: one scalar whose backward is the Jacobian-descent direction, for code whose
backward call must stay as it is (GradScaler, accelerate, Lightning's automatic optimisation)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_same_parameters, lightning_fit, relative_error
from torch import Tensor, nn
from torch.optim import SGD

from pjd_optim import MGDA, Mean, PartialJDOptimizer, UPGrad, Weighting


def model_and_batch() -> tuple[nn.Sequential, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    return model.double(), x.double(), y


def wrap(model: nn.Sequential, weighting: Weighting | None = None) -> PartialJDOptimizer:
    base = SGD(model.parameters(), lr=0.5, momentum=0.9)
    return PartialJDOptimizer(base, model, considered=[model[2], model[4]], weighting=weighting)


@pytest.mark.parametrize("weighting", [UPGrad(), Mean(), MGDA(reg_eps=1e-3)], ids=repr)
@pytest.mark.parametrize("order", ["rows", "sorted", "tokens"])
def test_its_backward_then_step_equals_step_losses(weighting: Weighting, order: str) -> None:
    model, x, y = model_and_batch()
    twin = copy.deepcopy(model)
    ours, reference = wrap(model, weighting), wrap(twin, weighting)

    def losses_of(m: nn.Module) -> Tensor:
        if order == "tokens":  # [B, T] per-token losses
            out = m(x.view(3, 4, 4))
            return F.cross_entropy(out.transpose(1, 2), y.view(3, 4), reduction="none")
        losses = F.cross_entropy(m(x), y, reduction="none")
        return losses.sort().values if order == "sorted" else losses

    for _ in range(3):
        losses = losses_of(model)
        loss = ours.weighted_loss(losses)
        assert torch.allclose(loss, losses.mean())
        ours.zero_grad()  # the order Lightning uses: zero_grad between the loss and its backward
        torch.autograd.backward(loss)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours.step()
        ours.zero_grad()
        reference.step(losses_of(twin))
        reference.zero_grad()
        assert ours.last_step is not None and reference.last_step is not None
        assert torch.allclose(ours.last_step.weights, reference.last_step.weights, atol=1e-12)
    assert_same_parameters(model, twin, 1e-10)


def test_through_a_grad_scaler_and_a_closure_it_steps_as_step_losses() -> None:
    model, x, y = model_and_batch()
    twin = copy.deepcopy(model)
    ours, reference = wrap(model), wrap(twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        loss = ours.weighted_loss(F.cross_entropy(model(x), y, reduction="none"))
        torch.autograd.backward(scaler.scale(loss))
        scaler.step(ours)
        scaler.update()
        ours.zero_grad()

        def closure() -> Tensor:  # Lightning's automatic optimisation: loss, backward, return
            loss = reference.weighted_loss(F.cross_entropy(twin(x), y, reduction="none"))
            reference.zero_grad()
            torch.autograd.backward(loss)
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            reference.step(closure)
    assert_same_parameters(model, twin, 1e-10)


def test_task_losses_are_refused_with_the_way_to_pass_them() -> None:
    model, x, y = model_and_batch()
    optimizer = wrap(model)
    losses = F.cross_entropy(model(x), y, reduction="none")
    with pytest.raises(ValueError, match=r"step\(\[loss_1"):
        optimizer.weighted_loss([losses[:6].mean(), losses[6:].mean()])  # type: ignore[arg-type]
    assert all(p.grad is None for p in model.parameters())


def test_a_scalar_from_a_closure_without_weighted_loss_is_a_clear_error() -> None:
    model, x, y = model_and_batch()
    optimizer = wrap(model)
    with pytest.raises(ValueError, match=r"scalar.*per-instance losses"):
        optimizer.step(lambda: F.cross_entropy(model(x), y))


def test_non_finite_losses_give_a_step_that_raises_or_is_skipped() -> None:
    model, x, y = model_and_batch()
    before = [p.detach().clone() for p in model.parameters()]
    for mode in ("raise", "skip"):
        optimizer = PartialJDOptimizer(
            SGD(model.parameters(), lr=0.1), model, considered=[model[4]], nonfinite=mode
        )
        losses = F.cross_entropy(model(x), y, reduction="none")
        loss = optimizer.weighted_loss(losses * torch.tensor([float("nan")] + [1.0] * 11).double())
        torch.autograd.backward(loss)
        if mode == "raise":
            with pytest.raises(ValueError, match="not finite"):
                optimizer.step()
        else:
            optimizer.step()
            assert optimizer.skipped_steps == 1
        optimizer.zero_grad()
        optimizer.close()
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_under_float16_autocast_tiny_losses_do_not_underflow_in_the_gramian() -> None:
    """Losses of 1e-6: their gradients underflow in float16 unless scaled; the Gramian's passes
    scale them (exactly, by powers of two) and match float32's to float16 precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(16, 8)
    reference = copy.deepcopy(model)
    ours = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model[2]])
    exact = PartialJDOptimizer(
        SGD(reference.parameters(), lr=0.1), reference, considered=[reference[2]]
    )
    with torch.autocast("cpu", dtype=torch.float16):
        losses = 1e-6 * model(x).float().pow(2).sum(dim=1)
        ours.weighted_loss(losses)
    exact.weighted_loss(1e-6 * reference(x).pow(2).sum(dim=1))
    assert ours.last_step is not None and exact.last_step is not None
    expected = exact.last_step.gramian
    error = (ours.last_step.gramian - expected).abs().max() / expected.abs().max()
    assert float(error) < 2e-2


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_automatic_optimisation_trains_by_returning_weighted_loss(
    accumulate: int,
) -> None:
    """``training_step`` returns ``self.optimizers().weighted_loss(losses)``; Lightning runs the
    closure (step, zero_grad, backward), then ``optimizer.step(closure)``: the same parameters
    as manual ``backward(losses)`` steps (accumulated micro-batches scaled by Lightning's
    ``1/accumulate``), and no warning."""
    pytest.importorskip("lightning")
    from lightning.pytorch import LightningModule

    torch.manual_seed(0)
    data = [torch.randn(6, 4, dtype=torch.float64) for _ in range(4)]

    def losses_of(m: nn.Module, x: Tensor) -> Tensor:
        out: Tensor = (m(x) - 1.0).pow(2).sum(dim=1)
        return out

    class Module(LightningModule):
        def __init__(self, model: nn.Sequential) -> None:
            super().__init__()
            self.model = model

        def configure_optimizers(self) -> PartialJDOptimizer:
            base = SGD(self.model.parameters(), lr=0.1)
            return PartialJDOptimizer(base, self.model, considered=self.model[2])

        def training_step(self, x: Tensor, index: int) -> Tensor:
            optimizer = self.optimizers()
            assert not isinstance(optimizer, list)
            loss: Tensor = optimizer.weighted_loss(losses_of(self.model, x))
            return loss

    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    reference = copy.deepcopy(model)
    messages = lightning_fit(Module(model), data, accumulate_grad_batches=accumulate)
    assert not [m for m in messages if "PartialJDOptimizer" in m]
    manual = PartialJDOptimizer(
        SGD(reference.parameters(), lr=0.1), reference, considered=reference[2]
    )
    for start in range(0, len(data), accumulate):
        for x in data[start : start + accumulate]:
            weights = manual.backward(losses_of(reference, x) / accumulate)
            assert weights is not None
        manual.step()
        manual.zero_grad()
    assert_same_parameters(model, reference, 1e-10)


def test_a_float16_forward_is_scaled_when_weighted_loss_is_called_after_autocast() -> None:
    """Losses of ``1e-5`` scale from a float16 autocast forward, ``weighted_loss`` called after
    the ``with`` block (as scripts and ``JDTrainer`` do): the Gramian's passes are scaled as
    inside the block (they underflowed, and the step was refused), equal to the float32 step's
    Gramian at float16's precision."""

    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 10))  # fmt: skip

    x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    reference, model = build(), build()
    exact = PartialJDOptimizer(SGD(reference.parameters(), lr=0.0), reference,
                               considered=[reference[2], reference[4]])  # fmt: skip
    exact.weighted_loss(1e-5 * F.cross_entropy(reference(x), y, reduction="none"))
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.0), model,
                                   considered=[model[2], model[4]])  # fmt: skip
    with torch.autocast("cpu", dtype=torch.float16):
        losses = 1e-5 * F.cross_entropy(model(x).float(), y, reduction="none")
    optimizer.weighted_loss(losses)
    assert optimizer.last_step is not None and exact.last_step is not None
    assert relative_error(optimizer.last_step.gramian, exact.last_step.gramian) < 1e-2
