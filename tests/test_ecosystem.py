"""Around the optimizer: timm factories and schedulers, torch schedulers, AMP, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import errors_against_oracle, oracle_grads, oracle_gramian, relative_error, trainable
from torch import Tensor, nn
from torch.optim import Optimizer
from zoo import Case, _mse

from pjd_optim import JDScaler, PartialJDOptimizer, UPGrad
from pjd_optim._groups import parameters_of

timm = pytest.importorskip("timm")
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32)
    return model


def vit_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    losses: Tensor = nn.functional.cross_entropy(model(x), y, reduction="none")
    return losses


def considered_of(model: nn.Module) -> list[nn.Module | Tensor]:
    *_, last_block = model.get_submodule("blocks").children()
    return [last_block, model.get_submodule("norm"), model.get_submodule("head")]


def test_timm_adamw_groups_are_split_keeping_weight_decay_and_layer_decay() -> None:
    model = tiny_vit()
    base = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    before = {
        id(p): (g["weight_decay"], g["lr_scale"]) for g in base.param_groups for p in g["params"]
    }
    optimizer = PartialJDOptimizer(base, model, considered=considered_of(model))
    after = {
        id(p): (g["weight_decay"], g["lr_scale"]) for g in base.param_groups for p in g["params"]
    }
    assert before == after
    wanted = {id(p) for p in parameters_of(considered_of(model))}
    assert {id(p) for p in optimizer.considered_parameters()} == wanted
    flagged = {id(p) for g in base.param_groups if g["considered"] for p in g["params"]}
    assert flagged == wanted


@pytest.mark.parametrize("opt_name", ["adamw", "lookahead_adamw", "sgd"])
def test_timm_optimizer_step_equals_oracle_step(opt_name: str) -> None:
    # float64: Adam divides by √v, which turns float32 noise on tiny gradients into visible steps.
    model = tiny_vit().double()
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(
        create_optimizer_v2(model, opt_name, lr=1e-2, weight_decay=0.05),
        model,
        considered=considered_of(model),
    )
    ref_optimizer: Optimizer = create_optimizer_v2(reference, opt_name, lr=1e-2, weight_decay=0.05)
    ref_considered = parameters_of(considered_of(reference))
    for step in range(2):
        x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, step])
        losses = vit_losses(reference, x, y)
        weights = UPGrad()(oracle_gramian(losses, ref_considered))
        for p, g in zip(
            trainable(reference), oracle_grads(losses, trainable(reference), weights), strict=True
        ):
            p.grad = g
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        optimizer.step(vit_losses(model, x, y))
        optimizer.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert relative_error(p, q) < 1e-9


def test_schedulers_drive_the_base_learning_rates() -> None:
    model = tiny_vit()
    base = create_optimizer_v2(model, "adamw", lr=1e-3)
    optimizer = PartialJDOptimizer(base, model, considered=considered_of(model))
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=4, warmup_epochs=0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    lrs = []
    for epoch in range(3):
        optimizer.step(vit_losses(model, x, y))
        optimizer.zero_grad()
        scheduler.step(epoch + 1)
        lrs.append(base.param_groups[0]["lr"])
    assert lrs[0] > lrs[1] > lrs[2] > 0
    per_update, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=2, step_on_epochs=False, updates_per_epoch=4
    )
    before = base.param_groups[0]["lr"]
    per_update.step_update(num_updates=3)
    assert base.param_groups[0]["lr"] < before
    for make in (
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    ):
        start = base.param_groups[0]["lr"]
        sched = make(optimizer)
        optimizer.step(vit_losses(model, x, y))
        optimizer.zero_grad()
        sched.step()
        assert base.param_groups[0]["lr"] != start
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    start = base.param_groups[0]["lr"]
    plateau.step(1.0)
    plateau.step(2.0)
    assert base.param_groups[0]["lr"] == pytest.approx(start * 0.5)


def twin_optimizers() -> tuple[
    nn.Sequential, nn.Sequential, PartialJDOptimizer, PartialJDOptimizer
]:
    """Two copies of one model, each with its own optimizer (the last layer considered)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    reference = copy.deepcopy(model)
    scaled = PartialJDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, considered=model[2]
    )
    plain = PartialJDOptimizer(
        torch.optim.SGD(reference.parameters(), lr=0.1), reference, considered=reference[2]
    )
    return model, reference, scaled, plain


def test_grad_scaler_loop_with_clipping_equals_the_unscaled_step() -> None:
    model, reference, scaled, plain = twin_optimizers()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(6, 5)
    w_scaled = scaled.backward(scaler.scale(model(x).squeeze(1) ** 2))
    scaler.unscale_(scaled)
    nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    scaler.step(scaled)
    scaler.update()
    w_plain = plain.backward(reference(x).squeeze(1) ** 2)
    nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    plain.step()
    torch.testing.assert_close(w_scaled, w_plain)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_autocast_bf16_gramian_is_float32_and_close_to_the_float32_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, considered=model
    )
    x = torch.randn(6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(x).float().pow(2).sum(1)
    optimizer.backward(losses)
    assert optimizer.last_step is not None
    low = optimizer.last_step.gramian
    assert low.dtype == torch.float32
    optimizer.backward(model(x).pow(2).sum(1))
    assert relative_error(low, optimizer.last_step.gramian) < 5e-2


def test_checkpoint_round_trip_resumes_bit_exactly() -> None:
    def run(steps: int, model: nn.Module, optimizer: PartialJDOptimizer, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = (
                torch.randn(3, 3, 32, 32, generator=gen),
                torch.randint(0, 4, (3,), generator=gen),
            )
            optimizer.step(vit_losses(model, x, y))
            optimizer.zero_grad()

    def build() -> tuple[nn.Module, PartialJDOptimizer]:
        model = tiny_vit()
        base = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
        return model, PartialJDOptimizer(base, model, considered=considered_of(model))

    model, optimizer = build()
    run(2, model, optimizer, seed=1)
    checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    run(2, model, optimizer, seed=2)

    resumed, resumed_opt = build()
    resumed.load_state_dict(checkpoint[0])
    resumed_opt.load_state_dict(checkpoint[1])
    assert resumed_opt.param_groups is resumed_opt.base.param_groups
    run(2, resumed, resumed_opt, seed=2)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("clip_mode", ["norm", "value", "agc"])
def test_jd_scaler_native_scaler_style_loop_equals_the_unscaled_step(clip_mode: str) -> None:
    model, reference, scaled, plain = twin_optimizers()
    scaler = JDScaler("cpu", init_scale=2.0**12)
    x = torch.randn(6, 5)
    for _ in range(2):  # accumulate one micro-batch, then update
        w_scaled = scaler(model(x).squeeze(1).pow(2), scaled, need_update=False)
        scaler(model(x).squeeze(1).pow(2), scaled, 0.05, clip_mode, model.parameters())
        w_plain = plain.backward(reference(x).squeeze(1).pow(2))
        plain.backward(reference(x).squeeze(1).pow(2))
        if clip_mode == "norm":
            nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        elif clip_mode == "value":
            nn.utils.clip_grad_value_(reference.parameters(), 0.05)
        else:
            from timm.utils import dispatch_clip_grad

            dispatch_clip_grad(reference.parameters(), 0.05, mode="agc")
        plain.step()
        scaled.zero_grad()
        plain.zero_grad()
        torch.testing.assert_close(w_scaled, w_plain)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert "scale" in scaler.state_dict()


def test_timm_gradient_checkpointing_is_exact_and_resumed() -> None:
    """``set_grad_checkpointing`` re-runs the blocks (the considered one included) during the
    backward; the step still matches the oracle and resumes at the last block's input."""
    model = tiny_vit()
    model.set_grad_checkpointing(True)  # type: ignore[operator]  # (typed as nn.Module here)
    *_, last = model.get_submodule("blocks").children()
    considered = [last, model.get_submodule("norm"), model.get_submodule("head")]
    case = Case(model.double(), torch.randn(3, 3, 32, 32), considered, _mse)
    errors = errors_against_oracle(case, torch.float64)
    assert errors.pop("resumed") == 1.0
    assert max(errors.values()) < 1e-9, errors
