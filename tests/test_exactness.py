"""Every architecture of the zoo: Gramian, weights and ``.grad`` equal the per-sample oracle."""

from __future__ import annotations

import pytest
import torch
from oracle import errors_against_oracle
from zoo import CASES

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_step_matches_per_sample_oracle(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    errors = errors_against_oracle(CASES[name](), dtype)
    tolerance = TOLERANCE[dtype]
    assert errors["gramian"] < tolerance, errors
    assert errors["grads"] < tolerance, errors
    # UPGrad is continuous in G, but less so near degenerate problems: looser bound in float32.
    assert errors["weights"] < (tolerance if dtype == torch.float64 else 1e-3), errors


@pytest.mark.parametrize("name", ["seed_mlp", "conv2d", "tied_embedding", "multihead_attention"])
def test_autograd_mode_matches_oracle(name: str) -> None:
    torch.manual_seed(0)
    errors = errors_against_oracle(CASES[name](), torch.float64, gramian_mode="autograd")
    assert max(errors.values()) < 1e-9, errors
