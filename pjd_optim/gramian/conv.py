"""Convolutions (1d/2d/3d) as grouped linear maps over unfolded patches.

A convolution with ``groups = g`` is, at each of its ``T`` output positions, ``g`` independent
linear maps from patches of ``d = C_in/g · Π k`` inputs to ``p = C_out/g`` outputs. Unfolding the
(padded) input gives ``A`` ``[B, T, g, d]`` and the output gradient gives ``Gy`` ``[B, T, g, p]``;
the Gramian is then the grouped-linear one of :mod:`.linear` (summed over groups, which is where
ignoring ``groups`` would go wrong).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import Call, register_gramian_rule
from .linear import GroupedLinearRule, cat_positions


def unfold(conv: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Patches ``[B, T, C_in·Πk]`` of ``x`` ``[B, C_in, *S]``, in the layout of ``conv.weight``."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    spatial = len(conv.kernel_size)
    for dim in range(spatial):
        k, s, dil = conv.kernel_size[dim], conv.stride[dim], conv.dilation[dim]
        x = x.unfold(2 + dim, dil * (k - 1) + 1, s)[..., ::dil]
    # x: [B, C, L_1..L_n, k_1..k_n] -> [B, L_1..L_n, C, k_1..k_n]
    b, c = x.shape[:2]
    x = x.movedim(1, 1 + spatial)
    return x.reshape(b, -1, c * math.prod(conv.kernel_size))


@register_gramian_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(GroupedLinearRule):
    """``nn.Conv1d/2d/3d`` (any stride, padding, padding mode, dilation, groups)."""

    methods = ("forward", "_conv_forward")

    def factors(self, module: nn.Module, calls: Sequence[Call]) -> tuple[Tensor, Tensor]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        g = module.groups
        inputs, grads = [], []
        for call in calls:
            x, gy = call.args[0], call.output_grads[0]
            if x.ndim == len(module.kernel_size) + 1:  # unbatched input
                raise ValueError(
                    f"{type(module).__name__} received an unbatched input; "
                    "partial JD needs the batch on dim 0."
                )
            patches = unfold(module, x)
            b, t = patches.shape[:2]
            inputs.append(patches.view(b, t, g, -1))
            gy = gy.to(x.dtype).flatten(start_dim=2).transpose(1, 2)  # [B, T, C_out]
            grads.append(gy.reshape(b, t, g, -1))
        return cat_positions(inputs), cat_positions(grads)
