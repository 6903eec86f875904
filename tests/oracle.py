"""The test oracle: per-sample ``autograd.grad`` loops, independent of hooks and of the package;
and the comparisons the tests share (parameters, "nothing changed" snapshots)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from case import Case
from torch import Tensor, nn
from torch.optim import SGD

from pjd_optim import PartialJDOptimizer, UPGrad
from pjd_optim._groups import parameters_of


def oracle_jacobian(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``J[i] = ∇_θ losses[i]`` over ``params``, one ``autograd.grad`` per loss."""
    rows = []
    for loss in losses.flatten():
        grads = torch.autograd.grad(
            loss, params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def oracle_gramian(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    jac = oracle_jacobian(losses, params)
    return jac @ jac.T


def oracle_grads(losses: Tensor, params: Sequence[Tensor], weights: Tensor) -> list[Tensor]:
    """Expected ``.grad``: ``Σ_i w_i ∇ losses[i]``."""
    return list(
        torch.autograd.grad(
            losses.flatten(),
            params,
            grad_outputs=weights.to(losses.dtype),
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
    )


def oracle_backward(
    losses: Tensor, considered: Sequence[Tensor], params: Sequence[Tensor]
) -> Tensor:
    """The oracle of ``PartialJDOptimizer.backward`` with UPGrad: the weights of the per-sample
    Gramian over ``considered``, then ``.grad += Σ_i w_i ∇ℓ_i`` for ``params``. Returns ``w``."""
    weights = UPGrad()(oracle_gramian(losses, considered))
    for p, g in zip(params, oracle_grads(losses, params, weights), strict=True):
        p.grad = g if p.grad is None else p.grad + g
    return weights


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual − expected| / max |expected|`` (in float64, on the CPU)."""
    expected = expected.detach().double().cpu()
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual.detach().double().cpu() - expected).abs().max() / scale)


def errors_against_oracle(
    case: Case, dtype: torch.dtype, gramian_mode: str = "hooks", device: str = "cpu"
) -> dict[str, float]:
    """Errors of our backward() against the oracle on a copy of the same model."""
    model = case.model.to(device=device, dtype=dtype)
    inputs = case.inputs.to(device)
    inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
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
        "grads": weighted_sum_error(actual, expected, losses, trainable(reference), weights),
        "resumed": float(optimizer.last_step.resumed),
    }


def weighted_sum_error(
    actual: Sequence[Tensor],
    expected: Sequence[Tensor],
    losses: Tensor,
    params: Sequence[Tensor],
    weights: Tensor,
) -> float:
    """Error of ``Σ_i w_i ∇ℓ_i`` relative to ``Σ_i |w_i| |∇ℓ_i|``, the scale of the rounding
    errors of any summation order (per-sample gradients of opposite signs cancel, so the error
    relative to the sum itself says nothing about exactness)."""
    jac = oracle_jacobian(losses, params)
    scale = (weights.abs().to(jac.dtype) @ jac.abs()).max().clamp_min(1e-30)
    diff = torch.cat([(a - e).flatten() for a, e in zip(actual, expected, strict=True)])
    return float(diff.abs().max() / scale)


def assert_same_parameters(a: nn.Module, b: nn.Module, tolerance: float = 1e-10) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert relative_error(p, q) < tolerance


Snapshot = tuple[list[Tensor], list[Tensor | None], str]


def snapshot(model: nn.Module, optimizer: PartialJDOptimizer) -> Snapshot:
    """Parameters, gradients and optimizer state, to check that a failed call changed nothing."""
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        str(copy.deepcopy(optimizer.state_dict())),
    )


def assert_unchanged(before: Snapshot, after: Snapshot) -> None:
    params_a, grads_a, state_a = before
    params_b, grads_b, state_b = after
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        if grad_a is None or grad_b is None:
            assert grad_a is None and grad_b is None
        else:
            assert torch.equal(grad_a, grad_b)
    assert state_a == state_b


def lightning_fit(module: Any, data: Sequence[Any], **trainer_options: Any) -> list[str]:
    """One quiet CPU epoch of Lightning's ``Trainer`` over ``data`` (one batch per item); the
    messages of the warnings it raised."""
    from lightning.pytorch import Trainer

    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_options,
    )
    loader: torch.utils.data.DataLoader[Any] = torch.utils.data.DataLoader(
        data,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=None,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    return [str(w.message) for w in caught]
