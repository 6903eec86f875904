"""Linear layers, and the grouped-linear kernel shared with convolutions.

With inputs ``A`` ``[B, T, g, d]`` and output gradients ``Gy`` ``[B, T, g, p]`` (T positions, g
independent groups), the per-sample weight gradient of group ``k`` is ``Σ_t Gy_itk A_itkᵀ`` and

    G_ij = Σ_k Σ_{t,s} (a_itk · a_jsk)(g_itk · g_jsk)               (weight, "ghost" form)
    G_ij += (Σ_t g_it) · (Σ_s g_js)                                   (bias)

The ghost form costs ``g (BT)² (d + p)`` flops in dense products and a ``[BT, BT]`` kernel per
group; materialising the per-sample gradients costs ``g BT p d + g B² p d`` flops, mostly
memory-bound (the ``[B, g, p, d]`` tensor is written, then read). :func:`use_ghost` picks per call.
Materialised gradients are formed a slice of output channels at a time (memory bounded by
``MATERIALIZE_LIMIT``), in bfloat16 on accelerators when the factors are bfloat16 (autocast), and
every Gramian is accumulated in float32 or wider.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ._registry import Call, GramianRule, register_gramian_rule

Mode = Literal["auto", "ghost", "materialize"]


def compute_dtype(t: Tensor) -> torch.dtype:
    """At least float32 (Gramians of half-precision activations lose too much)."""
    return torch.promote_types(t.dtype, torch.float32)


def wide(t: Tensor) -> Tensor:
    """``t`` in :func:`compute_dtype`."""
    return t.to(compute_dtype(t))


def weight_grads(a: Tensor, gy: Tensor) -> Tensor:
    """Per-sample weight gradients ``[B,g,p,d]`` from ``a`` ``[B,T,g,d]``, ``gy`` ``[B,T,g,p]``."""
    return torch.einsum("btgp,btgd->bgpd", wide(gy), wide(a))


GHOST_KERNEL_LIMIT = 2**26  # elements of the [g, BT, BT] kernels (256 MiB in float32)
MATERIALIZE_LIMIT = 2**25  # elements of one slice of materialised gradients (128 MiB in float32)


def materialised_gramian(a: Tensor, gy: Tensor) -> Tensor:
    """``P Pᵀ`` of the per-sample weight gradients ``P``, formed a slice of output channels at a
    time. The slices are computed in bfloat16 where the factors are bfloat16 on an accelerator
    (tensor cores; entries summed over positions in float32 and rounded once), else in float32;
    the Gramian is accumulated in float32 or wider."""
    b, _, g, d = a.shape
    p = gy.shape[-1]
    low = a.dtype == gy.dtype == torch.bfloat16 and a.device.type != "cpu"
    if not low:
        a, gy = wide(a), wide(gy)
    gramian = torch.zeros(b, b, dtype=compute_dtype(a), device=a.device)
    step = max(1, MATERIALIZE_LIMIT // max(1, b * g * d))
    for start in range(0, p, step):
        grads = torch.einsum("btgp,btgd->bgpd", gy[..., start : start + step], a)
        flat = wide(grads.reshape(b, -1))
        gramian.addmm_(flat, flat.T)
    return gramian


def use_ghost(a: Tensor, gy: Tensor, mode: Mode) -> bool:
    """The module docstring's cost model, materialisation's flops counted twice (measured on the
    CPU: its bandwidth-bound products run at about half the speed of the ghost form's GEMMs), and
    the ghost kernels' memory capped: ghost iff ``(BT)²(d+p) < 2(BTpd + B²pd)``."""
    if mode != "auto":
        return mode == "ghost"
    b, t, g, d = a.shape
    p = gy.shape[-1]
    if g * (b * t) ** 2 > GHOST_KERNEL_LIMIT:
        return False
    return (b * t) ** 2 * (d + p) < 2 * (b * t * p * d + b * b * p * d)


def weight_gramian(a: Tensor, gy: Tensor, mode: Mode = "auto") -> Tensor:
    """``[B, B]`` Gramian of the per-sample weight gradients (see module docstring)."""
    b, t, g, d = a.shape
    if not use_ghost(a, gy, mode):
        return materialised_gramian(a, gy)
    if t == 1 and g == 1:
        return single_position_gramian(a, gy, bias=False)
    a_flat = wide(a).reshape(b * t, g, d).transpose(0, 1)  # [g, BT, d]
    g_flat = wide(gy).reshape(b * t, g, -1).transpose(0, 1)  # [g, BT, p]
    kernel = ((a_flat @ a_flat.transpose(1, 2)) * (g_flat @ g_flat.transpose(1, 2))).sum(0)
    return kernel.view(b, t, b, t).sum(dim=(1, 3))


def single_position_gramian(a: Tensor, gy: Tensor, bias: bool) -> Tensor:
    """Ghost form for ``T = g = 1``: ``(A Aᵀ) ⊙ (Gy Gyᵀ)``, plus the bias Gramian ``Gy Gyᵀ``
    folded in as ``(A Aᵀ + 1) ⊙ (Gy Gyᵀ)`` when ``bias``."""
    b = a.shape[0]
    a_flat, g_flat = wide(a).reshape(b, -1), wide(gy).reshape(b, -1)
    inputs = a_flat @ a_flat.T
    return (inputs + 1 if bias else inputs) * (g_flat @ g_flat.T)


def linear_factors(calls: Sequence[Call]) -> tuple[Tensor, Tensor]:
    """Inputs ``[B, T, 1, d]`` and output gradients ``[B, T, 1, p]`` (in their own dtypes);
    extra leading dims and the calls themselves are folded into ``T`` (a reused layer's
    gradient sums over uses)."""
    inputs, grads = [], []
    for call in calls:
        x, gy = call.args[0], call.output_grads[0]
        inputs.append(x.reshape(x.shape[0], -1, 1, x.shape[-1]))
        grads.append(gy.reshape(gy.shape[0], -1, 1, gy.shape[-1]).to(x.dtype))
    return cat_positions(inputs), cat_positions(grads)


def cat_positions(parts: list[Tensor]) -> Tensor:
    """Concatenate along the position axis (dim 1) the factors of several calls."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class GroupedLinearRule(GramianRule):
    """Shared logic of layers that factor as grouped linear maps; subclasses give ``factors``."""

    parameters = frozenset({"weight", "bias"})
    transposed = False  # one group, the weight stored ``[in, out]`` (Hugging Face's ``Conv1D``)

    def __init__(self, mode: Mode = "auto") -> None:
        self.mode: Mode = mode

    def factors(self, module: nn.Module, calls: Sequence[Call]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        a, gy = self.factors(module, calls)
        grads: dict[str, Tensor] = {}
        if "weight" in params:
            weight = params["weight"]
            per_sample = weight_grads(a, gy)
            if self.transposed:
                per_sample = per_sample[:, 0].transpose(1, 2)
            grads["weight"] = per_sample.reshape(a.shape[0], *weight.shape)
        if "bias" in params:
            grads["bias"] = wide(gy).sum(dim=1).flatten(start_dim=1)
        return grads

    def bookkeeps(self, module: nn.Module) -> bool:
        return True

    def summed_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        """``Σ_{i,t} Gy_itk A_itkᵀ`` (one GEMM per group) and ``Σ_{i,t} Gy_it``."""
        a, gy = self.factors(module, calls)
        a, gy = wide(a), wide(gy)
        b, t, g, d = a.shape
        grads: dict[str, Tensor] = {}
        if "weight" in params:
            if g == 1:  # one GEMM on transposed views (an einsum would copy them first)
                summed = gy.reshape(b * t, -1).T @ a.reshape(b * t, d)
            else:
                summed = torch.einsum("btgp,btgd->gpd", gy, a)
            if self.transposed:  # (one group: ``summed`` is ``[out, in]``)
                summed = summed.T
            grads["weight"] = summed.reshape(params["weight"].shape)
        if "bias" in params:
            grads["bias"] = gy.sum(dim=(0, 1)).flatten()
        return grads

    def gramian(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> Tensor:
        a, gy = self.factors(module, calls)
        b, t, g, _ = a.shape
        if "weight" in params and "bias" in params and t == g == 1 and use_ghost(a, gy, self.mode):
            return single_position_gramian(a, gy, bias=True)
        gramian = torch.zeros(b, b, dtype=compute_dtype(a), device=a.device)
        if "weight" in params:
            gramian = gramian + weight_gramian(a, gy, self.mode)
        if "bias" in params:
            bias = wide(gy).sum(dim=1).flatten(start_dim=1)
            gramian = gramian + bias @ bias.T
        return gramian


@register_gramian_rule(nn.Linear, "transformers.models.falcon.modeling_falcon.FalconLinear")
class LinearRule(GroupedLinearRule):
    """``nn.Linear`` on inputs ``[B, *, d]`` (and Hugging Face's ``FalconLinear``, whose forward
    ``x @ W.T + b`` is the same maths)."""

    def positionwise(self, module: nn.Module) -> tuple[int, int] | None:
        return 1, 1

    def factors(self, module: nn.Module, calls: Sequence[Call]) -> tuple[Tensor, Tensor]:
        return linear_factors(calls)


@register_gramian_rule("transformers.pytorch_utils.Conv1D")
class TransposedLinearRule(LinearRule):
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` ``[in, out]``, a ``Linear``
    whose weight is stored transposed (the Gramian is the same)."""

    transposed = True
