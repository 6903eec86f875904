"""Records of considered calls as rules get them: batch moved to dim 0, grouped by module."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._hooks import ModuleCall
from .gramian import Call
from .gramian._registry import batch_dim, rule_for

Record = tuple[nn.Module, Call]


def batch_major(call: ModuleCall, grads: tuple[Tensor, ...]) -> Call:
    """The public record of ``call`` with the batch moved to dim 0 in its per-sample inputs, its
    outputs and its output gradients ``grads`` (which inputs are per-sample, and where their batch
    is: :meth:`GramianRule.sample_dims`)."""
    module = call.module
    rule = rule_for(module)
    first = grads[0]
    rows = first.shape[batch_dim(rule.batch_dims(module)[1], 0)] if first.ndim else 0
    in_dims, out_dims = rule.sample_dims(module, call.args, call.kwargs, rows)
    output_dims = tuple(batch_dim(out_dims, k) for k in call.tapped)
    leaves, spec = tree_flatten((call.args, call.kwargs))
    position = 0
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            d = in_dims[position] if position < len(in_dims) else None
            if d:
                leaves[i] = leaf.movedim(d, 0)
            position += 1
    args, kwargs = tree_unflatten(leaves, spec)
    record = Call(
        args,
        kwargs,
        output_grads=(),
        output_positions=call.tapped,
        sample_dims=tuple(in_dims),
        output_dims=output_dims,
        outputs=moved(call.outputs, output_dims),
        precision=min(call.dtypes, key=_resolution, default=None),
        autocast=call.autocast,
    )
    return replace(record, output_grads=moved(grads, output_dims))


def _resolution(dtype: torch.dtype) -> float:
    return -torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def moved(grads: Iterable[Tensor], dims: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Tensors with their batch dim (``dims[k]`` for the ``k``-th) moved to 0."""
    return tuple(g.movedim(d, 0) if d else g for g, d in zip(grads, dims, strict=False))


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
