"""The row → loss map of every considered call of one step, verified (see ``_rowmap``).

- **Expected maps** (one host synchronisation, shared with the finiteness check): a call with one
  row per loss is expected to map row ``i`` to loss ``i``; a position-wise call (``Linear``, norms,
  ``Embedding``) with one position per loss, position ``(b, t)`` to loss ``b·T + t`` (per-token
  losses ``[B, T]`` or ``[B·T]``). The step computes the Gramian on that guess and keeps it if
  every row of every call matches its tag.
- **Named maps**: otherwise each row's loss is read from its tag, per row, or per position where
  a position-wise call's rows feed several losses; calls are re-indexed by loss
  (``_rowmap.place``: permutations, sorting, subsets, repeats, concatenated forwards).
- **Per-column**: losses ``[N, K]`` whose rows a call cannot separate (per-token losses after
  attention) take one pass per column ``j``; a pass with tags per *sample* ``n`` checks that each
  row feeds the losses of one sample, so in pass ``j`` it feeds ``(n, j)`` alone.
- Anything else is refused, naming the call and the fixes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from . import _rowmap as rowmap
from ._hooks import ModuleCall
from ._records import Record, moved
from .gramian import Call
from .gramian._registry import map_rows, rule_for

# Per-column path: the calls' tensors are repeated once per column; refuse beyond this.
PER_COLUMN_BYTES = 2**31


@dataclass
class Reached:
    """A considered call reached by the passes: its batch-major record (plain output gradients)
    and its output gradients in the tagged pass."""

    module: nn.Module
    call: Call
    tagged: tuple[Tensor, ...]
    name: str
    source: ModuleCall

    def features(self) -> tuple[int, int] | None:
        return rule_for(self.module).positionwise(self.module)

    def positions(self) -> int:
        """Positions per row of a position-wise call (0 if not position-wise)."""
        features = self.features()
        if features is None:
            return 0
        g = self.call.output_grads[0]
        trailing = math.prod(g.shape[g.ndim - features[1] :]) if features[1] else 1
        return g.numel() // max(1, self.call.rows * trailing)


@dataclass
class Collected:
    """What the two passes of a step found."""

    losses: Tensor  # flattened, [m]
    shape: torch.Size
    tags: rowmap.Tags
    reached: list[Reached]
    boundary: list[tuple[Tensor, Tensor]]  # (plain, tagged) gradients at the boundary tensors

    @property
    def m(self) -> int:
        return self.losses.shape[0]


def rows_of(reached: Reached, positions: bool) -> tuple[Call, Tensor, Tensor]:
    """The call (as positions, or not) and its plain and tagged gradients as ``[rows, n]``."""
    call, tagged = reached.call, reached.tagged
    if positions:
        features = reached.features()
        assert features is not None
        call = rowmap.as_positions(call, features)
        tagged = rowmap.position_grads(tagged, features)
    return call, rowmap.flat_rows(call.output_grads, call.rows), rowmap.flat_rows(tagged, call.rows)


def expected(collected: Collected) -> tuple[list[Record], Tensor] | None:
    """The records on the expected maps and a device flag: whether every row matches; ``None``
    where some call or boundary tensor has no expected map."""
    m, tags = collected.m, collected.tags
    records: list[Record] = []
    checks: list[Tensor] = []
    for reached in collected.reached:
        rows, positions = reached.call.rows, reached.positions()
        if rows == m:
            call, g, h = rows_of(reached, positions=False)
            checks.append(rowmap.in_order(g, h, tags))
        elif positions and positions * rows == m:
            call, g, h = rows_of(reached, positions=True)
            checks.append(rowmap.in_order(g, h, tags))
        elif positions and m % rows == 0 and m // rows < positions:
            # Per-token losses on the first positions of each row (labels shifted by one):
            # position (b, t) feeds loss b·T' + t for t < T', the others nothing.
            call, g, h = rows_of(reached, positions=True)
            kept = m // rows
            t = torch.arange(positions, device=g.device)
            first = (t < kept).repeat(rows)
            sigma = torch.where(
                first,
                torch.arange(rows, device=g.device).repeat_interleave(positions) * kept
                + t.repeat(rows),
                -1,
            )
            checks.append(rowmap.matches(rowmap.ratios(g, h, tags.delta), tags, sigma).all())
            call = rowmap.place(call, sigma, m, 1, positions=True)[0]
        else:
            return None
        records.append((reached.module, call))
    for plain, tagged in collected.boundary:
        if plain.ndim == 0 or plain.shape[0] != m:
            return None
        checks.append(rowmap.in_order(plain.reshape(m, -1), tagged.reshape(m, -1), tags))
    flag = torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool)
    return records, flag


PerColumn = Callable[[list[Reached]], list[Record]]


Choice = tuple[Call, Tensor, tuple[Call, Tensor] | None]  # call, σ; as positions, σ per position


def _choices(collected: Collected) -> list[Choice]:
    """Per reached call: ``σ`` of its rows read from the tags and, for a position-wise call, the
    call as positions and ``σ`` of each position."""
    m, tags = collected.m, collected.tags
    choices: list[Choice] = []
    for reached in collected.reached:
        coarse_call, g, h = rows_of(reached, positions=False)
        guess = torch.arange(m, device=g.device) if coarse_call.rows == m else None
        fine = None
        if reached.positions():
            fine_call, gf, hf = rows_of(reached, positions=True)
            fine_guess = torch.arange(m, device=g.device) if fine_call.rows == m else None
            sigma_fine = rowmap.identify(rowmap.ratios(gf, hf, tags.delta), tags, fine_guess)
            sigma = rowmap.per_row(sigma_fine, coarse_call.rows)
            fine = (fine_call, sigma_fine)
        else:
            sigma = rowmap.identify(rowmap.ratios(g, h, tags.delta), tags, guess)
        choices.append((coarse_call, sigma, fine))
    return choices


def _agreed(first: Choice, second: Choice) -> Choice:
    call, sigma, fine = first
    if fine is not None and second[2] is not None:
        fine = (fine[0], rowmap.agreed(fine[1], second[2][1]))
    return call, rowmap.agreed(sigma, second[1]), fine


def named(
    collected: Collected, per_column: PerColumn | None, confirm: Collected | None = None
) -> tuple[list[Record], dict[int, Tensor]]:
    """The records re-indexed by the loss each row feeds, read from the tags (and, with
    ``confirm``, only where the mirrored tags name the same loss), and ``σ`` of each reached
    call's rows (by ``id``); the per-column path (if given) for calls whose rows feed several
    losses; else a clear refusal."""
    m = collected.m
    choices = _choices(collected)
    if confirm is not None:
        pairs = zip(choices, _choices(confirm), strict=True)
        choices = [_agreed(first, second) for first, second in pairs]
    summary: list[Tensor] = []
    for _, sigma, fine in choices:
        summary += [sigma.min(), rowmap.multiplicity(sigma, m), (sigma == rowmap.UNKNOWN).sum()]
        if fine is not None:
            summary += [fine[1].min(), rowmap.multiplicity(fine[1], m)]
    values = torch.stack(summary).tolist() if summary else []
    records: list[Record] = []
    failed: list[tuple[Reached, int]] = []
    it = iter(values)
    for reached, (call, sigma, fine) in zip(collected.reached, choices, strict=True):
        low, splits, unknown = next(it), next(it), next(it)
        fine_low, fine_splits = (next(it), next(it)) if fine is not None else (rowmap.UNKNOWN, 0)
        if low >= -1:
            placed = rowmap.place(call, sigma, m, max(splits, 1), positions=False)
        elif fine is not None and fine_low >= -1:
            placed = rowmap.place(fine[0], fine[1], m, max(fine_splits, 1), positions=True)
        else:
            failed.append((reached, int(unknown)))
            continue
        records += [(reached.module, c) for c in placed]
    if failed:
        if per_column is None:
            raise refusal(failed[0][0], failed[0][1], collected)
        return per_column(collected.reached), {}
    return records, {
        id(r): sigma for r, (_, sigma, _) in zip(collected.reached, choices, strict=True)
    }


def one_to_one(sigmas: dict[int, Tensor], m: int) -> None:
    """A clear error unless every call's rows feed the ``m`` losses one to one (a permutation):
    the map a resumed step can take from one draw of tags. (A row feeding two losses along
    parallel gradients can take a third loss's tag; that loss then has two rows, or the map is
    not one to one, unless that loss is fed by no row at all.)"""
    checks = [
        (s.numel() == m) & (s >= 0).all() & (rowmap.multiplicity(s, m) == 1)
        for s in sigmas.values()
    ]
    if checks and not bool(torch.stack(checks).all()):
        raise ValueError(
            "The losses are not one per batch row in another order (a permutation), and the "
            "considered part is large enough that the step resumes the trunk's backward at its "
            "inputs, where no other map of rows to losses can be confirmed. Compute the losses "
            "in the batch order (a copied or mixed row is refused anyway); a sequence-first "
            "layer whose sequence is as long as the batch puts positions in the rows: run it "
            "batch-first (batch_first=True); or pass gramian_mode='autograd'. Nothing was "
            "changed."
        )


def rows_of_inputs(
    boundary: list[Tensor], collected: Collected, sigmas: dict[int, Tensor]
) -> list[Tensor]:
    """``σ`` of each boundary tensor's rows, from the calls it enters (it reaches the losses only
    through them, with its rows as theirs); a clear error where those calls disagree."""
    out = []
    for tensor in boundary:
        users = [
            sigmas[id(r)]
            for r in collected.reached
            if any(t is tensor for t in r.source.sources) and id(r) in sigmas
        ]
        sigma = users[0] if users else torch.full((tensor.shape[0],), -1, device=tensor.device)
        for other in users[1:]:
            sigma = torch.where(sigma == other, sigma, rowmap.UNKNOWN)
        out.append(sigma)
    return single_losses(out)


def boundary_rows(collected: Collected, confirm: Collected | None = None) -> list[Tensor]:
    """``σ`` of the rows of each boundary tensor (with ``confirm``, where both draws agree); a
    clear error if a row feeds several losses."""
    out = _boundary_sigmas(collected)
    if confirm is not None:
        out = [rowmap.agreed(a, b) for a, b in zip(out, _boundary_sigmas(confirm), strict=True)]
    return single_losses(out)


def _boundary_sigmas(collected: Collected) -> list[Tensor]:
    m, tags = collected.m, collected.tags
    out = []
    for plain, tagged in collected.boundary:
        rows = plain.shape[0] if plain.ndim else 1
        guess = torch.arange(m, device=plain.device) if rows == m else None
        r = rowmap.ratios(plain.reshape(rows, -1), tagged.reshape(rows, -1), tags.delta)
        out.append(rowmap.identify(r, tags, guess))
    return out


def single_losses(sigmas: list[Tensor]) -> list[Tensor]:
    """``sigmas``, or a clear error if some boundary row feeds several losses."""
    if sigmas and int(torch.stack([s.min() for s in sigmas]).min()) < -1:
        raise ValueError(
            "A tensor entering the considered layers feeds several losses from one row, so the "
            "step cannot resume its backward there. Compute the losses per sample, or pass "
            "gramian_mode='autograd'."
        )
    return sigmas


def refusal(reached: Reached, unknown: int, collected: Collected) -> ValueError:
    """The error for a call whose rows cannot be mapped to single losses."""
    rows = reached.call.rows
    tags = collected.tags
    cause = (
        f"{unknown} of its {rows} batch rows each feed several losses (or none can be told)"
        if tags.identifies
        else f"in {tags.dtype} the tags of {collected.m} losses are too close to tell which loss "
        f"each of {unknown} of its {rows} batch rows feeds (only the rows' own order can be "
        "checked at this precision)"
    )
    if tags.dtype == torch.float16:
        cause += (
            " (in float16, gradients this small may be subnormal: scale the losses, as a "
            "GradScaler or JDScaler does, or use bfloat16)"
        )
    shape = tuple(collected.shape)
    return ValueError(
        f"{reached.name}: {cause}, so the Gramian cannot be computed from per-row gradients. "
        f"Losses of shape {shape} must each come from rows of their own: per sample (permuted, "
        "sorted, subsets, repeats and concatenated forwards are fine), or per position of "
        "position-wise layers (Linear, norms, Embedding). Fixes: per-token losses after "
        "layers that mix positions: pass them as [B, T] (losses.view(B, T)), and run those "
        "layers batch-first (batch_first=True: a sequence-first [T, B, ...] layer puts the "
        "positions first in its rows); objectives that mix "
        "the batch (a loss plus a batch mean, mixup of outputs): pass task losses, "
        "step([loss_1, ...]); a layer applied to a table shared by every example (relative-"
        "position MLPs, learned queries, class prototypes: every row feeds every loss): consider "
        "other layers; or gramian_mode='autograd' (exact, one backward per loss). Nothing "
        "was changed."
    )


def per_column_records(
    collected: Collected,
    weighted: dict[int, tuple[Tensor, ...]],
    draws: list[tuple[rowmap.Tags, dict[int, tuple[Tensor, ...]]]],
    columns: list[dict[int, tuple[Tensor, ...]]],
) -> list[Record]:
    """Records of the per-column path: each reached call's rows mapped to samples by two draws
    of tags per sample, the second the mirror of the first, where both agree (``draws``: the tags
    ``τ`` with the gradients, by ``id`` of the record, for the cotangents ``τ_n·c_j``;
    ``weighted``: those for ``c_j``), then pass ``j``'s row ``r`` to loss ``σ(r)·K + j``,
    re-indexed by loss."""
    m = collected.m
    sample_tags = draws[0][0]
    n = sample_tags.m
    k = m // n
    records: list[Record] = []
    for reached in collected.reached:
        call = reached.call
        parts = [rowmap.flat_rows(column[id(reached)], call.rows) for column in columns]
        g = rowmap.flat_rows(weighted[id(reached)], call.rows)
        guess = torch.arange(n, device=g.device) if call.rows == n else None
        first, second = (
            rowmap.identify(
                rowmap.ratios(g, rowmap.flat_rows(h[id(reached)], call.rows), t.delta), t, guess
            )
            for t, h in draws
        )
        sigma = rowmap.agreed(first, second)
        # A row negligible in the weighted sum but not in some column (its columns cancelling
        # for these weights, however unlikely) is refused, never dropped.
        sizes = torch.stack([part.abs().amax(dim=1) for part in parts]).amax(dim=0)
        hidden = (sigma == -1) & ~rowmap.negligible(sizes, sizes, sample_tags.delta)
        sigma = torch.where(hidden, rowmap.UNKNOWN, sigma)
        low, splits, unknown = torch.stack(
            [sigma.min(), rowmap.multiplicity(sigma, n), (sigma == rowmap.UNKNOWN).sum()]
        ).tolist()
        if low < -1:
            raise refusal(reached, unknown, replace(collected, tags=sample_tags))
        grads = tuple(
            torch.cat([column[id(reached)][q] for column in columns], dim=0)
            for q in range(len(call.output_grads))
        )
        stacked = call_repeated(call, k, grads)
        offsets = torch.arange(k, device=sigma.device).repeat_interleave(call.rows)
        mapped = torch.where(sigma.repeat(k) >= 0, sigma.repeat(k) * k + offsets, -1)
        placed = rowmap.place(stacked, mapped, m, max(splits, 1), positions=False)
        records += [(reached.module, c) for c in placed]
    return records


def call_repeated(call: Call, k: int, grads: tuple[Tensor, ...]) -> Call:
    """``call`` with its per-sample inputs repeated ``k`` times along the rows (column-major)."""

    def repeat(x: Tensor) -> Tensor:
        return x.repeat(k, *([1] * (x.ndim - 1)))

    return map_rows(call, call.rows, repeat, grads)


def aligned(
    collected: Collected, found: dict[ModuleCall, tuple[Tensor, ...]]
) -> dict[int, tuple[Tensor, ...]]:
    """Output gradients of another pass, batch-major, by ``id`` of the reached call (zeros for a
    call that pass did not reach)."""
    out = {}
    for reached in collected.reached:
        grads = found.get(reached.source)
        if grads is None:
            out[id(reached)] = tuple(torch.zeros_like(g) for g in reached.call.output_grads)
        else:
            out[id(reached)] = moved(grads, reached.call.output_dims)
    return out


def per_column_bytes(collected: Collected) -> int:
    """Bytes of the tensors the per-column path repeats once per column."""
    total = 0
    for reached in collected.reached:
        call = reached.call
        inputs = [x for x, flag in zip(call.tensors(), call.per_sample(), strict=True) if flag]
        tensors = [*call.output_grads, *call.outputs, *inputs]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
