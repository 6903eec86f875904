"""Records of considered calls as rules get them: batch moved to dim 0, rows checked, grouped."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._hooks import ModuleCall
from .gramian import Call, batch_dim, map_rows, rule_for

Record = tuple[nn.Module, Call]


def batch_major(call: ModuleCall, passes: list[tuple[Tensor, ...]]) -> tuple[ModuleCall, Call]:
    """The public record of ``call`` with the batch moved to dim 0 (see
    :meth:`GramianRule.batch_dims`) and the output gradients of the passes stacked along it."""
    rule = rule_for(call.module)
    in_dims, out_dims = rule.batch_dims(call.module)
    grads = [torch.cat(g, dim=0) if len(g) > 1 else g[0] for g in zip(*passes, strict=True)]
    if tuple(in_dims) == (0,) and tuple(out_dims) == (0,):
        return call, Call(call.args, call.kwargs, tuple(grads), call.tapped)
    # Dims other than 0: move them (the passes were stacked along dim 0 above, so redo it).
    grads = [
        torch.cat([g[k].movedim(batch_dim(out_dims, p), 0) for g in passes], dim=0)
        for k, p in enumerate(call.tapped)
    ]
    leaves, spec = tree_flatten((call.args, call.kwargs))
    position = 0
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            leaves[i] = leaf.movedim(batch_dim(in_dims, position), 0)
            position += 1
    args, kwargs = tree_unflatten(leaves, spec)
    return call, Call(args, kwargs, tuple(grads), call.tapped)


def with_rows(name: str, call: Call, batch: int, objectives: int) -> Call:
    """``call`` checked to have ``K·B`` rows; for ``K`` objective columns, inputs repeated."""
    rows = objectives * batch
    if any(g.shape[0] != rows for g in call.output_grads):
        raise ValueError(
            f"{name} saw a batch of {call.output_grads[0].shape[0] // objectives} rows but the "
            f"losses have {batch} rows. Losses must be "
            "per-instance with the batch on dim 0 of every considered module's input and output; "
            "concatenate per-sample losses of separate forwards in order, or use "
            "gramian_mode='autograd'."
        )
    if objectives == 1:
        return call

    def repeat(x: Tensor) -> Tensor:
        return x.repeat(objectives, *([1] * (x.ndim - 1)))

    return map_rows(call, batch, repeat, call.output_grads)


def by_module(records: Iterable[Record]) -> dict[nn.Module, list[Call]]:
    by_module: dict[nn.Module, list[Call]] = defaultdict(list)
    for module, call in records:
        by_module[module].append(call)
    return by_module


def scaled(call: Call, weights: Tensor) -> Call:
    """``call`` with row ``i`` of its output gradients scaled by ``weights[i]``."""
    return replace(call, output_grads=tuple(g * rows_like(weights, g) for g in call.output_grads))


def rows_like(weights: Tensor, x: Tensor) -> Tensor:
    """``weights`` ``[B]`` shaped to scale the rows of ``x`` ``[B, ...]``."""
    return weights.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def objective_major_to_sample_major(gramian: Tensor, losses: Tensor) -> Tensor:
    """Reorder a Gramian indexed (objective, sample) as ``losses.flatten()`` (sample, objective)."""
    batch = losses.shape[0]
    objectives = losses.numel() // batch
    if objectives == 1:
        return gramian
    g = gramian.view(objectives, batch, objectives, batch).permute(1, 0, 3, 2)
    return g.reshape(batch * objectives, batch * objectives)
