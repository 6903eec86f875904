"""The generic rule's re-run is checked on its gradients too, not only on its outputs: a shared
input whose first dim equals the batch size, or a batch mean inside the module, behind a
parameter initialised at (or near) zero (ReZero, LayerScale, adaLN-zero) leaves the outputs
unchanged but not the gradients. The shared input is then read as shared (exact against the
per-loss oracle), the batch mean refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_gramian, relative_error
from torch import Tensor, nn
from torch.optim import SGD

from pjd_optim import PartialJDOptimizer

B, D = 5, 4
F64 = torch.float64


class SharedGate(nn.Module):
    """``x·s + g·Σ table``: ``table`` is shared by the samples (a memory bank whose first dim
    happens to be the batch size)."""

    def __init__(self, gate: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(D))
        self.g = nn.Parameter(torch.full((D,), gate))

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        return x * self.s + self.g * table.sum()


class BatchContext(nn.Module):
    """``x·s + g·mean_batch(x)``: every sample's output depends on the whole batch."""

    def __init__(self, gate: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(D))
        self.g = nn.Parameter(torch.full((D,), gate))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s + self.g * x.mean(0)


class Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.a = nn.Linear(D, D)
        self.block = block
        self.register_buffer("bank", torch.randn(B, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        out: Tensor = (
            self.block(h, self.bank) if isinstance(self.block, SharedGate) else self.block(h)
        )
        return out


GATES = [
    pytest.param(torch.float64, 0.0, id="f64-zero"),
    pytest.param(torch.float32, 0.0, id="f32-zero"),
    pytest.param(torch.float32, 1e-4, id="f32-small"),
    pytest.param(torch.float32, 0.5, id="f32-large"),
]


def step(block: nn.Module, dtype: torch.dtype) -> tuple[PartialJDOptimizer, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Net(block).to(dtype)
    x, y = torch.randn(B, D, dtype=dtype), torch.randn(B, D, dtype=dtype)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model.block)
    losses = (model(x) - y).pow(2).sum(dim=1)
    return optimizer, losses, oracle_gramian(losses, list(model.block.parameters()))


@pytest.mark.parametrize(("dtype", "gate"), GATES)
def test_a_shared_input_sized_as_the_batch_is_read_as_shared(
    dtype: torch.dtype, gate: float
) -> None:
    torch.manual_seed(1)
    optimizer, losses, expected = step(SharedGate(gate), dtype)
    optimizer.backward(losses)
    assert optimizer.last_step is not None
    bound = 1e-12 if dtype == torch.float64 else 1e-5
    assert relative_error(optimizer.last_step.gramian, expected) < bound


@pytest.mark.parametrize(("dtype", "gate"), GATES)
def test_a_batch_mean_inside_a_module_is_refused(dtype: torch.dtype, gate: float) -> None:
    torch.manual_seed(1)
    optimizer, losses, _ = step(BatchContext(gate), dtype)
    with pytest.raises(ValueError, match="cannot be re-run per sample"):
        optimizer.backward(losses)


class WithAux(nn.Module):
    """A per-sample output and an auxiliary scalar over the batch (an MoE balancing loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(D))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x * self.s
        return y, y.pow(2).mean()


@pytest.mark.parametrize("aux_used", [False, True])
def test_an_output_without_the_batch_is_refused_clearly(aux_used: bool) -> None:
    """Refused with a clear error naming the module and the output's shape, before anything
    changes (it was a raw reshape error)."""
    from oracle import assert_unchanged, snapshot

    torch.manual_seed(0)
    a, block, head = nn.Linear(D, D), WithAux(), nn.Linear(D, 3)
    model = nn.ModuleDict({"a": a, "block": block, "head": head})
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=block)
    y, aux = block(torch.tanh(a(torch.randn(B, D))))
    losses = head(y).pow(2).sum(dim=1) + (aux if aux_used else 0.0)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"block \(WithAux\).*shape \(\)"):
        optimizer.step(losses)
    assert_unchanged(before, snapshot(model, optimizer))


class OtherRMSNorm(nn.Module):
    """A norm of another library (as Hugging Face's ``LlamaRMSNorm``): no rule of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(D))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6))


class RunningMix(nn.Module):
    """Mixes the positions of a sequence (a running mean), scaled per feature."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x: Tensor) -> Tensor:
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return self.weight * x.cumsum(dim=1) / steps


class GatedTimeMean(nn.Module):
    """A mean over the positions (``dim=1``) behind a gate initialised at zero: at zero its
    outputs are those of a position-wise module, its gradients are not."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        h = x * self.weight
        return h + self.gate * h.mean(dim=1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["flat", "[B, T]"])
@pytest.mark.parametrize("block", [OtherRMSNorm, RunningMix, GatedTimeMean])
def test_a_module_without_a_rule_takes_per_token_losses_as_b_t(
    block: type[nn.Module], dtype: torch.dtype, layout: str
) -> None:
    """Per-token losses through a module the generic rule re-runs (a norm of another library,
    one that mixes the positions, one that mixes them behind a gate at zero): ``[B, T]`` losses
    are exact against the oracle (one pass per position), flat ones refused, naming
    ``[B, T]`` (its positions are never taken as rows: a re-run per position could not tell the
    gated mean from a position-wise module)."""
    torch.manual_seed(2)
    module = block()
    model = nn.Sequential(nn.Linear(3, D), module, nn.Linear(D, 2)).to(dtype)
    x, y = torch.randn(4, 6, 3, dtype=dtype), torch.randn(4, 6, 2, dtype=dtype)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=module)
    tokens = (model(x) - y).pow(2).sum(dim=-1)
    if layout == "flat":
        with pytest.raises(ValueError, match=r"\[B, T\]"):
            optimizer.backward(tokens.flatten())
        return
    expected = oracle_gramian(tokens, list(module.parameters()))
    optimizer.backward(tokens)
    assert optimizer.last_step is not None
    bound = 1e-12 if dtype == torch.float64 else 1e-5
    assert relative_error(optimizer.last_step.gramian, expected) < bound


class ReZero(nn.Module):
    """``x + α·tanh(W x)`` with a scalar (0-d) ``α``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D))
        self.alpha = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * torch.tanh(x @ self.weight.T)


def test_a_scalar_parameter_of_a_module_without_a_rule_is_exact() -> None:
    """A 0-d parameter's per-example gradients are ``[B]`` (a raw IndexError before)."""
    torch.manual_seed(3)
    block = ReZero()
    model = nn.Sequential(nn.Linear(3, D), block, nn.Linear(D, 2)).double()
    x, y = torch.randn(7, 3, dtype=F64), torch.randn(7, 2, dtype=F64)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=block)
    losses = (model(x) - y).pow(2).sum(dim=1)
    expected = oracle_gramian(losses, list(block.parameters()))
    optimizer.backward(losses)
    assert optimizer.last_step is not None
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12


class Routed(nn.Module):
    """Experts applied to the rows a router picked (``h[token_idx]``, indices over the whole
    batch, as Hugging Face's eager MoE experts): its re-run on one sample indexes past it."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(D))

    def forward(self, h: Tensor, token_idx: Tensor) -> Tensor:
        out = torch.zeros_like(h)
        return out.index_add(0, token_idx, h[token_idx] * self.s)


def test_a_re_run_failing_with_any_error_is_refused_clearly() -> None:
    """An ``IndexError`` of the per-sample re-run (batch-wide indices) is a clear refusal
    before anything changes (it escaped raw)."""
    from oracle import assert_unchanged, snapshot

    torch.manual_seed(0)
    a, block = nn.Linear(D, D), Routed()
    model = nn.ModuleDict({"a": a, "block": block})
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=block)
    h = torch.tanh(a(torch.randn(B, D)))
    losses = block(h, torch.tensor([0, 2, 3])).pow(2).sum(dim=1)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"Routed cannot be re-run per sample.*index"):
        optimizer.step(losses)
    assert_unchanged(before, snapshot(model, optimizer))


def test_a_feature_hook_skips_the_re_run_and_a_gradient_hook_is_followed() -> None:
    """The generic rule re-runs a module with its forward hooks (they are part of its output's
    maths): a hook keeping features skips the re-run's per-sample calls with ``replaying()``,
    and a hook that changes only the gradient (straight-through scaling) is followed: exact
    against the oracle (a re-run without hooks was 14% off)."""
    from pjd_optim import replaying

    torch.manual_seed(0)
    a, block, head = nn.Linear(D, D), SharedGate(0.5), nn.Linear(D, 3)
    model = nn.ModuleDict({"a": a, "block": block, "head": head}).double()
    kept: list[Tensor] = []

    def keep(module: nn.Module, args: Any, out: Tensor) -> None:
        if not replaying():
            kept.append(out)

    def straight_through(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        return out.detach() + 0.1 * (out - out.detach())

    block.register_forward_hook(keep)
    block.register_forward_hook(straight_through)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=block)
    table = torch.randn(B, 3, dtype=F64)
    losses = head(block(torch.tanh(a(torch.randn(B, D, dtype=F64))), table)).pow(2).sum(dim=1)
    expected = oracle_gramian(losses, list(block.parameters()))
    optimizer.backward(losses)
    assert len(kept) == 1 and kept[0].shape == (B, D)
    assert not replaying()
    assert optimizer.last_step is not None
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12


class BatchNormOwnForward(nn.BatchNorm2d):
    """A BatchNorm with a forward of its own (timm's ``BatchNormAct2d``): the generic rule."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))


class SquareFn(torch.autograd.Function):
    """A custom autograd Function without functorch support (no ``setup_context``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        out: Tensor = 2 * x * grad
        return out


class Squared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(D))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = SquareFn.apply(x) * self.s
        return out


def test_a_module_vmap_cannot_batch_is_re_run_sample_by_sample() -> None:
    """Refused before ("its re-run per sample failed"): a BatchNorm subclass in eval mode under
    bfloat16 autocast (vmap's batch_norm rule rejects a bfloat16 input with float32 statistics),
    and a custom autograd Function vmap cannot transform. Re-run one sample at a time, both are
    exact against the oracle (to the autocast's precision for the first)."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 4, 3), BatchNormOwnForward(4)
    norm.running_mean = torch.rand(4) - 0.5
    norm.running_var = torch.rand(4) + 0.5
    model = nn.Sequential(conv, norm, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model.eval()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(B, 3, 6, 6))
    losses = F.cross_entropy(out.float(), torch.arange(B) % 3, reduction="none")
    expected = oracle_gramian(losses, list(norm.parameters()))
    optimizer.backward(losses)
    assert optimizer.last_step is not None
    assert relative_error(optimizer.last_step.gramian, expected) < 2e-2

    a, block = nn.Linear(D, D).double(), Squared().double()
    pair = nn.ModuleDict({"a": a, "block": block})
    optimizer = PartialJDOptimizer(SGD(pair.parameters(), lr=0.1), pair, considered=block)
    losses = block(torch.tanh(a(torch.randn(B, D, dtype=F64)))).pow(2).sum(dim=1)
    expected = oracle_gramian(losses, list(block.parameters()))
    optimizer.backward(losses)
    assert optimizer.last_step is not None
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12


class Counting(nn.Module):
    """A module counting its calls in a buffer (in place: vmap cannot re-run it)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(D))
        self.calls: Tensor
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls.add_(1)
        return x * self.s


def test_a_re_run_sample_by_sample_leaves_the_modules_buffers_alone() -> None:
    """The re-run one sample at a time edits copies of the buffers: a call counter counts the
    forwards only (it counted every re-run: B + 2 per step), and the Gramian is exact."""
    torch.manual_seed(0)
    a, block = nn.Linear(D, D).double(), Counting().double()
    pair = nn.ModuleDict({"a": a, "block": block})
    optimizer = PartialJDOptimizer(SGD(pair.parameters(), lr=0.1), pair, considered=block)
    for step in range(2):
        losses = block(torch.tanh(a(torch.randn(B, D, dtype=F64)))).pow(2).sum(dim=1)
        expected = oracle_gramian(losses, list(block.parameters()))
        optimizer.step(losses)
        optimizer.zero_grad()
        assert optimizer.last_step is not None
        assert relative_error(optimizer.last_step.gramian, expected) < 1e-12
        assert float(block.calls) == step + 1
