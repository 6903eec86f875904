"""Every architecture of the zoo: Gramian, weights and ``.grad`` equal the per-sample oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import oracle_grads, oracle_gramian, relative_error, trainable
from torch.optim import SGD
from zoo import CASES, Case

from pjd_optim import PartialJDOptimizer, UPGrad
from pjd_optim._groups import parameters_of

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _run(case: Case, dtype: torch.dtype, gramian_mode: str = "hooks") -> dict[str, float]:
    """Errors of our backward() against the oracle on a copy of the same model."""
    model = case.model.to(dtype)
    inputs = case.inputs.to(dtype) if case.inputs.is_floating_point() else case.inputs
    reference = copy.deepcopy(model)

    optimizer = PartialJDOptimizer(
        SGD(trainable(model), lr=0.1),
        model,
        considered=case.considered,
        gramian_mode=gramian_mode,  # type: ignore[arg-type]
    )
    weights = optimizer.backward(case.loss(model(inputs)))
    assert optimizer.last_step is not None
    gramian = optimizer.last_step.gramian

    ids = {id(p) for p in parameters_of(case.considered) if p.requires_grad}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    ref_params = dict(reference.named_parameters())
    losses = case.loss(reference(inputs))
    expected_gramian = oracle_gramian(losses, [ref_params[n] for n in names])
    expected_weights = UPGrad()(expected_gramian)
    expected = oracle_grads(losses, trainable(reference), weights)
    actual = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable(model)]
    return {
        "gramian": relative_error(gramian, expected_gramian),
        "weights": relative_error(weights, expected_weights),
        "grads": max(relative_error(a, e) for a, e in zip(actual, expected, strict=True)),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_step_matches_per_sample_oracle(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    errors = _run(CASES[name](), dtype)
    tolerance = TOLERANCE[dtype]
    assert errors["gramian"] < tolerance, errors
    assert errors["grads"] < tolerance, errors
    # UPGrad is continuous in G, but less so near degenerate problems: looser bound in float32.
    assert errors["weights"] < (tolerance if dtype == torch.float64 else 1e-3), errors


@pytest.mark.parametrize("name", ["seed_mlp", "conv2d", "tied_embedding", "multihead_attention"])
def test_autograd_mode_matches_oracle(name: str) -> None:
    torch.manual_seed(0)
    errors = _run(CASES[name](), torch.float64, gramian_mode="autograd")
    assert max(errors.values()) < 1e-9, errors
