"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): per-sample gradients through time.

The batch sits on dim 1 of the hidden states (and of the sequences unless ``batch_first``):
:meth:`RecurrentRule.batch_dims` says so, and the engine hands the rule batch-major calls.
torch's fused recurrent kernels do not run under ``torch.func.vmap``, so the rule re-runs the
layer on one sample with the same equations written with plain tensor operations (multi-layer,
bidirectional, LSTM projections), and takes the per-sample vector-Jacobian product of the module's
outputs (``output``, ``h_n``, and ``c_n``) with their gradients, vmapped over the batch:

    RNN:  h' = act(W_ih x + b_ih + W_hh h + b_hh)
    GRU:  r, z = σ(·), n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),  h' = (1 − z) ⊙ n + z ⊙ h
    LSTM: i, f, o = σ(·), g = tanh(·),  c' = f ⊙ c + i ⊙ g,  h' = W_hr (o ⊙ tanh c')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from ._registry import Call, GramianRule, register_gramian_rule, summed_over_calls, under_autocast
from ._sharded import replay_parameters


@register_gramian_rule(nn.RNN, nn.LSTM, nn.GRU)
class RecurrentRule(GramianRule):
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` on batched, unpacked sequences."""

    def batch_dims(self, module: nn.Module) -> tuple[Sequence[int], Sequence[int]]:
        assert isinstance(module, nn.RNNBase)
        batch = 0 if module.batch_first else 1
        return (batch, 1), (batch, 1)

    def sample_dims(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], rows: int
    ) -> tuple[tuple[int | None, ...], tuple[int, ...]]:
        if args and isinstance(args[0], nn.utils.rnn.PackedSequence):
            raise ValueError(
                f"A considered {type(module).__name__} received a PackedSequence, whose rows are "
                "time steps of several samples, not samples: pass padded sequences [B, T, E] "
                "(the losses may mask the padding), consider other modules, or pass "
                "gramian_mode='autograd'. Nothing was changed."
            )
        return super().sample_dims(module, args, kwargs, rows)

    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        assert isinstance(module, nn.RNNBase)
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise ValueError(
                f"{type(module).__name__} with dropout={module.dropout} in train mode is random: "
                "its per-sample gradients cannot be recomputed. Use dropout=0 (or eval mode)."
            )
        replay = replay_parameters(module, params)  # (gathered once: a collective if sharded)
        return summed_over_calls(calls, lambda call: _per_sample(module, call, replay))


def _per_sample(
    module: nn.RNNBase, call: Call, replay: tuple[dict[str, Tensor], dict[str, Tensor]]
) -> dict[str, Tensor]:
    x = call.args[0]
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(
            f"{type(module).__name__} received an unbatched or packed input; partial JD needs "
            "batched, padded sequences."
        )
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    states = [] if hx is None else [hx] if isinstance(hx, Tensor) else list(hx)
    values, constants = replay
    n_states = len(states)

    def one_sample(theta: dict[str, Tensor], xs: list[Tensor], gys: tuple[Tensor, ...]) -> Any:
        def forward(theta: dict[str, Tensor]) -> tuple[Tensor, ...]:
            outs = run(
                module, _weights(module, {**constants, **theta}), xs[0], xs[1:] if n_states else []
            )
            return tuple(outs[k] for k in call.output_positions)

        return vjp(forward, theta)[1](gys)[0]

    with under_autocast(call):
        grads: dict[str, Tensor] = vmap(one_sample, in_dims=(None, 0, 0))(
            values, [x, *states], call.output_grads
        )
    return grads


def _weights(module: nn.RNNBase, theta: Mapping[str, Tensor]) -> Callable[[str], Tensor | None]:
    def weight(name: str) -> Tensor | None:
        if name in theta:
            return theta[name]
        value = getattr(module, name, None)
        return None if value is None else value.detach()

    return weight


def run(
    module: nn.RNNBase, weight: Callable[[str], Tensor | None], x: Tensor, states: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    """``module``'s forward on one unbatched sequence ``x`` ``[T, input]`` from the initial
    ``states`` (``h_0``, and ``c_0`` for an LSTM; zeros if absent): its flattened outputs."""
    layers, directions = module.num_layers, 2 if module.bidirectional else 1
    hidden = module.hidden_size
    size = module.proj_size if isinstance(module, nn.LSTM) and module.proj_size > 0 else hidden
    lstm = isinstance(module, nn.LSTM)
    h0 = states[0] if states else x.new_zeros(layers * directions, size)
    c0 = states[1] if lstm and len(states) > 1 else x.new_zeros(layers * directions, hidden)
    h_n, c_n = [], []
    for layer in range(layers):
        outs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w = {n: weight(n + suffix) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            projection = weight("weight_hr" + suffix) if lstm and size != hidden else None
            h, c = h0[layer * directions + direction], c0[layer * directions + direction]
            sequence = x.flip(0) if direction else x
            steps = []
            for t in range(sequence.shape[0]):
                h, c = _cell(module.mode, sequence[t], h, c, w, projection)
                steps.append(h)
            out = torch.stack(steps)
            outs.append(out.flip(0) if direction else out)
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, dim=-1)
    if lstm:
        return x, torch.stack(h_n), torch.stack(c_n)
    return x, torch.stack(h_n)


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    assert weight is not None
    out = x @ weight.T
    return out if bias is None else out + bias


def _cell(
    mode: str,
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w: Mapping[str, Tensor | None],
    projection: Tensor | None,
) -> tuple[Tensor, Tensor]:
    gi = _affine(x, w["weight_ih"], w["bias_ih"])
    gh = _affine(h, w["weight_hh"], w["bias_hh"])
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, c
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if projection is None else h @ projection.T), c
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(gi + gh), c
