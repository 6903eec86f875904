"""timm: its optimizer factory (groups, layer decay, Lookahead), schedulers, checkpoints."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from case import Case, mse
from oracle import (
    assert_same_parameters,
    errors_against_oracle,
    oracle_backward,
    trainable,
)
from torch import Tensor, nn
from torch.optim import Optimizer

from pjd_optim import PartialJDOptimizer
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


def test_timm_adamw_groups_with_layer_decay_are_left_as_built() -> None:
    model = tiny_vit()
    base = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    before = copy.copy(base.param_groups)
    contents = [dict(g, params=list(g["params"])) for g in base.param_groups]
    optimizer = PartialJDOptimizer(base, model, considered=considered_of(model))
    assert optimizer.param_groups is base.param_groups and base.param_groups == before
    assert [dict(g, params=list(g["params"])) for g in base.param_groups] == contents
    wanted = {id(p) for p in parameters_of(considered_of(model))}
    assert {id(p) for p in optimizer.considered_parameters()} == wanted


@pytest.mark.parametrize("opt_name", ["adamw", "lookahead_adamw", "sgd"])
def test_timm_optimizer_step_equals_oracle_step(opt_name: str, device: str) -> None:
    # float64: Adam divides by √v, which turns float32 noise on tiny gradients into visible steps.
    model = tiny_vit().double().to(device)
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(
        create_optimizer_v2(model, opt_name, lr=1e-2, weight_decay=0.05),
        model,
        considered=considered_of(model),
    )
    ref_optimizer: Optimizer = create_optimizer_v2(reference, opt_name, lr=1e-2, weight_decay=0.05)
    ref_considered = parameters_of(considered_of(reference))
    for step in range(2):
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64, device=device)
        y = torch.tensor([0, 1, 2, step], device=device)
        oracle_backward(vit_losses(reference, x, y), ref_considered, trainable(reference))
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        optimizer.step(vit_losses(model, x, y))
        optimizer.zero_grad()
    assert_same_parameters(model, reference, 1e-9)


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
    assert resumed_opt.state is resumed_opt.base.state
    run(2, resumed, resumed_opt, seed=2)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_timm_gradient_checkpointing_is_exact_and_resumed() -> None:
    """``set_grad_checkpointing`` re-runs the blocks (the considered one included) during the
    backward; the step still matches the oracle and resumes at the last block's input."""
    model = tiny_vit()
    model.set_grad_checkpointing(True)  # type: ignore[operator]  # (typed as nn.Module here)
    *_, last = model.get_submodule("blocks").children()
    considered = [last, model.get_submodule("norm"), model.get_submodule("head")]
    case = Case(model.double(), torch.randn(3, 3, 32, 32), considered, mse)
    errors = errors_against_oracle(case, torch.float64)
    assert errors.pop("resumed") == 1.0
    assert max(errors.values()) < 1e-9, errors


def mixed_batches(count: int, batch_size: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """Batches as timm's loader + ``Mixup`` gives them (drawn once, for both runs)."""
    from timm.data import Mixup

    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        x = torch.randn(batch_size, 3, 32, 32, generator=gen)
        y = torch.randint(0, 4, (batch_size,), generator=gen)
        x, target = mixup(x, y)
        batches.append((x.to(dtype), target.to(dtype)))
    return batches


def train_one_epoch(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    optimizer: Optimizer,
    scheduler: Any,
    backward: Any,
    amp_dtype: torch.dtype | None,
    accum_steps: int = 2,
    clip_grad: float = 1.0,
) -> list[float]:
    """timm's ``train_one_epoch`` (``loss_scaler=None``: bf16 or no AMP) with the README's
    changes: a per-instance loss (torch's cross-entropy takes mixup's soft targets),
    ``optimizer.backward(loss)``, ``loss.mean()`` for logging."""
    from timm.utils import dispatch_clip_grad

    train_loss_fn = nn.CrossEntropyLoss(reduction="none")  # was: SoftTargetCrossEntropy()
    second_order = hasattr(optimizer, "is_second_order") and optimizer.is_second_order
    assert not second_order
    losses_m = []
    num_updates = 0
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(batches):
        need_update = batch_idx == len(batches) - 1 or (batch_idx + 1) % accum_steps == 0
        with torch.autocast(
            "cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
        ):
            output = model(input)
            loss = train_loss_fn(output, target)
        loss = loss / accum_steps
        backward(loss)  # was: loss.backward(create_graph=second_order)
        if need_update:
            dispatch_clip_grad(model.parameters(), value=clip_grad, mode="norm")
            optimizer.step()
        losses_m.append(loss.detach().mean().item() * accum_steps)  # was: loss.item()
        if not need_update:
            continue
        num_updates += 1
        optimizer.zero_grad()
        scheduler.step_update(num_updates=num_updates, metric=sum(losses_m) / len(losses_m))
    if hasattr(optimizer, "sync_lookahead"):
        optimizer.sync_lookahead()
    return losses_m


@pytest.mark.parametrize("precision", ["float64", "bf16"])
def test_timm_train_py_flow_with_clipping_lookahead_cosine_accumulation_and_mixup(
    precision: str,
) -> None:
    """The README's timm recipe in timm's training loop: Lookahead AdamW with weight decay, a
    cosine schedule stepped per update, gradient accumulation, clipping, mixup/cutmix soft
    targets; in float64 it equals the same loop fed the oracle's JD gradients, under bf16
    autocast its updates point the same way."""
    dtype, amp = (
        (torch.float64, None) if precision == "float64" else (torch.float32, torch.bfloat16)
    )
    batches = mixed_batches(4, 4, dtype)
    model = tiny_vit().to(dtype)
    reference = copy.deepcopy(model).to(torch.float64)
    start = [p.detach().clone().double() for p in model.parameters()]

    def setup(m: nn.Module) -> tuple[Optimizer, Any]:
        base = create_optimizer_v2(m, "lookahead_adamw", lr=1e-3, weight_decay=0.05)
        scheduler, _ = create_scheduler_v2(
            base, sched="cosine", num_epochs=2, step_on_epochs=False, updates_per_epoch=2
        )
        return base, scheduler

    base, scheduler = setup(model)
    optimizer = PartialJDOptimizer(base, model, considered=considered_of(model))
    ours = train_one_epoch(model, batches, optimizer, scheduler, optimizer.backward, amp)

    ref_optimizer, ref_scheduler = setup(reference)
    ref_considered = parameters_of(considered_of(reference))

    def reference_backward(losses: Tensor) -> None:
        oracle_backward(losses, ref_considered, trainable(reference))

    batches64 = [(x.double(), t.double()) for x, t in batches]
    theirs = train_one_epoch(
        reference, batches64, ref_optimizer, ref_scheduler, reference_backward, None
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if precision == "float64":
        assert ours == pytest.approx(theirs, rel=1e-9)
        assert_same_parameters(model, reference, 1e-9)
    else:
        ours_update = torch.cat(
            [(p.double() - s).flatten() for p, s in zip(model.parameters(), start, strict=True)]
        )
        ref_update = torch.cat(
            [(q - s).flatten() for q, s in zip(reference.parameters(), start, strict=True)]
        )
        ours_update, ref_update = ours_update.detach(), ref_update.detach()
        cosine = float(ours_update @ ref_update / (ours_update.norm() * ref_update.norm()))
        assert cosine > 0.9, cosine
