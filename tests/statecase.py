"""Helpers of the state and step-contract tests: a small float64 MLP, its batches and losses,
and a deep comparison of optimizer states."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

F64 = torch.float64


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(seed: int) -> Tensor:
    return torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))


def losses_of(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out: Tensor = (model(x) - 1.0).pow(2).sum(dim=1)
    return out


def parameters_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_tensors(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_same(a: Any, b: Any, path: str = "", rtol: float = 0.0) -> None:
    """``a`` and ``b`` hold the same values (tensors by value, modules by state, optimizers by
    state dict, dataclasses and plain objects field by field)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        if rtol and a.is_floating_point():
            assert torch.allclose(a, b, rtol=rtol, atol=rtol * 1e-3), path
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, nn.Module):
        assert_same(a.state_dict(), b.state_dict(), f"{path}.state_dict()", rtol)
        assert a.training == b.training, path
    elif isinstance(a, Optimizer):
        assert_same(a.state_dict(), b.state_dict(), f"{path}.state_dict()", rtol)
        assert_same(a.defaults, b.defaults, f"{path}.defaults", rtol)
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        for field in dataclasses.fields(a):
            assert_same(
                getattr(a, field.name), getattr(b, field.name), f"{path}.{field.name}", rtol
            )
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]", rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for n, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{n}]", rtol)
    elif isinstance(a, (int, float, str, bool, type(None), torch.dtype, torch.device)):
        assert a == b or (a != a and b != b), f"{path}: {a!r} vs {b!r}"
    else:  # a weighting, a scaler: every attribute
        assert_same(vars(a), vars(b), path, rtol)
