"""Embeddings: ids ``[B, *]`` select rows; ``∇_E loss_i = Σ_t e_{id_it} g_itᵀ``, hence

G_ij = Σ_{t,s} [id_it = id_js ≠ padding_idx] (g_it · g_js).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .._hooks import ModuleCall
from ._registry import GramianRule, register_gramian_rule
from .linear import cat_positions, compute_dtype


def _ids_and_grads(module: nn.Embedding, calls: Sequence[ModuleCall]) -> tuple[Tensor, Tensor]:
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


@register_gramian_rule(nn.Embedding)
class EmbeddingRule(GramianRule):
    """``nn.Embedding`` (padding_idx, repeated ids within and across samples)."""

    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[ModuleCall], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        assert isinstance(module, nn.Embedding)
        ids, gy = _ids_and_grads(module, calls)
        b, _, dim = gy.shape
        valid = ids >= 0
        rows = (torch.arange(b, device=ids.device).unsqueeze(1) * module.num_embeddings + ids)[
            valid
        ]
        grads = gy.new_zeros(b * module.num_embeddings, dim).index_add_(0, rows, gy[valid])
        return {"weight": grads.view(b, module.num_embeddings, dim)}

    def gramian(
        self, module: nn.Module, calls: Sequence[ModuleCall], params: Mapping[str, nn.Parameter]
    ) -> Tensor:
        assert isinstance(module, nn.Embedding)
        ids, gy = _ids_and_grads(module, calls)
        b, t, _ = gy.shape
        ids, gy = ids.reshape(b * t), gy.reshape(b * t, -1)
        same = (ids.unsqueeze(1) == ids.unsqueeze(0)) & (ids >= 0).unsqueeze(1)
        kernel = (gy @ gy.T) * same
        return kernel.view(b, t, b, t).sum(dim=(1, 3))
