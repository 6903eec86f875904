"""The row → loss map: however the losses are written, the step is exact or refused, never wrong.

Every case computes the losses twice from the same weights (ours, and a deep copy's for the
per-loss oracle); exact cases compare the Gramian and ``.grad`` with the oracle, refused ones check
the error and that nothing changed.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
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

Losses = Callable[[nn.Module, Tensor], Tensor]
B, T, D = 6, 4, 5


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def targets(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    return 3 * torch.randn(
        shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def squared(out: Tensor) -> Tensor:
    """Per-row squared error to fixed targets (``[R, ...]`` -> ``[R]``)."""
    return (out - targets(tuple(out.shape))).pow(2).flatten(start_dim=1).mean(dim=1)


PERM = torch.randperm(B, generator=torch.Generator().manual_seed(3))
X = torch.randn(B, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
X_SEQ = torch.randn(B, T, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def per_token(out: Tensor) -> Tensor:
    """``[B, T, c]`` outputs -> ``[B, T]`` per-token losses."""
    return (out - targets(tuple(out.shape))).pow(2).mean(dim=-1)


EXACT: dict[str, tuple[Tensor, Losses]] = {
    "identity": (X, lambda m, x: squared(m(x))),
    "permuted": (X, lambda m, x: squared(m(x))[PERM]),
    "sorted": (X, lambda m, x: squared(m(x)).sort().values),
    "top_k": (X, lambda m, x: squared(m(x)).topk(3).values),
    "subset": (X, lambda m, x: squared(m(x))[:4]),
    "repeated_input": (X, lambda m, x: squared(m(x.repeat(2, 1)))),
    "rolled_outputs": (X, lambda m, x: squared(m(x).roll(1, 0))),
    "rolled_losses": (X, lambda m, x: squared(m(x)).roll(2, 0)),
    "two_forwards": (X, lambda m, x: torch.cat([squared(m(x[:2])), squared(m(x[2:]))])),
    "two_forwards_swapped": (X, lambda m, x: torch.cat([squared(m(x[3:])), squared(m(x[:3]))])),
    "pairs_summed": (X, lambda m, x: squared(m(x)).view(3, 2).sum(dim=1)),
    "tokens_b_t": (X_SEQ, lambda m, x: per_token(m(x))),
    "tokens_flat": (X_SEQ, lambda m, x: per_token(m(x)).flatten()),
    "tokens_transposed": (X_SEQ, lambda m, x: per_token(m(x)).T),
    "tokens_sorted": (X_SEQ, lambda m, x: per_token(m(x)).flatten().sort().values),
    "tokens_shifted": (X_SEQ, lambda m, x: per_token(m(x)[:, :-1]).flatten()),
    "tokens_shifted_other_way": (X_SEQ, lambda m, x: per_token(m(x)[:, 1:]).flatten()),
    "tokens_shifted_b_t": (X_SEQ, lambda m, x: per_token(m(x)[:, :-1])),
    "per_sequence_mean": (X_SEQ, lambda m, x: per_token(m(x)).mean(dim=1)),
    "half_sequences": (X_SEQ, lambda m, x: per_token(m(x)).view(B, 2, T // 2).mean(dim=2)),
}


def step_errors(
    model: nn.Module, considered: list[nn.Module], x: Tensor, losses: Losses
) -> dict[str, float]:
    """Our backward against the per-loss oracle (the Gramian with ``Mean``, which any Gramian
    error reaches; ``.grad`` with the weights used)."""
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(
        SGD(trainable(model), lr=0.1), model, considered=considered, weighting=Mean()
    )
    weights = optimizer.backward(losses(model, x))
    assert optimizer.last_step is not None
    names = {id(p) for c in considered for p in c.parameters()}
    ref_considered = [
        q
        for (_, p), q in zip(model.named_parameters(), reference.parameters(), strict=True)
        if id(p) in names
    ]
    expected_losses = losses(reference, x)
    gramian = oracle_gramian(expected_losses, ref_considered)
    expected = oracle_grads(expected_losses, trainable(reference), weights)
    actual = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable(model)]
    return {
        "gramian": relative_error(optimizer.last_step.gramian, gramian),
        "grads": max(relative_error(a, e) for a, e in zip(actual, expected, strict=True)),
    }


@pytest.mark.parametrize("name", sorted(EXACT))
def test_one_to_one_and_per_token_maps_are_exact(name: str) -> None:
    torch.manual_seed(0)
    model = mlp()
    x, losses = EXACT[name]
    errors = step_errors(model, [model[0], model[2]], x, losses)
    assert max(errors.values()) < 1e-10, errors


@pytest.mark.parametrize("name", sorted(EXACT))
def test_the_last_layer_alone_is_exact_too(name: str) -> None:
    torch.manual_seed(0)
    model = mlp()
    x, losses = EXACT[name]
    errors = step_errors(model, [model[2]], x, losses)
    assert max(errors.values()) < 1e-10, errors


def mixup(out: Tensor) -> Tensor:
    return 0.7 * out + 0.3 * out[PERM]


REFUSED: dict[str, tuple[Tensor, Losses]] = {
    "duplicated_losses": (X, lambda m, x: squared(m(x))[torch.tensor([2, 2, 0, 5])]),
    "plus_batch_mean": (X, lambda m, x: (lambda s: s + s.mean())(squared(m(x)))),
    "mixup_of_outputs": (X, lambda m, x: squared(mixup(m(x)))),
    "centred_outputs": (X, lambda m, x: squared(m(x) - m(x).mean(dim=0))),
    "softmax_over_batch": (X, lambda m, x: -torch.log_softmax(squared(m(x)), dim=0)),
    "tokens_mixed_across_sequences": (
        X_SEQ,
        lambda m, x: (lambda o: per_token(o.roll(1, 0) + o))(m(x)),
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_losses_that_mix_rows_are_refused_before_anything_changes(name: str) -> None:
    torch.manual_seed(0)
    model = mlp()
    x, losses = REFUSED[name]
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model[2]])
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"feed several losses.*\[B, T\].*task losses.*autograd"):
        optimizer.step(losses(model, x))
    assert_unchanged(before, snapshot(model, optimizer))


# -- per-token losses after layers that mix positions ------------------------------------------


class TinyLM(nn.Module):
    """Embedding, one causal attention block, a final norm and an untied head."""

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.block = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=torch.float64)
        out: Tensor = self.head(
            self.norm(self.block(self.embed(ids), src_mask=mask, is_causal=True))
        )
        return out


IDS = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(5))
LABELS = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(6))
LABELS[0, 1] = -100


def lm_losses(m: nn.Module, ids: Tensor) -> Tensor:
    logits = m(ids)
    flat = F.cross_entropy(logits.flatten(0, 1), LABELS.flatten(), reduction="none")
    return flat


@pytest.mark.parametrize("part", ["head", "norm", "embed", "block"])
@pytest.mark.parametrize("layout", ["flat", "b_t"])
def test_per_token_language_model_losses_are_exact_or_refused(part: str, layout: str) -> None:
    """Per-token losses: position-wise parts (head, final norm) are exact with positions as rows
    in either layout; parts whose rows feed later tokens (the block, the bottom embedding) are
    exact as ``[B, T]`` losses (one pass per position) and refused as flat ``[B·T]`` ones."""
    torch.manual_seed(0)
    model = TinyLM().double().train()
    considered = [getattr(model, part)]

    def losses(m: nn.Module, ids: Tensor) -> Tensor:
        flat = lm_losses(m, ids)
        return flat if layout == "flat" else flat.view(ids.shape)

    if layout == "flat" and part in ("block", "embed"):
        optimizer = PartialJDOptimizer(
            SGD(model.parameters(), lr=0.1), model, considered=considered
        )
        before = snapshot(model, optimizer)
        with pytest.raises(ValueError, match=r"feed several losses.*losses.view\(B, T\)"):
            optimizer.backward(losses(model, IDS))
        assert_unchanged(before, snapshot(model, optimizer))
        return
    errors = step_errors(model, considered, IDS, losses)
    assert max(errors.values()) < 1e-10, errors


# -- random compositions of batch operations -----------------------------------------------------

KINDS = ["permute", "roll", "index", "repeat", "pairs", "mix", "mixup", "scale"]


def random_ops(seed: int) -> list[tuple[str, int]]:
    """A random composition of batch operations on ``[R, ...]`` rows (the model's output)."""
    rng = random.Random(seed)
    return [(rng.choice(KINDS), rng.randint(1, 3)) for _ in range(rng.randint(1, 4))]


def apply_op(kind: str, k: int, z: Tensor, seed: int) -> Tensor:
    rows = z.shape[0]
    if kind == "permute":
        return z[torch.randperm(rows, generator=torch.Generator().manual_seed(seed))]
    if kind == "roll":
        return z.roll(k, 0)
    if kind == "index":  # rows repeated (k > 1)
        return z[torch.arange(rows) // k % rows]
    if kind == "repeat":
        return z.repeat(2, *([1] * (z.ndim - 1)))
    if kind == "pairs":  # two rows per loss
        return z if rows < 2 else z[: rows // 2 * 2].reshape(rows // 2, -1)
    if kind == "mix":
        return z + z.mean(dim=0)
    if kind == "mixup":
        return 0.6 * z + 0.4 * z.roll(k, 0)
    return z * k


@pytest.mark.parametrize("seed", range(40))
def test_random_compositions_of_batch_operations_are_exact_or_refused(seed: int) -> None:
    torch.manual_seed(seed)
    model = mlp()
    ops = random_ops(seed)
    names = [kind for kind, _ in ops]

    def losses(m: nn.Module, x: Tensor) -> Tensor:
        z = m(x)
        for kind, k in ops:
            z = apply_op(kind, k, z, seed)
        return squared(z)

    # Refusal is allowed where rows mix, or where one output row feeds several losses (copies).
    mixes = any(n in ("mix", "mixup", "index", "repeat") for n in names)
    try:
        errors = step_errors(model, [model[0], model[2]], X, losses)
    except ValueError as error:
        assert mixes, (names, error)  # only a composition that mixes rows may be refused
        assert "feed several losses" in str(error)
        return
    assert max(errors.values()) < 1e-10, (names, errors)


class Skip(nn.Module):
    """The considered head's input also reaches the losses directly, rolled by one row."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(D, 7), nn.Linear(7, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        return squared(self.head(h)) + h.roll(self.shift, 0).pow(2).mean(dim=1)

    shift = 0


@pytest.mark.parametrize("shift", [0, 1])
def test_a_boundary_that_reaches_the_losses_past_the_considered_calls_is_checked(
    shift: int,
) -> None:
    """Row-aligned, the step resumes at the head's input; rolled, that input's rows feed two
    losses each: the step does not resume and stays exact (the Gramian only needs the head)."""
    torch.manual_seed(0)
    model = Skip().double()
    model.shift = shift
    errors = step_errors(model, [model.head], X, lambda m, x: m(x))
    assert max(errors.values()) < 1e-10, errors
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model.head])
    optimizer.backward(model(X))
    assert optimizer.last_step is not None and optimizer.last_step.resumed == (shift == 0)


@pytest.mark.parametrize("size", ["small", "subnormal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calls_with_tiny_or_subnormal_gradients_are_followed_not_refused(
    dtype: torch.dtype, size: str
) -> None:
    """Every loss scaled so that the call's gradients are tiny (their squares underflow) or
    subnormal, as for a batch of well-classified examples: the rows' losses are still told
    (sorted here), or, subnormal, their terms (which underflow in the Gramian) are dropped."""
    torch.manual_seed(0)
    model = mlp().to(dtype)
    factor = {"small": 1e-24 if dtype == torch.float32 else 1e-160}.get(size)
    if factor is None:
        factor = torch.finfo(dtype).tiny / 64
    scales = factor * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.5], dtype=dtype)

    def losses(m: nn.Module, x: Tensor) -> Tensor:
        return (squared(m(x.to(dtype))) * scales).sort().values

    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model[2]])
    optimizer.backward(losses(model, X))  # not refused
    if size == "small":
        errors = step_errors(model, [model[0], model[2]], X, losses)
        assert errors["gramian"] < (1e-10 if dtype == torch.float64 else 1e-5), errors


@pytest.mark.parametrize("seed", range(4))
def test_rows_whose_gradients_cancel_in_the_backward_are_followed_not_refused(seed: int) -> None:
    """float32, each loss ``a·z₁ − b·z₂`` of the considered output ``y`` through ``z = (y, y)``
    with ``b = a(1 − 10⁻⁴)``: ``∂ℓ/∂y = a − b`` is a sum that cancels 10⁴-fold. With tags that
    are not powers of two the tagged pass rounds ``τa`` and ``τb``, and the ratio moves by about
    10⁴ ulp, past the float32 precision the check allows; power-of-two tags scale exactly, so
    the rows' losses (sorted here) are told and the step is the oracle's."""
    torch.manual_seed(seed)
    duplicate = nn.Linear(1, 2, bias=False)  # z = (y, y)
    nn.init.ones_(duplicate.weight)
    duplicate.weight.requires_grad_(False)
    model = nn.Sequential(nn.Linear(D, 1), duplicate)
    a = 1.1
    coefficients = torch.tensor([a, -a * (1 - 1e-4)])

    def losses(m: nn.Module, x: Tensor) -> Tensor:
        out: Tensor = (m(x.float()) * coefficients).sum(dim=1)
        return out.sort().values

    errors = step_errors(model, [model[0]], X, losses)  # (refused: a ValueError)
    assert errors["gramian"] < 1e-6, errors
    # the weighted backward cancels 10⁴-fold in float32 too (ours and the oracle's differ in
    # where they round): about 10⁴·eps ≈ 1e-3
    assert errors["grads"] < 5e-3, errors


def _softmax_objectives(m: nn.Module, x: Tensor) -> Tensor:
    return F.softmax(m(x), dim=1)  # [B, C], each row sums to 1: its gradients cancel


def _opposite_columns(m: nn.Module, x: Tensor) -> Tensor:
    out = squared(m(x))
    factor = torch.tensor([-1.0, 2.0, -1.0, 0.5, 2.0, -1.0], dtype=out.dtype)
    return torch.stack([out, factor * out], dim=1)  # [B, 2]: samples 0, 2, 5 sum to zero


def _mixing_trunk() -> nn.Sequential:
    """A considered layer that mixes the positions of a sample (the per-column path)."""
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("losses", [_softmax_objectives, _opposite_columns])
@pytest.mark.parametrize("seed", range(3))
def test_per_column_losses_whose_columns_cancel_within_a_sample_are_exact(
    losses: Losses, dtype: torch.dtype, seed: int
) -> None:
    """``[B, K]`` losses through a considered layer whose rows the per-column path names by
    sample: a sample whose columns' gradients sum to zero at a row (softmax probabilities as
    objectives; columns ``ℓ, −ℓ``) is followed, not dropped as negligible."""
    torch.manual_seed(seed)
    model = _mixing_trunk().to(dtype)
    x = X.to(dtype) if seed % 2 else X.flip(0).to(dtype)
    errors = step_errors(model, [model[0]], x, losses)
    bound = 1e-10 if dtype == torch.float64 else 1e-5
    assert errors["gramian"] < bound and errors["grads"] < bound, errors


def test_columns_that_cancel_for_the_drawn_weights_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should the random column weights cancel a sample's columns (forced here: equal weights
    on ``ℓ, −ℓ``), its rows look negligible: they are refused, never dropped."""
    from pjd_optim import _rowmap

    def equal(self: object, k: int, losses: Tensor) -> Tensor:
        return torch.ones(k, dtype=losses.dtype, device=losses.device)

    monkeypatch.setattr(_rowmap.TagSource, "column_weights", equal)
    model = _mixing_trunk()
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=[model[0]], weighting=Mean()
    )
    before = snapshot(model, optimizer)
    out = squared(model(X))
    with pytest.raises(ValueError, match="each feed several losses"):
        optimizer.step(torch.stack([out, -out], dim=1))
    assert_unchanged(before, snapshot(model, optimizer))


def test_close_column_weights_do_not_make_the_check_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32, softmax probabilities ``[B, 3]``: the weighted sum is ``Σ_j (c_j − c₃)·∇p_j``.
    Summed from the column passes it rounded differently from the tagged pass by about
    ``eps/|c_j − c₃|``, and weights 1e-3 apart refused; from a pass of its own it differs by the
    tags only, and the step is exact."""
    from pjd_optim import _rowmap

    def close(self: object, k: int, losses: Tensor) -> Tensor:
        return 1 + 1e-3 * torch.arange(k, dtype=losses.dtype, device=losses.device)

    monkeypatch.setattr(_rowmap.TagSource, "column_weights", close)
    for seed in range(4):
        torch.manual_seed(seed)
        model = _mixing_trunk().float()
        x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed)).float()
        errors = step_errors(model, [model[0]], x, _softmax_objectives)
        assert errors["gramian"] < 1e-5, errors
