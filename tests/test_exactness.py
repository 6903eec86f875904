"""Every architecture of the zoo: Gramian, weights and ``.grad`` equal the per-sample oracle."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from oracle import errors_against_oracle
from torch import nn
from torch.optim import SGD
from zoo import CASES

from pjd_optim import PartialJDOptimizer, _resume

_resume_default = _resume.MIN_SAVED_FLOPS  # read at import, before the autouse fixture lifts it


def tolerance(dtype: torch.dtype, device: str) -> float:
    """float64: exact to round-off. float32 on CUDA: convolutions run in TF32 (torch's default)."""
    if dtype == torch.float64:
        return 1e-9
    return 1e-4 if device == "cpu" else 2e-3


def check_against_oracle(name: str, dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(0)
    case = CASES[name]()
    errors = errors_against_oracle(case, dtype, device=device)
    bound = tolerance(dtype, device)
    assert errors["gramian"] < bound, errors
    assert errors["grads"] < bound, errors
    # UPGrad is continuous in G, but less so near degenerate problems: looser bound in float32.
    assert errors["weights"] < (bound if dtype == torch.float64 else 10 * bound), errors
    assert errors["resumed"] == case.resumed, errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_step_matches_per_sample_oracle(name: str, dtype: torch.dtype, device: str) -> None:
    check_against_oracle(name, dtype, device)


@pytest.mark.usefixtures("backward_in_another_thread")
@pytest.mark.parametrize("name", sorted(CASES))
def test_step_is_exact_when_the_backward_runs_in_another_thread(name: str) -> None:
    """As on CUDA, where autograd runs the backward (taps, markers, book-keeping) on a device
    thread: the step still collects every tap and matches the oracle, on both paths."""
    check_against_oracle(name, torch.float64, "cpu")


@pytest.mark.parametrize("name", ["seed_mlp", "conv2d", "tied_embedding", "multihead_attention"])
def test_autograd_mode_matches_oracle(name: str) -> None:
    torch.manual_seed(0)
    errors = errors_against_oracle(CASES[name](), torch.float64, gramian_mode="autograd")
    assert max(errors.values()) < 1e-9, errors


def test_resume_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a tiny considered part takes ``losses.backward(w)`` (the graph walk would cost
    more than the backward it saves); a large one resumes at the boundary."""
    monkeypatch.setattr(_resume, "MIN_SAVED_FLOPS", _resume_default)
    for width, resumed in ((8, False), (512, True)):
        model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width))
        base = SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
        optimizer = PartialJDOptimizer(base, model, considered=[model[2]])
        optimizer.backward(model(torch.randn(16, 4)).pow(2).mean(dim=1))
        assert optimizer.last_step is not None
        assert optimizer.last_step.resumed == resumed


def test_sparse_embedding_is_not_book_kept() -> None:
    """Autograd gives ``Embedding(sparse=True)`` a sparse gradient (for ``SparseAdam``); the
    book-kept one would be dense, so that step takes ``losses.backward(w)``."""
    torch.manual_seed(0)
    embed, head = nn.Embedding(10, 4, sparse=True), nn.Linear(12, 1)
    model = nn.Sequential(embed, nn.Flatten(), head)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model])
    ids = torch.randint(0, 10, (5, 3))
    weights = optimizer.backward(model(ids).squeeze(1).pow(2))
    assert optimizer.last_step is not None and not optimizer.last_step.resumed
    grad = embed.weight.grad
    assert grad is not None and grad.is_sparse
    reference = nn.Embedding(10, 4)
    reference.load_state_dict(embed.state_dict())
    out = head(reference(ids).flatten(start_dim=1)).squeeze(1).pow(2)
    (expected,) = torch.autograd.grad(out, [reference.weight], weights)
    torch.testing.assert_close(grad.to_dense(), expected, rtol=1e-6, atol=1e-7)


def test_forward_from_another_thread_takes_the_plain_backward() -> None:
    """The graph walk orders nodes by sequence numbers, which are counted per thread: a forward
    run in another thread (as ``DataParallel`` replicas are) is not resumed, and stays exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model[2]])
    x = torch.randn(5, 3)
    out: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: out.append(model(x).pow(2).sum(dim=1)))
    worker.start()
    worker.join()
    weights = optimizer.backward(out[0])
    assert optimizer.last_step is not None and not optimizer.last_step.resumed
    expected = torch.autograd.grad(
        reference(x).pow(2).sum(dim=1), list(reference.parameters()), weights
    )
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e)
