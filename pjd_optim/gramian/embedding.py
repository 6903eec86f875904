"""Embeddings: ids ``[B, *]`` select rows; ``∇_E loss_i = Σ_t e_{id_it} g_itᵀ``, hence

G_ij = Σ_{t,s} [id_it = id_js ≠ padding_idx] (g_it · g_js).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ._registry import Call, GramianRule, register_gramian_rule
from .linear import cat_positions, compute_dtype


def _ids_and_grads(module: nn.Embedding, calls: Sequence[Call]) -> tuple[Tensor, Tensor]:
    """Ids ``[B, T]`` (padding ids replaced by -1) and output gradients ``[B, T, D]``."""
    if module.scale_grad_by_freq:
        raise ValueError(
            "Embedding(scale_grad_by_freq=True) couples the samples of a batch (the scale counts "
            "ids over the whole batch); use gramian_mode='autograd' or scale_grad_by_freq=False."
        )
    ids, grads = [], []
    for call in calls:
        x, gy = call.args[0], call.output_grads[0]
        x = x.reshape(x.shape[0], -1)
        if module.padding_idx is not None:
            x = x.masked_fill(x == module.padding_idx, -1)
        ids.append(x)
        grads.append(gy.reshape(gy.shape[0], -1, gy.shape[-1]).to(compute_dtype(gy)))
    return cat_positions(ids), cat_positions(grads)


def _without_padding(ids: Tensor, gy: Tensor) -> tuple[Tensor, Tensor]:
    """Padding positions (id -1) sent to row 0 with a zero gradient: same sums, and no
    data-dependent shape (boolean indexing would synchronise with a GPU)."""
    valid = ids >= 0
    return ids.clamp_min(0), gy * valid.unsqueeze(-1)


@register_gramian_rule(nn.Embedding)
class EmbeddingRule(GramianRule):
    """``nn.Embedding`` (padding_idx, repeated ids within and across samples)."""

    parameters = frozenset({"weight"})

    def positionwise(self, module: nn.Module) -> tuple[int, int] | None:
        return 0, 1

    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        assert isinstance(module, nn.Embedding)
        ids, gy = _ids_and_grads(module, calls)
        b, _, dim = gy.shape
        ids, gy = _without_padding(ids, gy)
        rows = torch.arange(b, device=ids.device).unsqueeze(1) * module.num_embeddings + ids
        grads = gy.new_zeros(b * module.num_embeddings, dim)
        grads.index_add_(0, rows.flatten(), gy.reshape(-1, dim))
        return {"weight": grads.view(b, module.num_embeddings, dim)}

    def bookkeeps(self, module: nn.Module) -> bool:
        # A sparse embedding's autograd gradient is a sparse tensor; the summed one is dense.
        return isinstance(module, nn.Embedding) and not module.sparse

    def summed_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        assert isinstance(module, nn.Embedding)
        ids, gy = _ids_and_grads(module, calls)
        ids, gy = _without_padding(ids, gy)
        grad = gy.new_zeros(module.num_embeddings, gy.shape[-1])
        return {"weight": grad.index_add_(0, ids.flatten(), gy.reshape(-1, gy.shape[-1]))}

    def gramian(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> Tensor:
        assert isinstance(module, nn.Embedding)
        ids, gy = _ids_and_grads(module, calls)
        b, t, _ = gy.shape
        ids, gy = ids.reshape(b * t), gy.reshape(b * t, -1)
        same = (ids.unsqueeze(1) == ids.unsqueeze(0)) & (ids >= 0).unsqueeze(1)
        kernel = (gy @ gy.T) * same
        return kernel.view(b, t, b, t).sum(dim=(1, 3))
