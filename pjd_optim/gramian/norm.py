"""Affine parameters of normalisation layers.

With ``x̂`` the normalised input and ``g`` the output gradient, the per-sample gradients are
``∇γ loss_i = Σ_t x̂_it ⊙ g_it`` and ``∇β loss_i = Σ_t g_it`` (sums over the positions that share
the parameter). They are small (one entry per channel), so the rule materialises them and the
Gramian is ``P Pᵀ``. BatchNorm is per-sample only in eval mode with running statistics; in train
mode it couples the samples, and per-instance losses refuse it (see ``couples_batch``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import Call, GramianRule, accumulate, register_copies_of, register_gramian_rule
from .linear import compute_dtype


def couples_batch(module: nn.Module) -> bool:
    """Whether ``module`` normalises with statistics of the whole batch right now."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or module.running_mean is None
    return False


def _features(module: nn.Module) -> tuple[int, int]:
    """Normalised (trailing) dims of a LayerNorm/RMSNorm: its positions are the dims before."""
    shape = getattr(module, "normalized_shape", ())
    count = 1 if isinstance(shape, int) else len(shape)
    return count, count


class AffineNormRule(GramianRule):
    """Subclasses give ``normalised(module, x) -> (x̂, channel_dims)``: ``x̂`` has the shape of
    ``x`` and ``channel_dims`` are the dims indexed by the affine parameters."""

    parameters = frozenset({"weight", "bias"})

    def normalised(self, module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        raise NotImplementedError

    def input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The input as :meth:`normalised` takes it (in the gradients' compute dtype)."""
        return x.to(dtype)

    def bookkeeps(self, module: nn.Module) -> bool:
        return True  # per-sample gradients are [B, C]: summing them is as cheap as autograd

    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        total: dict[str, Tensor] = {}
        for call in calls:
            gy = call.output_grads[0]
            dtype = compute_dtype(gy)
            x_hat, channel_dims = self.normalised(module, self.input(call.args[0], dtype))
            gy = gy.to(dtype)
            summed = tuple(d for d in range(1, x_hat.ndim) if d not in channel_dims)
            weight = x_hat * gy
            # (sum over an empty tuple of dims would reduce everything)
            grads = {
                "weight": weight.sum(dim=summed) if summed else weight,
                "bias": gy.sum(dim=summed) if summed else gy,
            }
            for name in params:
                accumulate(total, name, grads[name])
        return total


def _trailing(x: Tensor, count: int) -> tuple[int, ...]:
    return tuple(range(x.ndim - count, x.ndim))


@register_gramian_rule(nn.LayerNorm, "timm.layers.norm.LayerNorm")
class LayerNormRule(AffineNormRule):
    def positionwise(self, module: nn.Module) -> tuple[int, int] | None:
        return _features(module)

    def normalised(self, module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        assert isinstance(module, nn.LayerNorm)
        shape = module.normalized_shape
        return F.layer_norm(x, shape, eps=module.eps), _trailing(x, len(shape))


@register_gramian_rule(nn.RMSNorm)
class RMSNormRule(AffineNormRule):
    def positionwise(self, module: nn.Module) -> tuple[int, int] | None:
        return _features(module)

    def normalised(self, module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        assert isinstance(module, nn.RMSNorm)
        shape = module.normalized_shape
        return F.rms_norm(x, shape, eps=module.eps), _trailing(x, len(shape))


@register_copies_of("transformers.models.llama.modeling_llama.LlamaRMSNorm")
class LlamaRMSNormRule(AffineNormRule):
    """Hugging Face's RMSNorm as Llama writes it (and the many models that copy it): in float32,
    ``x̂ = x / sqrt(mean(x², -1) + ε)`` (``ε``: ``variance_epsilon``), then ``γ ⊙ x̂`` with
    ``x̂`` back in the input's dtype: ``∇γ = Σ_t x̂ ⊙ g`` with that ``x̂``."""

    parameters = frozenset({"weight"})
    eps_name = "variance_epsilon"
    rounded = True  # x̂ rounded to the input's dtype before the scale

    def applies(self, module: nn.Module) -> bool:
        """The forms' maths reads a weight ``[D]`` and a number ``ε`` (not so: generic rule)."""
        weight, eps = getattr(module, "weight", None), getattr(module, self.eps_name, None)
        vector = isinstance(weight, Tensor) and weight.ndim == 1 and weight.numel() > 1
        return vector and isinstance(eps, (int, float))

    def positionwise(self, module: nn.Module) -> tuple[int, int] | None:
        return 1, 1

    def input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return x  # (normalised rounds x̂ to the input's dtype where the module does)

    def normalised(self, module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        x_hat = _rms(x.to(torch.float32), getattr(module, self.eps_name))
        return x_hat.to(x.dtype) if self.rounded else x_hat, (x.ndim - 1,)


@register_copies_of("transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm")
class Olmo2RMSNormRule(LlamaRMSNormRule):
    """As Olmo2 writes it (GPT-OSS and about ten more): ``γ ⊙ x̂`` in float32, then the input's
    dtype: ``x̂`` in float32."""

    rounded = False


@register_copies_of("transformers.models.gemma.modeling_gemma.GemmaRMSNorm", "forward", "_norm")
class GemmaRMSNormRule(LlamaRMSNormRule):
    """As Gemma writes it: ``(1 + γ) ⊙ x̂`` in float32 (``ε``: ``eps``), then the input's dtype:
    ``∇γ = Σ_t x̂ ⊙ g`` with ``x̂`` in float32."""

    eps_name = "eps"
    rounded = False


def _rms(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@register_gramian_rule("timm.layers.norm.LayerNorm2d")
class ChannelLayerNormRule(AffineNormRule):
    """LayerNorm over the channels (dim 1) of ``[B, C, H, W]``, as timm's ``LayerNorm2d``."""

    def normalised(self, module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        assert isinstance(module, nn.LayerNorm)
        x_last = F.layer_norm(x.movedim(1, -1), module.normalized_shape, eps=module.eps)
        return x_last.movedim(-1, 1), (1,)


@register_gramian_rule(nn.GroupNorm, "timm.layers.norm.GroupNorm")
class GroupNormRule(AffineNormRule):
    def normalised(self, module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        assert isinstance(module, nn.GroupNorm)
        return F.group_norm(x, module.num_groups, eps=module.eps), (1,)


@register_gramian_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(AffineNormRule):
    """Running statistics (eval mode); or the batch's statistics when it normalises with them
    (train mode, ``track_running_stats=False``), where its affine gradients summed over the batch
    are still exact (task objectives; per-instance losses refuse such layers beforehand)."""

    def couples_batch(self, module: nn.Module) -> bool | None:
        return couples_batch(module)

    def normalised(self, module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if couples_batch(module):
            dims = tuple(d for d in range(x.ndim) if d != 1)
            mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, correction=0, keepdim=True)
            return (x - mean) / torch.sqrt(var + module.eps), (1,)
        assert module.running_mean is not None and module.running_var is not None
        mean = module.running_mean.to(x.dtype).view(shape)
        std = torch.sqrt(module.running_var.to(x.dtype) + module.eps).view(shape)
        return (x - mean) / std, (1,)
