"""Which loss each row of a considered call feeds: random tags, their check, and the placement.

The collection pass (cotangent 1 on every loss) gives each considered call its output gradients
``g_r = Σ_i ∂ℓ_i/∂y_r`` per row ``r``. The rules need ``∂ℓ_σ(r)/∂y_r`` for the one loss ``σ(r)``
row ``r`` feeds, so ``σ`` must be known, never assumed. A *tagged* pass (cotangent ``τ_i`` on loss
``i``) gives ``h_r = Σ_i τ_i ∂ℓ_i/∂y_r``. Row ``r`` feeds the single loss ``k`` iff
``h_r = τ_k g_r`` on every entry; the ratio ``c_r = ⟨h_r, g_r⟩ / ⟨g_r, g_r⟩`` names ``k``.

Tags are ``τ_i = 2^(−s·π(i))`` for a fresh random permutation ``π`` at every step: neighbouring
ranks differ by the factor ``2^s``, wide enough (``≥ 1 + 4δ``) for the precision ``δ`` of a ratio
in the dtype the backward ran in, and the tags span at least a factor ``2^MIN_SPREAD``, so that a
row mixing losses (a weighted mean of their tags) lands between tags. Where an integer ``s``
fits the dtype's spread (``m ≤ 65`` in float32 and bfloat16, ``m ≤ 129`` in float64, ``m ≤ 9`` in
float16) the tags are powers of two: the tagged pass then scales every intermediate exactly, and
a row's ratio is its tag bit for bit even where the backward cancels (with other tags, rounding
the products by ``τ`` in a cancelling sum can move a small row's ratio by more than ``δ``). Where
``m`` tags that far apart would span more than the dtype allows (``MAX_SPREAD``, e.g. beyond ~700
losses under bfloat16), the check can still confirm an expected map (the identity) but not name
another one.

Rows whose gradients are negligible in both passes (below ``δ·NEGLIGIBLE`` of the call's largest)
feed no loss (``σ = −1``); rows that feed several losses, or whose loss cannot be told, get
``σ = −2`` and the step is refused (or takes a slower exact path).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .gramian import Call
from .gramian._registry import map_rows

# dtype -> (relative precision of a ratio of two gradients, widest log2 spread of the tags).
# Precision: twice or more the error of such ratios through chains of autocast layers (figures:
# docs/benchmarks.md). Spread: tags scale gradients down by up to 2^spread in the tagged pass
# only, so the widest spread keeps gradients above ~1e-18 (float32, bfloat16) or ~1e-270 (float64)
# normal numbers, and as many losses as it allows get powers of two (m ≤ spread + 1); float16
# (GradScaler's range) keeps them within 2^8.
PRECISION: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 128.0),
    torch.float32: (2e-5, 64.0),
    torch.bfloat16: (1.6e-2, 64.0),
    torch.float16: (2e-3, 8.0),
}
MIN_SPREAD = 4.0
NEGLIGIBLE = 1e-3
UNKNOWN = -2  # σ of a row that feeds several losses, or whose loss cannot be told


@dataclass(frozen=True)
class Tags:
    """One draw of tags over ``m`` losses (see the module docstring)."""

    values: Tensor  # [m], the tagged pass's cotangent (the losses' dtype)
    exact: Tensor  # [m], the same values in float64
    loss_of_rank: Tensor  # [m], the loss whose tag has rank k
    spacing: float
    delta: float
    identifies: bool
    dtype: torch.dtype

    @property
    def m(self) -> int:
        return self.values.shape[0]


def precision_of(dtypes: list[torch.dtype]) -> torch.dtype:
    """The floating dtype of least precision among ``dtypes`` (float32 if none is known)."""
    known = [d for d in dtypes if d in PRECISION]
    return max(known, key=lambda d: PRECISION[d][0], default=torch.float32)


class TagSource:
    """Draws tags from a private generator (the global random state is left alone)."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def draw(self, m: int, losses: Tensor, precision: torch.dtype) -> Tags:
        delta, max_spread = PRECISION[precision]
        needed = math.log2(1 + 4 * delta) * max(m - 1, 1)
        spread = min(max(MIN_SPREAD, needed), max_spread)
        spacing = spread / max(m - 1, 1)
        if math.ceil(spacing) * (m - 1) <= max_spread:  # powers of two: h = τ·g bit for bit
            # (2^2 apart where the spread allows: the mean of two tags is then no tag; no wider,
            # so that small gradients scaled by the smallest tag stay normal numbers)
            spacing = max(math.ceil(spacing), min(2, math.floor(max_spread / max(m - 1, 1))))
        rank = torch.randperm(m, generator=self.generator)
        return _tags(rank, spacing, losses, delta, needed <= max_spread, precision)

    @staticmethod
    def mirrored(tags: Tags) -> Tags:
        """The same tags in the reverse order of ranks (``τ'_i = τ_max·τ_min / τ_i``): a row
        feeding two losses whose ratio names one loss in both draws cannot exist (see
        :func:`agreed`)."""
        rank = (tags.m - 1) - torch.argsort(tags.loss_of_rank).cpu()
        return _tags(rank, tags.spacing, tags.values, tags.delta, tags.identifies, tags.dtype)

    def column_weights(self, k: int, losses: Tensor) -> Tensor:
        """``k`` random weights in ``[1, 2)`` (20 bits after the point, then rounded to
        ``losses``' dtype), on ``losses``' device."""
        draws = torch.randint(1 << 20, (k,), generator=self.generator).double() / (1 << 20) + 1
        return draws.to(losses.device, losses.dtype)


def _tags(
    rank: Tensor, spacing: float, like: Tensor, delta: float, identifies: bool, dtype: torch.dtype
) -> Tags:
    """Tags ``2^(−spacing·rank_i)`` in ``like``'s dtype and on its device."""
    values = torch.exp2(-spacing * rank.double()).to(like.dtype)
    return Tags(
        values=values.to(like.device),
        exact=values.double().to(like.device),
        loss_of_rank=torch.argsort(rank).to(like.device),
        spacing=spacing,
        delta=delta,
        identifies=identifies,
        dtype=dtype,
    )


def agreed(first: Tensor, second: Tensor) -> Tensor:
    """``σ`` where two draws of tags, the second the mirror of the first, name the same loss (or
    none), :data:`UNKNOWN` elsewhere. One draw cannot tell a row feeding loss ``k`` from a row
    feeding losses ``p`` and ``q`` in proportions whose mean tag is ``τ_k`` (from parallel
    gradients: copies of a loss, a scalar output per row). Both draws agree on such a row only
    if ``(aτ_p + bτ_q)/(a + b) = τ_k`` and ``(a/τ_p + b/τ_q)/(a + b) = 1/τ_k``, whose sum gives
    ``(τ_k − τ_p)(τ_k − τ_q) = 0``: ``k`` is ``p`` or ``q`` and the other's share is zero."""
    return torch.where(first == second, first, UNKNOWN)


@dataclass(frozen=True)
class Ratios:
    """Per row: the ratio ``c`` of the tagged to the plain gradient, whether ``h = c·g`` holds on
    every entry (``clean``), and whether the row is negligible in both passes."""

    c: Tensor
    clean: Tensor
    negligible: Tensor


def _normalised(g: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``g``, ``h`` in float32 or wider, each row scaled by the power of two that brings its
    largest ``|g|`` to ``[1, 2)`` (exact, and no underflow in the products of tiny gradients);
    and the rows' largest ``|g|`` and ``|h|`` before scaling."""
    dtype = torch.promote_types(g.dtype, torch.float32)
    g, h = g.to(dtype), h.to(dtype)
    size, tagged = g.abs().amax(dim=1), h.abs().amax(dim=1)
    scale = torch.exp2(-torch.floor(torch.log2(torch.where(size > 0, size, 1))))
    return g * scale.unsqueeze(1), h * scale.unsqueeze(1), size, tagged


def negligible(size: Tensor, tagged: Tensor, delta: float) -> Tensor:
    """Rows negligible in both passes: against the call's largest row, or absolutely (so small
    that their Gramian terms underflow: below the dtype's smallest normal number over ``δ``)."""
    larger = torch.maximum(size, tagged)
    largest = larger.amax() if larger.numel() else larger.new_zeros(())
    floor = torch.finfo(size.dtype).tiny / delta
    return (larger <= NEGLIGIBLE * delta * largest) | (larger <= floor)


def ratios(g: Tensor, h: Tensor, delta: float) -> Ratios:
    """:class:`Ratios` of the rows of ``g`` and ``h`` ``[R, n]`` (computed in float32 or wider)."""
    g, h, size, tagged = _normalised(g, h)
    c = torch.linalg.vecdot(g, h) / torch.linalg.vecdot(g, g)
    residual = torch.addcmul(h, g, c.unsqueeze(1), value=-1).abs().amax(dim=1)
    clean = residual <= 4 * delta * c.abs() * g.abs().amax(dim=1)
    return Ratios(c, clean, negligible(size, tagged, delta))


def in_order(g: Tensor, h: Tensor, tags: Tags) -> Tensor:
    """Whether row ``i`` of ``g``, ``h`` ``[m, n]`` feeds loss ``i`` alone, or is negligible,
    for every row (a 0-d tensor): :func:`matches` on the identity without its gather."""
    r = ratios(g, h, tags.delta)
    tau = tags.exact.to(r.c.dtype)
    result: Tensor = (r.negligible | (r.clean & ((r.c - tau).abs() <= tags.delta * tau))).all()
    return result


def matches(r: Ratios, tags: Tags, expected: Tensor) -> Tensor:
    """Whether each row feeds the loss ``expected[row]`` alone, or is negligible (the only
    match for ``expected[row] = −1``: no loss)."""
    tau = tags.exact[expected.clamp_min(0)].to(r.c.dtype)
    fed = r.clean & ((r.c / tau - 1).abs() <= tags.delta) & (expected >= 0)
    return r.negligible | fed


def identify(r: Ratios, tags: Tags, expected: Tensor | None = None) -> Tensor:
    """``σ`` per row: the loss it alone feeds, −1 for none, :data:`UNKNOWN` otherwise. Rows that
    match ``expected`` keep it; others are named from their ratio where the tags allow."""
    m = tags.m
    rank = torch.nan_to_num(-torch.log2(r.c) / tags.spacing, nan=-1.0, posinf=-1.0, neginf=-1.0)
    rank = torch.round(rank)
    in_range = (rank >= 0) & (rank < m)
    loss = tags.loss_of_rank[rank.clamp(0, m - 1).long()]
    named = in_range & r.clean & ((r.c / tags.exact[loss].to(r.c.dtype) - 1).abs() <= tags.delta)
    if not tags.identifies:
        named = torch.zeros_like(named)
    sigma = torch.where(named, loss, UNKNOWN)
    if expected is not None:
        sigma = torch.where(matches(r, tags, expected), expected, sigma)
    return torch.where(r.negligible, -1, sigma)


def flat_rows(grads: tuple[Tensor, ...], rows: int) -> Tensor:
    """The output gradients of a call as ``[rows, n]`` (all outputs side by side)."""
    parts = [g.reshape(rows, -1) for g in grads]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def per_row(sigma_fine: Tensor, rows: int) -> Tensor:
    """``σ`` of each row from that of its positions ``[rows·T]``: the one loss its positions feed
    (−1 if none), :data:`UNKNOWN` if they feed several or any is unknown."""
    fine = sigma_fine.view(rows, -1)
    largest = fine.amax(dim=1)
    smallest = torch.where(fine >= 0, fine, torch.iinfo(fine.dtype).max).amin(dim=1)
    unknown = (fine == UNKNOWN).any(dim=1) | ((largest >= 0) & (smallest != largest))
    return torch.where(unknown, UNKNOWN, largest)


def multiplicity(sigma: Tensor, m: int) -> Tensor:
    """The largest number of rows feeding one loss (0-d tensor)."""
    valid = sigma >= 0
    counts = torch.zeros(m + 1, dtype=torch.long, device=sigma.device)
    counts.index_add_(0, torch.where(valid, sigma, m), valid.long())
    return counts[:m].amax() if m else counts.amax()


def slots(sigma: Tensor, m: int, splits: int) -> Tensor:
    """``[m, splits]``: the rows feeding each loss (their order kept), −1 where fewer."""
    rows = sigma.shape[0]
    key = torch.where(sigma >= 0, sigma, m)
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    position = torch.arange(rows, device=sigma.device)
    starts = torch.ones_like(sorted_key, dtype=torch.bool)
    starts[1:] = sorted_key[1:] != sorted_key[:-1]
    first = torch.cummax(torch.where(starts, position, 0), dim=0).values
    occurrence = position - first
    table = torch.full(((m + 1) * splits + 1,), -1, dtype=torch.long, device=sigma.device)
    keep = (sorted_key < m) & (occurrence < splits)
    index = torch.where(keep, sorted_key * splits + occurrence, (m + 1) * splits)
    table[index] = torch.where(keep, order, -1)
    return table[: m * splits].view(m, splits)


def place(call: Call, sigma: Tensor, m: int, splits: int, positions: bool) -> list[Call]:
    """``call`` re-indexed by loss: ``m`` rows, row ``i`` holding the rows that feed loss ``i``
    (rows feeding none are dropped). Several rows per loss (``splits``): as positions of one call
    (``positions``: a position-wise call) or as that many calls (a rule sums over calls). Empty
    slots repeat a real row with a zero output gradient, so they contribute nothing."""
    table = slots(sigma, m, splits)
    source = table.clamp_min(0)
    live = table >= 0

    def gather(x: Tensor, index: Tensor) -> Tensor:
        return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])

    def grads(index: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        out = []
        for g in call.output_grads:
            picked = gather(g, index)
            out.append(picked * mask.view(*mask.shape, *([1] * (g.ndim - 1))).to(g.dtype))
        return tuple(out)

    rows = call.rows
    if positions:
        return [map_rows(call, rows, lambda x: gather(x, source), grads(source, live))]
    placed = []
    for k in range(splits):
        index = source[:, k]
        pick = lambda x, index=index: gather(x, index)  # noqa: E731
        placed.append(map_rows(call, rows, pick, grads(index, live[:, k])))
    return placed


def _split(x: Tensor, trailing: int) -> Tensor:
    """``x`` ``[B, *P, *f]`` as ``[B·ΠP, *f]`` (``trailing``: the number of feature dims)."""
    return x.reshape(-1, *x.shape[x.ndim - trailing :]) if trailing else x.reshape(-1)


def position_grads(grads: tuple[Tensor, ...], features: tuple[int, int]) -> tuple[Tensor, ...]:
    """Output gradients of a position-wise call with its positions as rows."""
    return tuple(_split(g, features[1]) for g in grads)


def as_positions(call: Call, features: tuple[int, int]) -> Call:
    """A position-wise call with its positions as rows: each per-sample input ``[B, *P, *f_in]``
    as ``[B·ΠP, *f_in]``, each output gradient (and output) ``[B, *P, *f_out]`` likewise."""
    grads = position_grads(call.output_grads, features)
    moved = map_rows(call, call.rows, lambda x: _split(x, features[0]), grads)
    return replace(moved, outputs=position_grads(call.outputs, features))
