"""Mixed precision: float32 Gramians under autocast, GradScaler's contract, NativeScaler's call."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from oracle import relative_error
from torch import Tensor, nn

from pjd_optim import JDScaler, NonFinite, PartialJDOptimizer


def mlp(device: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)


def twin_optimizers(
    momentum: float = 0.0, device: str = "cpu"
) -> tuple[nn.Sequential, nn.Sequential, PartialJDOptimizer, PartialJDOptimizer]:
    """Two copies of one model, each with its own optimizer (the last layer considered)."""
    model = mlp(device)
    reference = copy.deepcopy(model)
    first = PartialJDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum), model, considered=model[2]
    )
    second = PartialJDOptimizer(
        torch.optim.SGD(reference.parameters(), lr=0.1, momentum=momentum),
        reference,
        considered=reference[2],
    )
    return model, reference, first, second


def losses_of(model: nn.Module, x: Tensor) -> Tensor:
    out: Tensor = model(x).float().pow(2).sum(dim=1)
    return out


def test_grad_scaler_loop_with_clipping_equals_the_unscaled_step(device: str) -> None:
    model, reference, scaled, plain = twin_optimizers(device=device)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x = torch.randn(6, 5, device=device)
    w_scaled = scaled.backward(scaler.scale(losses_of(model, x)))
    scaler.unscale_(scaled)
    nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    scaler.step(scaled)
    scaler.update()
    w_plain = plain.backward(losses_of(reference, x))
    nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    plain.step()
    torch.testing.assert_close(w_scaled, w_plain)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_gramian_and_weights_are_float32_and_close_to_float32_ones(
    dtype: torch.dtype, device: str
) -> None:
    model = mlp(device)
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, considered=model
    )
    x = torch.randn(6, 5, device=device)
    with torch.autocast(device, dtype=dtype):
        out = model(x)
        assert out.dtype == dtype
        losses = out.float().pow(2).sum(1)
    weights = optimizer.backward(losses)
    assert optimizer.last_step is not None
    low = optimizer.last_step.gramian
    assert low.dtype == torch.float32 and weights.dtype == torch.float32
    exact = optimizer.backward(model(x).pow(2).sum(1))
    assert optimizer.last_step is not None
    assert relative_error(low, optimizer.last_step.gramian) < 5e-2
    assert relative_error(weights, exact) < 5e-2


Step = Callable[[nn.Module, PartialJDOptimizer, Tensor], None]


def readme_recipe(scaler: torch.amp.GradScaler) -> Step:
    """The README's AMP loop around ``optimizer.backward``."""

    def step(model: nn.Module, optimizer: PartialJDOptimizer, losses: Tensor) -> None:
        optimizer.backward(scaler.scale(losses))
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()

    return step


def jd_scaler_recipe(scaler: JDScaler) -> Step:
    """timm's ``train.py`` call of its ``NativeScaler``, keyword for keyword."""

    def step(model: nn.Module, optimizer: PartialJDOptimizer, losses: Tensor) -> None:
        scaler(
            losses,
            optimizer,
            clip_grad=1.0,
            clip_mode="norm",
            parameters=model.parameters(),
            create_graph=False,
            need_update=True,
        )

    return step


def state_of(model: nn.Module, optimizer: PartialJDOptimizer) -> list[Tensor]:
    momenta = [s["momentum_buffer"] for s in optimizer.state.values() if "momentum_buffer" in s]
    return [p.detach().clone() for p in model.parameters()] + [m.clone() for m in momenta]


@pytest.mark.parametrize("recipe", ["readme", "jd_scaler"])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_fp16_overflow_under_a_grad_scaler_is_a_skipped_step_and_training_goes_on(
    recipe: str, nonfinite: str, device: str
) -> None:
    """As after ``scaler.scale(loss).backward()``: an overflow skips the step (no parameter or
    optimizer state changes), the scale backs off, and once it is small enough steps update."""
    model = mlp(device)
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        model,
        considered=model[2],
        nonfinite=nonfinite,  # type: ignore[arg-type]
    )
    if recipe == "readme":
        scaler = torch.amp.GradScaler(device, init_scale=2.0**24)
        step, scale = readme_recipe(scaler), scaler.get_scale
    else:
        jd = JDScaler(device, init_scale=2.0**24)
        step, scale = jd_scaler_recipe(jd), lambda: jd.state_dict()["scale"]
    x, y = torch.randn(6, 5, device=device), torch.randint(0, 3, (6,), device=device)
    optimizer.step(nn.functional.cross_entropy(model(x), y, reduction="none"))  # momentum state
    optimizer.zero_grad()
    updated = []
    for _ in range(16):
        before, scale_before = state_of(model, optimizer), scale()
        with torch.autocast(device, dtype=torch.float16):
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        step(model, optimizer, losses)
        optimizer.zero_grad()
        changed = [
            not torch.equal(a, b) for a, b in zip(before, state_of(model, optimizer), strict=True)
        ]
        if scale() < scale_before:  # an overflow: nothing changed
            assert not any(changed)
            updated.append(False)
        else:
            assert all(changed[: len(list(model.parameters()))])
            updated.append(True)
    assert not updated[0] and updated[-1], updated  # first overflowed, later steps update
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_plain_step_after_a_non_finite_backward_raises_or_skips_and_changes_nothing(
    nonfinite: NonFinite,
) -> None:
    model, _, optimizer, _ = twin_optimizers(momentum=0.9)
    optimizer.nonfinite = nonfinite
    x = torch.randn(6, 5)
    optimizer.step(losses_of(model, x))
    optimizer.zero_grad()
    weights = optimizer.backward(losses_of(model, x) * float("inf"))
    assert torch.isnan(weights).all() and optimizer.last_step is None
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    before = state_of(model, optimizer)
    if nonfinite == "raise":
        with pytest.raises(ValueError, match="not finite"):
            optimizer.step()
    else:
        optimizer.step()
        assert optimizer.skipped_steps == 1
    for a, b in zip(before, state_of(model, optimizer), strict=True):
        assert torch.equal(a, b)
    optimizer.zero_grad()  # the gradients are cleared: steps go on
    optimizer.step(losses_of(model, x))
    assert all(
        not torch.equal(a, b) for a, b in zip(before, state_of(model, optimizer), strict=True)
    )


@pytest.mark.parametrize("clip_mode", ["norm", "value", "agc"])
def test_jd_scaler_native_scaler_style_loop_equals_the_unscaled_step(clip_mode: str) -> None:
    if clip_mode == "agc":
        pytest.importorskip("timm")
    model, reference, scaled, plain = twin_optimizers()
    scaler = JDScaler("cpu", init_scale=2.0**12)
    x = torch.randn(6, 5)
    for _ in range(2):  # accumulate one micro-batch, then update
        w_scaled = scaler(losses_of(model, x), scaled, need_update=False)
        scaler(losses_of(model, x), scaled, 0.05, clip_mode, model.parameters())
        w_plain = plain.backward(losses_of(reference, x))
        plain.backward(losses_of(reference, x))
        if clip_mode == "norm":
            nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        elif clip_mode == "value":
            nn.utils.clip_grad_value_(reference.parameters(), 0.05)
        else:
            from timm.utils.clip_grad import dispatch_clip_grad

            dispatch_clip_grad(reference.parameters(), 0.05, mode="agc")
        plain.step()
        scaled.zero_grad()
        plain.zero_grad()
        torch.testing.assert_close(w_scaled, w_plain)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert "scale" in scaler.state_dict()


def test_jd_scaler_refuses_second_order_and_bad_arguments() -> None:
    model, _, optimizer, _ = twin_optimizers()
    scaler = JDScaler("cpu")
    losses = losses_of(model, torch.randn(4, 5))
    with pytest.raises(ValueError, match="second-order"):
        scaler(losses, optimizer, create_graph=True)
    with pytest.raises(ValueError, match="parameters"):
        scaler(losses, optimizer, clip_grad=1.0)
    with pytest.raises(ValueError, match="clip_mode"):
        scaler(losses, optimizer, clip_grad=1.0, clip_mode="x", parameters=model.parameters())
    with pytest.raises(TypeError, match="PartialJDOptimizer"):
        scaler(losses, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]


class _ReRun(nn.Module):
    """A module re-run by its rule (``core``: attention, a GRU cell loop, an LSTM, or a module
    with a parameter of its own) between two Linears, under autocast."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.inp, self.head = nn.Linear(4, 8), nn.Linear(8, 1)
        builders: dict[str, Callable[[], nn.Module]] = {
            "attention": lambda: nn.MultiheadAttention(8, 2, batch_first=True),
            "gru cell": lambda: nn.GRUCell(8, 8),
            "lstm": lambda: nn.LSTM(8, 8, batch_first=True),
            "own parameter": lambda: _Gain(),
        }
        self.core = builders[kind]()

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        if self.kind == "attention":
            a, _ = self.core(h, h, h)
        elif self.kind == "lstm":
            a, _ = self.core(h)
        elif self.kind == "gru cell":
            z = torch.zeros(x.shape[0], 8)
            for t in range(x.shape[1]):
                z = self.core(h[:, t], z)
            a = z.unsqueeze(1)
        else:
            a = self.core(h)
        out: Tensor = self.head(a).float().mean(dim=(1, 2)) ** 2
        return out


class _Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(h @ torch.diag(self.gain))


@pytest.mark.parametrize("kind", ["attention", "gru cell", "lstm", "own parameter"])
def test_rules_that_re_run_a_module_re_run_it_under_the_forwards_autocast(kind: str) -> None:
    """Under bf16 autocast the module's inputs are bf16: its re-run outside autocast met bf16
    inputs and float32 weights and was refused (attention, cells, custom modules) or raised a
    RuntimeError (LSTM). The re-run now runs under the forward's autocast: the Gramian is the
    oracle's under the same autocast, to bf16 precision."""
    from oracle import oracle_gramian, relative_error

    torch.manual_seed(0)
    model = _ReRun(kind)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = PartialJDOptimizer(base, model, considered=[model.core])
    x = torch.randn(4, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        optimizer.backward(model(x))
        losses = model(x)
    assert optimizer.last_step is not None
    expected = oracle_gramian(losses, list(model.core.parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 2e-2


def test_a_float16_refusal_of_tiny_gradients_says_to_scale_the_losses() -> None:
    """Under float16 autocast, losses of order 1e-5 give subnormal gradients whose tagged and
    plain passes cannot be told apart: the refusal says so (and to scale the losses), and
    scaled by 2^16, as a GradScaler does, the same step goes through."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = PartialJDOptimizer(base, model, considered=[model[0]])
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        losses = 1e-5 * model(x).float().pow(2).sum(dim=1)
        with pytest.raises(ValueError, match="subnormal: scale the losses"):
            optimizer.backward(losses)
        optimizer.backward(losses * 2.0**16)
    assert optimizer.last_step is not None
