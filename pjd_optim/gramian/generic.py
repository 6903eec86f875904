"""Generic exact rule: per-sample vector-Jacobian products with ``torch.func``.

For a call ``y = f(θ, x)`` with output gradients ``Gy`` (row ``i`` = ∂loss_i/∂y_i), the per-sample
gradient is ``P[i] = vjp(θ ↦ f(θ, x_i), Gy_i)``, vmapped over samples; calls of the same module are
summed. Exact for any module whose samples are independent along the batch dim, at the cost of
re-running the module's forward (it must be deterministic: no active dropout inside).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._registry import (
    Call,
    GramianRule,
    batch_dim,
    has_rows,
    register_gramian_rule,
    summed_over_calls,
)


def per_sample_vjp(
    rule: GramianRule, module: nn.Module, call: Call, params: Mapping[str, nn.Parameter]
) -> dict[str, Tensor]:
    """``{name: P}``, ``P[i]`` the gradient of ``call``'s objective ``i`` w.r.t. ``params``.

    Inputs with one row per objective (on dim 0, as the engine gives them) are vmapped; each
    sample is put back at the batch dim the module expects (``rule.batch_dims``).
    """
    batch = call.output_grads[0].shape[0]
    in_dims, out_dims = rule.batch_dims(module)
    leaves, spec = tree_flatten((call.args, dict(call.kwargs)))
    tensor_position = {
        i: n for n, i in enumerate(i for i, x in enumerate(leaves) if isinstance(x, Tensor))
    }
    batched = [has_rows(x, batch) for x in leaves]
    samples = [x for x, b in zip(leaves, batched, strict=True) if b]
    values = {name: p.detach() for name, p in params.items()}

    def one_sample(theta: dict[str, Tensor], xs: list[Tensor], gys: tuple[Tensor, ...]) -> Any:
        it = iter(xs)
        filled = [
            next(it).unsqueeze(batch_dim(in_dims, tensor_position[i])) if b else x
            for i, (x, b) in enumerate(zip(leaves, batched, strict=True))
        ]
        args, kwargs = tree_unflatten(filled, spec)

        def forward(theta: dict[str, Tensor]) -> tuple[Tensor, ...]:
            out = tree_flatten(functional_call(module, theta, tuple(args), kwargs))[0]
            return tuple(out[k] for k in call.output_positions)

        pullback = vjp(forward, theta)[1]
        cotangents = tuple(
            g.unsqueeze(batch_dim(out_dims, k))
            for g, k in zip(gys, call.output_positions, strict=True)
        )
        return pullback(cotangents)[0]

    grads: dict[str, Tensor] = vmap(one_sample, in_dims=(None, 0, 0), randomness="different")(
        values, samples, call.output_grads
    )
    return grads


@register_gramian_rule(nn.Module)
class GenericRule(GramianRule):
    """Any module: per-sample gradients by vmapped ``torch.func.vjp``, summed over calls."""

    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        return summed_over_calls(calls, lambda call: per_sample_vjp(self, module, call, params))


@register_gramian_rule(nn.MultiheadAttention)
class AttentionRule(GenericRule):
    """``MultiheadAttention`` uses ``out_proj``'s parameters without calling ``out_proj``, so the
    rule covers the parameters of its sub-modules too."""

    recursive = True
