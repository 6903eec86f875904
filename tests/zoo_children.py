"""Zoo architectures whose modules use a child's parameters without calling the child
(``F.linear(x, self.qkv.weight, bias)``): timm's BEiT and EVA attention, torchvision's Swin
attention, and a parent that reads its child's weight in a helper method, inside a
comprehension. The parent, re-run by the generic rule, covers the child's parameters (which
does not book-keep: the step runs ``losses.backward(w)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from case import B, Case, mse
from torch import Tensor, nn


def timm_beit() -> Case:
    from timm.models.beit import Beit

    model = Beit(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3,
        use_rel_pos_bias=True, init_values=0.1,
    )  # fmt: skip
    parts = [model.blocks[-1], model.head]
    return Case(model, torch.randn(B, 3, 16, 16), parts, mse, resumed=False)


def timm_eva() -> Case:
    from timm.models.eva import Eva

    model = Eva(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3,
        qkv_fused=True, use_rot_pos_emb=True, ref_feat_shape=(2, 2), swiglu_mlp=True,
    )  # fmt: skip
    parts = [model.blocks[-1], model.head]
    return Case(model, torch.randn(B, 3, 16, 16), parts, mse, resumed=False)


def torchvision_swin() -> Case:
    from torchvision.models.swin_transformer import SwinTransformer  # type: ignore[import-untyped]

    model = SwinTransformer(
        patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
        num_classes=3, stochastic_depth_prob=0.0,
    )  # fmt: skip
    parts = [model.features[-1], model.norm, model.head]
    return Case(model, torch.randn(B, 3, 8, 8), parts, mse, resumed=False)


class Mixer(nn.Module):
    """A gate of its own; the projection's weight read in a helper, inside a comprehension."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.rand(4) + 0.5)
        self.proj = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack(self._branches(x)).sum(0) * self.gate

    def _branches(self, x: Tensor) -> list[Tensor]:
        return [F.linear(x * s, self.proj.weight, self.proj.bias) for s in (1.0, -0.5)]


class RelPos(nn.Module):
    """A table read by a method other than the forward (timm's MaxViT ``RelPosBias.get_bias``)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(0.5 * torch.randn(4))

    def get_bias(self) -> Tensor:
        return self.table.tanh()


class BiasedMix(nn.Module):
    """No parameter of its own: calls one child, and another child's ``get_bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.rel = nn.Linear(4, 4), RelPos()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.mix(x) + self.rel.get_bias()
        return out


def parent_calling_child_method() -> Case:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), BiasedMix(), nn.Tanh(), nn.Linear(4, 2))
    return Case(model, torch.randn(B, 3), [model[2], model[4]], mse, resumed=False)


def parent_reading_child_weight() -> Case:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Mixer(), nn.Tanh(), nn.Linear(4, 2))
    return Case(model, torch.randn(B, 3), [model[2], model[4]], mse, resumed=False)
