"""Rows that feed several losses along parallel gradients (copies of a loss, scaled copies, a
scalar output per row) are refused at every draw of the tags, never named after a third loss;
rows that each feed one loss (permutations) are still named and exact. Oracle: the per-loss
``autograd.grad`` Jacobian. Each case builds a fresh optimizer per trial (fresh tags)."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_gramian, relative_error
from torch import Tensor, nn
from torch.optim import SGD

from pjd_optim import PartialJDOptimizer, _rowmap

pytestmark = pytest.mark.usefixtures("single_thread")


def copy_first(losses: Tensor) -> Tensor:
    return losses[torch.tensor([0, *range(losses.shape[0])])]


LAYOUTS: dict[str, Callable[[Tensor], Tensor]] = {
    "a copy": copy_first,
    "a copy times 2": lambda losses: torch.cat([losses, 2 * losses[:1]]),
    "a copy times 3": lambda losses: torch.cat([losses, 3 * losses[:1]]),
    "two copies": lambda losses: torch.cat([losses, losses[:1], losses[:1]]),
    "repeated": lambda losses: losses.repeat(2),
}
SETTINGS = [
    pytest.param(torch.float32, 40, False, id="f32-B40"),
    pytest.param(torch.float32, 16, False, id="f32-B16"),
    pytest.param(torch.float64, 40, False, id="f64-B40"),
    pytest.param(torch.float64, 6, False, id="f64-B6"),
    pytest.param(torch.float32, 16, True, id="bf16-autocast-B16"),
]


def trials(
    dtype: torch.dtype, batch: int, bf16: bool, losses_of: Callable[[Tensor, Tensor], Tensor]
) -> tuple[int, list[float]]:
    """25 steps, each with a fresh optimizer: the number refused and, for the others, the
    Gramian's error against the oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x = torch.randn(batch, 5, dtype=dtype)
    refused, errors = 0, []
    for _ in range(25):
        optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
        autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            losses = losses_of(model(x), x)
        expected = oracle_gramian(losses, list(model[2].parameters()))
        try:
            optimizer.backward(losses)
        except ValueError:
            refused += 1
        else:
            assert optimizer.last_step is not None
            errors.append(relative_error(optimizer.last_step.gramian, expected))
        optimizer.close()
        model.zero_grad(set_to_none=True)
    return refused, errors


def always_refused(
    dtype: torch.dtype, batch: int, bf16: bool, losses_of: Callable[[Tensor, Tensor], Tensor]
) -> None:
    refused, errors = trials(dtype, batch, bf16, losses_of)
    assert refused == 25, f"accepted {25 - refused} steps, Gramian errors {errors}"


@pytest.mark.parametrize(("dtype", "batch", "bf16"), SETTINGS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rows_feeding_several_losses_are_refused_at_every_draw(
    layout: str, dtype: torch.dtype, batch: int, bf16: bool
) -> None:
    """One row behind two or three losses whose gradients are parallel: with one draw of tags
    the mean of their tags could be a third loss's tag (e.g. ``(τ + 2·τ/4)/3 = τ/2``)."""
    labels = torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(1))

    def losses_of(out: Tensor, x: Tensor) -> Tensor:
        return LAYOUTS[layout](F.cross_entropy(out.float(), labels, reduction="none"))

    always_refused(dtype, batch, bf16, losses_of)


@pytest.mark.parametrize(("dtype", "batch", "bf16"), SETTINGS)
def test_a_scalar_output_feeding_overlapping_windows_is_refused(
    dtype: torch.dtype, batch: int, bf16: bool
) -> None:
    """A regression head with one output per row (every gradient of a row is parallel), losses
    over overlapping pairs of rows: each row feeds two losses with weights from the data."""

    def losses_of(out: Tensor, x: Tensor) -> Tensor:
        o = out[:, 0].float()
        return (o[:-1] + o[1:] - 1.0) ** 2

    always_refused(dtype, batch, bf16, losses_of)


@pytest.mark.parametrize(("dtype", "batch", "bf16"), SETTINGS)
def test_permuted_losses_are_named_and_exact_at_every_draw(
    dtype: torch.dtype, batch: int, bf16: bool
) -> None:
    """Rows that each feed one loss, in another order: both draws name them, never refused."""
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (batch,), generator=gen)
    order = torch.randperm(batch, generator=gen)

    def losses_of(out: Tensor, x: Tensor) -> Tensor:
        return F.cross_entropy(out.float(), labels, reduction="none")[order]

    refused, errors = trials(dtype, batch, bf16, losses_of)
    assert refused == 0
    bound = 3e-2 if bf16 else 1e-5 if dtype == torch.float32 else 1e-12
    assert max(errors) < bound


@pytest.mark.parametrize("m", [2, 9, 17, 41, 65, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_mirrored_tags_reverse_the_ranks(m: int, dtype: torch.dtype) -> None:
    """``τ_i · τ'_i`` is the same for every loss (the product of the largest and smallest tag),
    the mirror names the same losses by reversed ranks, and where the tags are powers of two
    they are spaced ``2^2`` apart when the dtype's spread allows."""
    losses = torch.zeros(m, dtype=dtype)
    tags = _rowmap.TagSource().draw(m, losses, dtype)
    mirror = _rowmap.TagSource.mirrored(tags)
    product = tags.exact * mirror.exact
    rtol = 4 * torch.finfo(dtype).eps  # (tags rounded to the dtype where not powers of two)
    torch.testing.assert_close(product, product[:1].expand(m), rtol=rtol, atol=0)
    assert torch.equal(mirror.loss_of_rank, tags.loss_of_rank.flip(0))
    spread = _rowmap.PRECISION[dtype][1]
    if float(tags.spacing).is_integer() and 2 * (m - 1) <= spread:  # (4: the least spread)
        assert tags.spacing == max(2, math.ceil(_rowmap.MIN_SPREAD / (m - 1)))


def test_agreed_keeps_only_what_both_draws_name() -> None:
    first = torch.tensor([0, 1, -1, 3, _rowmap.UNKNOWN])
    second = torch.tensor([0, 2, -1, _rowmap.UNKNOWN, _rowmap.UNKNOWN])
    expected = torch.tensor([0, _rowmap.UNKNOWN, -1, _rowmap.UNKNOWN, _rowmap.UNKNOWN])
    assert torch.equal(_rowmap.agreed(first, second), expected)


RESUMED_LAYOUTS: dict[str, Callable[[Tensor], Tensor]] = {
    "permuted": lambda losses: losses[
        torch.randperm(16, generator=torch.Generator().manual_seed(4))
    ],
    "a copy": copy_first,
    "a copy in place of a row": lambda losses: losses[torch.tensor([0, 0, *range(2, 16)])],
    "a copy times 3 in place of a row": lambda losses: torch.cat([losses[:15], 3 * losses[:1]]),
}


@pytest.mark.parametrize("layout", sorted(RESUMED_LAYOUTS))
def test_a_resumed_step_takes_a_permutation_and_refuses_copies(layout: str) -> None:
    """A head large enough for the step to resume the trunk's backward at its input, which frees
    the graph above it (no confirming pass): permuted losses are exact; copied losses are
    refused at every draw, as many losses as rows or not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 2048)).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    labels = torch.randint(0, 2048, (16,), generator=torch.Generator().manual_seed(3))
    for _ in range(10):
        optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
        losses = RESUMED_LAYOUTS[layout](F.cross_entropy(model(x), labels, reduction="none"))
        expected = oracle_gramian(losses, list(model[2].parameters()))
        if layout != "permuted":
            with pytest.raises(ValueError, match=r"several losses|one per batch row"):
                optimizer.backward(losses)
        else:
            optimizer.backward(losses)
            assert optimizer.last_step is not None and optimizer.last_step.resumed
            assert relative_error(optimizer.last_step.gramian, expected) < 1e-12
        optimizer.close()
        model.zero_grad(set_to_none=True)


class SequenceFirst(nn.Module):
    """A sequence-first encoder (``[T, B, D]``) and a head large enough for the step to try
    resuming at its input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 8192)

    def forward(self, ids: Tensor) -> Tensor:
        out: Tensor = self.head(self.encoder(self.embed(ids)))
        return out


@pytest.mark.parametrize("length", [15, 16, 17])
def test_a_sequence_first_boundary_as_long_as_the_batch_is_exact_or_refused(length: int) -> None:
    """With ``T = B`` the head's input ``[T, B, D]`` has one row per loss by coincidence: its rows
    (positions) feed every loss, and the resumed step (which freed the graph above the boundary)
    refuses, naming the fix; other lengths are exact against the oracle for every parameter."""
    from oracle import oracle_backward

    torch.manual_seed(0)
    model = SequenceFirst().double()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (length, 16), generator=gen)
    targets = torch.randint(0, 8192, (length, 16), generator=gen)

    def losses_of(m: nn.Module) -> Tensor:
        return F.cross_entropy(m(ids).permute(1, 2, 0), targets.T, reduction="none").mean(dim=1)

    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model.head)
    if length == 16:
        with pytest.raises(ValueError, match="batch_first=True"):
            optimizer.backward(losses_of(model))
        assert all(p.grad is None for p in model.parameters())
        return
    weights = optimizer.backward(losses_of(model))
    expected = oracle_backward(
        losses_of(reference), list(reference.head.parameters()), list(reference.parameters())
    )
    assert relative_error(weights, expected) < 1e-10
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert relative_error(p.grad, q.grad) < 1e-10


def test_a_resumed_step_frees_the_graph_above_its_boundary() -> None:
    """Losses in the batch order with a head large enough to resume: the collection pass frees
    the graph between the losses and the head (the loss's saved logits-sized tensors), as a
    plain backward would; another backward through it is refused by autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 2048)).double()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    labels = torch.randint(0, 2048, (16,), generator=torch.Generator().manual_seed(3))
    logits = model(torch.randn(16, 6, dtype=torch.float64))
    losses = F.cross_entropy(logits, labels, reduction="none")
    optimizer.backward(losses)
    assert optimizer.last_step is not None and optimizer.last_step.resumed
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(losses.sum(), logits)  # (through the loss only, above the head)


@pytest.mark.parametrize("scale", [1.0, 3.0, 63.0])
def test_per_token_losses_with_a_sample_copied_are_refused_at_every_draw(scale: float) -> None:
    """``[N, T]`` losses after attention (one pass per column, samples named by their tags):
    a sample's row of losses copied (or scaled by 3, or by 63: 1/64 is 2^-6, the tags' spacing
    here) makes one sample feed two rows of losses,
    refused at every draw."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(8, 3))
    x = torch.randn(6, 4, 8)
    labels = torch.randint(0, 3, (6, 4), generator=torch.Generator().manual_seed(6))
    for _ in range(25):
        optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=layer)
        tokens = F.cross_entropy(model(x).transpose(1, 2), labels, reduction="none")  # [6, 4]
        losses = torch.cat([tokens, scale * tokens[:1]])
        with pytest.raises(ValueError, match="several losses"):
            optimizer.backward(losses)
        optimizer.close()
