"""A module re-run by the generic rule covers its children's parameters where its own code reads
them (``F.linear(x, self.qkv.weight)``): those uses lie outside every call of the child, so the
step refused them (timm's BEiT and EVA, torchvision's Swin, Hugging Face's Mamba). Exactness of
the zoo's cases: ``test_exactness``; here, which modules are read so, and Mamba's mixer."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_grads, oracle_gramian, relative_error, weighted_sum_error
from torch import Tensor, nn
from torch.optim import SGD
from zoo_children import BiasedMix, Mixer

from pjd_optim import PartialJDOptimizer
from pjd_optim.gramian._registry import rule_for


class DtypeOnly(nn.Module):
    """Reads its child's weight for its dtype only, and calls the child."""

    def __init__(self) -> None:
        super().__init__()
        self.scale, self.fc = nn.Parameter(torch.ones(4)), nn.Linear(4, 4)
        nn.init.zeros_(self.fc.bias)  # (a read in __init__ is no use in the forward)
        self.fc.weight.data.mul_(0.5)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(x.to(self.fc.weight.dtype)) * self.scale
        return out


class NoParameterOfItsOwn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.fc.weight, self.fc.bias)


def logged(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    return wrapper


class Decorated(nn.Module):
    """Reads ``self.fc.weight`` in a forward behind a ``functools.wraps`` decorator."""

    def __init__(self) -> None:
        super().__init__()
        self.scale, self.fc = nn.Parameter(torch.ones(4)), nn.Linear(4, 4)

    @logged
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.fc.weight) * self.scale


@pytest.mark.parametrize(
    ("build", "covers"),
    [
        (Mixer, True),
        (Decorated, True),
        (BiasedMix, True),
        (DtypeOnly, False),
        (NoParameterOfItsOwn, False),
        # (reads its children's weights for its inference fast path only, and calls
        # self_attn.merge_masks, which reads no parameter: its children's rules stay)
        (lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), False),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)).replace("<lambda>", "encoder_layer"),
)
def test_which_modules_cover_their_children(build: Callable[[], nn.Module], covers: bool) -> None:
    module = build()
    assert bool(rule_for(module).covered_children(module)) is covers


@pytest.mark.parametrize("build", [Decorated, DtypeOnly, BiasedMix], ids=lambda f: f.__name__)
def test_covered_or_not_the_step_is_exact(build: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), build(), nn.Tanh(), nn.Linear(4, 2)).double()
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2:])
    x = torch.randn(6, 3, dtype=torch.float64)
    weights = optimizer.backward(model(x).sin().sum(dim=1))
    assert optimizer.last_step is not None
    losses = reference(x).sin().sum(dim=1)
    expected = oracle_gramian(losses, list(reference[2:].parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12
    params = list(reference.parameters())
    actual = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    expected_grads = oracle_grads(losses, params, weights)
    assert weighted_sum_error(actual, expected_grads, losses, params, weights) < 1e-12


def test_mamba_mixer_reading_its_convolution_and_projections_is_exact() -> None:
    transformers = pytest.importorskip("transformers")
    if not transformers.utils.is_torch_available():  # (transformers 5 needs torch >= 2.6)
        pytest.skip("this transformers does not run with this torch")
    torch.manual_seed(0)
    config = transformers.MambaConfig(
        vocab_size=40, hidden_size=8, state_size=4, num_hidden_layers=2, expand=2,
        conv_kernel=3, use_cache=False,
    )  # fmt: skip
    model = transformers.MambaForCausalLM(config).double()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 40, (3, 5))

    def losses_of(m: nn.Module) -> Tensor:
        logits = m(ids).logits[:, :-1]
        flat = F.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1), reduction="none")
        return flat.view(3, -1).mean(dim=1)

    last = model.backbone.layers[-1]
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[last])
    weights = optimizer.backward(losses_of(model))
    assert optimizer.last_step is not None
    losses = losses_of(reference)
    expected = oracle_gramian(losses, list(reference.backbone.layers[-1].parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12
    params = list(reference.parameters())
    grads = torch.autograd.grad(losses, params, weights, retain_graph=True, allow_unused=True)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is not None and g is not None
        assert relative_error(p.grad, g) < 1e-10


class DropoutParent(nn.Module):
    """Reads ``a``'s weight, calls ``proj``, and drops out in between (train mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.rand(4) + 0.5)
        self.a, self.proj = nn.Linear(4, 4), nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.proj(self.drop(F.linear(x, self.a.weight) * self.gate))
        return out


def test_only_the_children_read_are_covered() -> None:
    """A parent covers the children whose weights it reads, not the ones it calls: those keep
    their own rules, so considering only them needs no re-run of the parent (which its dropout
    refuses). Before, the parent covered its whole subtree, and this step was refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), DropoutParent(), nn.Linear(4, 2)).double()
    parent = model[2]
    assert isinstance(parent, DropoutParent)
    assert rule_for(parent).covered_children(parent) == {"a"}
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=parent.proj)
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.manual_seed(1)
    weights = optimizer.backward(model(x).sin().sum(dim=1))
    assert optimizer.last_step is not None
    torch.manual_seed(1)  # (the same dropout mask)
    losses = model(x).sin().sum(dim=1)
    expected = oracle_gramian(losses, list(parent.proj.parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12
    assert weights.shape == (6,)
