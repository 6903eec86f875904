"""Considered modules the rules re-run (the generic rule, attention): which inputs are per-sample,
randomness, layouts; and the other paths of the exactness contract (frozen parts, many losses,
low precision)."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import (
    assert_unchanged,
    oracle_grads,
    oracle_gramian,
    relative_error,
    snapshot,
    trainable,
)
from torch import Tensor, nn
from torch.optim import SGD

from pjd_optim import Mean, PartialJDOptimizer


def check_exact(model: nn.Module, considered: list[nn.Module], x: Tensor, bound: float) -> None:
    """Our Gramian and ``.grad`` against the per-loss oracle, ``losses = Σ tanh(model(x))²``."""
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(
        SGD(trainable(model), lr=0.1), model, considered=considered, weighting=Mean()
    )

    def losses_of(m: nn.Module) -> Tensor:
        return torch.tanh(m(x)).pow(2).flatten(start_dim=1).sum(dim=1)

    weights = optimizer.backward(losses_of(model))
    assert optimizer.last_step is not None
    ids = {id(p) for c in considered for p in c.parameters() if p.requires_grad}
    pairs = list(zip(model.parameters(), reference.parameters(), strict=True))
    expected_losses = losses_of(reference)
    gramian = oracle_gramian(expected_losses, [q for p, q in pairs if id(p) in ids])
    assert relative_error(optimizer.last_step.gramian, gramian) < bound
    expected = oracle_grads(expected_losses, trainable(reference), weights)
    for p, e in zip(trainable(model), expected, strict=True):
        assert p.grad is not None and relative_error(p.grad, e) < bound


class WithTable(nn.Module):
    """A custom module (generic rule) that also receives a shared table ``[L, d]``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d))

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        return torch.tanh(x @ self.weight + table.sum(dim=0)) * table.mean()


class TableModel(nn.Module):
    def __init__(self, rows: int, d: int = 4) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(rows, d))
        self.inner = WithTable(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.inner(x, self.get_buffer("table")))
        return out


@pytest.mark.parametrize("rows", [5, 7], ids=["table_rows_equal_batch", "other_size"])
def test_a_shared_table_whose_size_equals_the_batch_is_not_taken_for_per_sample(rows: int) -> None:
    torch.manual_seed(0)
    model = TableModel(rows).double()
    check_exact(model, [model.inner, model.head], torch.randn(5, 4, dtype=torch.float64), 1e-10)


class Masked(nn.Module):
    """Attention with a shared ``[L, L]`` mask passed to a considered custom block."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(d, d))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        scores = (x @ self.q) @ x.transpose(-1, -2) + mask
        return torch.softmax(scores, dim=-1) @ x


class MaskedModel(nn.Module):
    def __init__(self, length: int) -> None:
        super().__init__()
        self.block = Masked()
        self.length = length

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.triu(torch.full((self.length, self.length), -1e9, dtype=x.dtype), 1)
        out: Tensor = self.block(x, mask).mean(dim=1)
        return out


def test_an_attention_mask_whose_length_equals_the_batch_is_shared() -> None:
    torch.manual_seed(0)
    model = MaskedModel(length=5).double()
    check_exact(model, [model.block], torch.randn(5, 5, 4, dtype=torch.float64), 1e-10)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_in_either_layout_is_exact(batch_first: bool) -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=batch_first).double()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = attn, nn.Linear(8, 1).double()

        def forward(self, x: Tensor) -> Tensor:
            seq = x if batch_first else x.transpose(0, 1)
            padding = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            padding[0, -1] = True
            out, _ = self.attn(seq, seq, seq, key_padding_mask=padding)
            out = out if batch_first else out.transpose(0, 1)
            result: Tensor = self.head(out.mean(dim=1))
            return result

    model = Model()
    check_exact(model, [model.attn], torch.randn(5, 3, 8, dtype=torch.float64), 1e-10)


def encoder(dropout: float) -> nn.Sequential:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True)
    return nn.Sequential(nn.Linear(3, 8), layer, nn.Flatten(), nn.Linear(32, 2)).double()


def test_dropout_inside_a_replayed_module_is_refused_in_train_mode_and_exact_in_eval() -> None:
    """The rule cannot replay this forward's masks: refused at every step the module is in train
    mode (checked per step, as modules switch), exact in eval mode."""
    torch.manual_seed(0)
    model = encoder(dropout=0.5)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model[1]])
    for _ in range(2):
        model.train()
        before = snapshot(model, optimizer)
        with pytest.raises(ValueError, match=r"random.*eval mode.*autograd"):
            optimizer.step(model(x).pow(2).sum(dim=1))
        assert_unchanged(before, snapshot(model, optimizer))
        model.eval()
        optimizer.step(model(x).pow(2).sum(dim=1))
        optimizer.zero_grad()
    check_exact(model, [model[1]], x, 1e-10)


def test_considered_parameters_frozen_after_wrapping_are_a_clear_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model[2]])
    model[2].requires_grad_(False)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"frozen.*unfreeze"):
        optimizer.step(model(torch.randn(5, 3)).squeeze(1).pow(2))
    assert_unchanged(before, snapshot(model, optimizer))
    model[2].weight.requires_grad_(True)  # part of it again: the Gramian over that part
    check_exact(model, [model[2]], torch.randn(5, 3), 1e-5)


@pytest.mark.parametrize("order", ["identity", "sorted"])
def test_four_thousand_losses_are_checked_and_exact(order: str) -> None:
    """m = 4096: every row is checked (tags stay apart in float32) and a sort is followed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(4096, 6)
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=[model[2]], weighting=Mean()
    )
    losses = model(x).pow(2).sum(dim=1)
    index = losses.detach().sort().indices if order == "sorted" else torch.arange(4096)
    optimizer.backward(losses[index])
    assert optimizer.last_step is not None
    # Oracle: per-sample gradients of the last layer in closed form, in float64.
    h = torch.tanh(model[0](x)).double()
    out = model[2](torch.tanh(model[0](x))).double()
    per_sample = 2 * out
    h, per_sample = h[index], per_sample[index]
    jac = torch.cat([torch.einsum("bp,bd->bpd", per_sample, h).flatten(1), per_sample], dim=1)
    assert relative_error(optimizer.last_step.gramian, jac @ jac.T) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_row_aligned_and_sorted_losses_are_exact_and_mixing_is_refused(
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(32, 6)
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=[model[2]], weighting=Mean()
    )
    reference = copy.deepcopy(model)
    for order in ("identity", "sorted"):
        with torch.autocast("cpu", dtype=dtype):
            losses = model(x).float().pow(2).sum(dim=1)
            expected_losses = reference(x).float().pow(2).sum(dim=1)
        if order == "sorted":
            index = losses.detach().sort().indices
            losses, expected_losses = losses[index], expected_losses[index]
        optimizer.backward(losses)
        optimizer.zero_grad()
        assert optimizer.last_step is not None
        expected = oracle_gramian(expected_losses, list(reference[2].parameters()))
        assert relative_error(optimizer.last_step.gramian, expected) < 5e-2
    with torch.autocast("cpu", dtype=dtype):
        losses = model(x).float().pow(2).sum(dim=1)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="feed several losses"):
        optimizer.backward(losses + losses.mean())
    assert_unchanged(before, snapshot(model, optimizer))


def test_square_transposed_losses_do_not_pass_on_a_coincidence_of_counts() -> None:
    """``[T, B]`` losses with ``T = B`` have the expected count of a ``[B, T]`` layout; the check
    sees that rows map elsewhere and follows them (exact), it does not assume the layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 5, 3, dtype=torch.float64)
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=[model[2]], weighting=Mean()
    )
    optimizer.backward(model(x).pow(2).sum(dim=-1).T)
    assert optimizer.last_step is not None
    expected = oracle_gramian(reference(x).pow(2).sum(dim=-1).T, list(reference[2].parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-10
