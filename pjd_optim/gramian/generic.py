"""Generic exact rule: per-sample vector-Jacobian products with ``torch.func``.

For a call ``y = f(θ, x)`` with output gradients ``Gy`` (row ``i`` = ∂loss_i/∂y_i), the per-sample
gradient is ``P[i] = vjp(θ ↦ f(θ, x_i), Gy_i)``, vmapped over samples; calls of the same module are
summed. Exact for any module whose samples are independent along the batch dim.

The rule re-runs the module, so it checks that the re-run is the forward that happened: the
per-sample outputs must equal the recorded ones, and the per-sample gradients must sum to one VJP
of the module re-run on the whole batch (values alone miss a misreading behind a parameter at
zero). That catches an input taken for per-sample that is shared (a table whose first dim happens
to equal the batch size: the rule then tries it as shared), samples that are not independent
inside the module, and stale or changed state. Random operations (dropout in train mode) cannot
be replayed with the forward's masks and are refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._children import children_used_outside_calls
from ._registry import (
    Call,
    GramianRule,
    register_gramian_rule,
    summed_over_calls,
    under_autocast,
)
from ._sharded import call_forward, replay_parameters
from .norm import couples_batch

# Relative agreement required between the re-run and the recorded outputs, by the outputs' dtype
# (batched and per-sample kernels round differently; under autocast the forward ran in 16 bits).
REPLAY_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}
LOW_PRECISION_TOLERANCE = 5e-2
# A module whose re-run vmap cannot batch (an operation without a batching rule for its inputs)
# is re-run one sample at a time, up to this many rows (beyond, refused: a loop of that length).
LOOP_MAX_ROWS = 512


class ReplayMismatch(ValueError):
    """The re-run of a module per sample does not give the outputs its forward gave."""


def per_sample_vjp(
    module: nn.Module,
    call: Call,
    params: Mapping[str, nn.Parameter],
    replay: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """``{name: P}``, ``P[i]`` the gradient of ``call``'s objective ``i`` w.r.t. ``params``.

    The per-sample inputs (``call.per_sample()``) are vmapped; each sample is put back at the
    batch dim the module expects (``call.sample_dims``), and the outputs are checked against
    ``call.outputs`` when recorded. ``replay``: ``replay_parameters(module, params)`` when
    already gathered (FSDP2-sharded parameters are gathered once per module, not per call)."""
    leaves, spec = tree_flatten((call.args, dict(call.kwargs)))
    flags = iter(call.per_sample())
    dims = iter(call.sample_dims or ())
    batched: list[int | None] = []  # per leaf: where the sample goes back (None: not vmapped)
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            dim = next(dims, 0)
            batched.append((dim or 0) if next(flags) else None)
        else:
            batched.append(None)
    samples = [x for x, d in zip(leaves, batched, strict=True) if d is not None]
    out_dims = call.output_dims or (0,) * len(call.output_grads)
    values, constants = replay if replay is not None else replay_parameters(module, params)

    def inputs_of(xs: list[Tensor]) -> Any:
        """The call's ``(args, kwargs)`` with one sample of each per-sample input."""
        it = iter(xs)
        filled = [
            x if d is None else next(it).unsqueeze(d) for x, d in zip(leaves, batched, strict=True)
        ]
        return tree_unflatten(filled, spec)

    def one_sample(theta: dict[str, Tensor], xs: list[Tensor], gys: tuple[Tensor, ...]) -> Any:
        args, kwargs = inputs_of(xs)
        forward = _forward(module, call, constants, args, kwargs)
        outputs, pullback = vjp(forward, theta)[:2]
        cotangents = tuple(g.unsqueeze(d) for g, d in zip(gys, out_dims, strict=True))
        squeezed = tuple(y.squeeze(d) for y, d in zip(outputs, out_dims, strict=True))
        return pullback(cotangents)[0], squeezed

    def looped() -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        """The same, one sample at a time with plain autograd (where vmap cannot run)."""
        per_sample: list[dict[str, Tensor]] = []
        outs: list[tuple[Tensor, ...]] = []
        buffers = _copies(module, constants)
        for i in range(call.rows):
            args, kwargs = inputs_of([x[i] for x in samples])
            gys = tuple(g[i].unsqueeze(d) for g, d in zip(call.output_grads, out_dims, strict=True))
            ys, grads = _plain_vjp(_forward(module, call, buffers, args, kwargs), values, gys)
            per_sample.append(grads)
            outs.append(tuple(y.squeeze(d) for y, d in zip(ys, out_dims, strict=True)))
        stacked = {name: torch.stack([g[name] for g in per_sample]) for name in values}
        return stacked, tuple(map(torch.stack, zip(*outs, strict=True)))

    try:
        with under_autocast(call):
            grads, outputs = vmap(one_sample, in_dims=(None, 0, 0), randomness="error")(
                dict(values), samples, call.output_grads
            )
    except Exception as error:  # (a re-run reading batch-wide data per sample: any error)
        if isinstance(error, RuntimeError) and "random" in str(error):
            raise ValueError(
                f"{type(module).__name__} draws random numbers in its forward (dropout in train "
                "mode?), so its per-sample gradients cannot be recomputed with this forward's "
                "masks. Put it in eval mode or set its dropout to 0 while considered, consider "
                "other modules, or pass gramian_mode='autograd'. Nothing was changed."
            ) from error
        if call.rows > LOOP_MAX_ROWS or not values:
            raise ReplayMismatch(f"its re-run per sample failed ({error})") from error
        try:  # (an operation vmap cannot batch: mixed dtypes in batch_norm under autocast, ...)
            with under_autocast(call):
                grads, outputs = looped()
        except Exception:
            raise ReplayMismatch(f"its re-run per sample failed ({error})") from error
    for recorded, replayed in zip(call.outputs, outputs, strict=False):
        _check_replay(recorded, replayed, call.precision or recorded.dtype)
    with under_autocast(call):
        _check_summed(module, call, (leaves, spec, batched), (values, constants), grads)
    result: dict[str, Tensor] = grads
    return result


def _check_summed(
    module: nn.Module,
    call: Call,
    flat: tuple[list[Any], Any, list[int | None]],
    replay: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    grads: Mapping[str, Tensor],
) -> None:
    """``Σ_i P[i]`` against one VJP of the module re-run on the whole batch: equal when the
    samples are independent and the per-sample inputs are read right. The outputs' check alone
    misses a misreading whose effect on the values vanishes while its gradient does not (a
    shared input or a batch mean behind a parameter initialised at zero: ReZero, LayerScale)."""
    leaves, spec, batched = flat
    values, constants = replay
    filled = [x if d is None else x.movedim(0, d) for x, d in zip(leaves, batched, strict=True)]
    args, kwargs = tree_unflatten(filled, spec)
    out_dims = call.output_dims or (0,) * len(call.output_grads)
    cotangents = tuple(g.movedim(0, d) for g, d in zip(call.output_grads, out_dims, strict=True))
    forward = _forward(module, call, _copies(module, constants), args, kwargs)
    whole = _plain_vjp(forward, values, cotangents)[1]
    tolerance = _tolerance(call.precision or torch.float64, *(g.dtype for g in grads.values()))
    for name, per_sample in grads.items():
        summed, expected = per_sample.sum(dim=0).double(), whole[name].double()
        scale = torch.maximum(summed.abs().amax(), expected.abs().amax()).clamp_min(1e-30)
        if not bool((summed - expected).abs().amax() <= tolerance * scale):
            raise ReplayMismatch(
                f"its per-sample gradients of {name} do not sum to the gradient of its re-run on "
                "the whole batch (an input read per sample that is shared, or samples that are "
                "not independent)"
            )


def _forward(
    module: nn.Module,
    call: Call,
    constants: Mapping[str, Tensor],
    args: Any,
    kwargs: Any,
) -> Callable[[dict[str, Tensor]], tuple[Tensor, ...]]:
    """``θ ↦`` the call's tapped outputs of the module run on ``args``, ``kwargs``."""

    def forward(theta: dict[str, Tensor]) -> tuple[Tensor, ...]:
        tensors = {**constants, **theta}
        out = tree_flatten(call_forward(module, tensors, tuple(args), kwargs))[0]
        return tuple(out[k] for k in call.output_positions)

    return forward


def _plain_vjp(
    forward: Callable[[dict[str, Tensor]], tuple[Tensor, ...]],
    values: Mapping[str, Tensor],
    cotangents: tuple[Tensor, ...],
) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """``forward``'s outputs (detached) and their VJP with ``cotangents`` w.r.t. ``values`` (zero
    where unused), by plain autograd: any module the forward ran, ``vmap``-able or not."""
    theta = {name: v.detach().requires_grad_() for name, v in values.items()}
    with torch.enable_grad():
        outputs = forward(theta)
        grads = torch.autograd.grad(
            outputs, list(theta.values()), cotangents, materialize_grads=True
        )
    return tuple(y.detach() for y in outputs), dict(zip(theta, grads, strict=True))


def _copies(module: nn.Module, constants: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``constants`` and the module's buffers, copied: the in-place edits of a re-run outside
    ``vmap`` (a call counter, a running mean) stay in the copies, not in the model."""
    buffers = module.named_buffers(remove_duplicate=False)
    return {name: t.detach().clone() for name, t in [*buffers, *constants.items()]}


def _tolerance(*dtypes: torch.dtype) -> float:
    """The relative agreement required of a re-run, by the least precise of ``dtypes``."""
    lowest = min(dtypes, key=lambda d: -torch.finfo(d).eps)
    return REPLAY_TOLERANCE.get(lowest, LOW_PRECISION_TOLERANCE)


def _check_replay(recorded: Tensor, replayed: Tensor, precision: torch.dtype) -> None:
    if recorded.shape != replayed.shape:
        raise ReplayMismatch(f"its re-run gave outputs {tuple(replayed.shape)}")
    tolerance = _tolerance(precision, recorded.dtype)
    scale = recorded.abs().amax().double().clamp_min(1e-30)
    error = (replayed.to(recorded.dtype) - recorded).abs().amax().double()
    if not bool(error <= tolerance * scale):
        raise ReplayMismatch("its re-run per sample does not reproduce its outputs")


def shared_alternatives(call: Call) -> list[Call]:
    """``call`` as given, then with every per-sample input but the first taken as shared (a
    table or mask whose first dim happens to equal the batch size)."""
    flags = call.per_sample()
    if sum(flags) < 2:
        return [call]
    first = flags.index(True)
    dims = call.sample_dims or tuple(0 if f else None for f in flags)
    only_first = tuple(d if n == first else None for n, d in enumerate(dims))
    return [call, replace(call, sample_dims=only_first)]


@register_gramian_rule(nn.Module)
class GenericRule(GramianRule):
    """Any module: per-sample gradients by vmapped ``torch.func.vjp``, summed over calls."""

    needs_outputs = True
    calls_hooks = True

    def covered_children(self, module: nn.Module) -> frozenset[str]:
        """Also the children whose parameters the module's code uses outside their calls
        (``F.linear(x, self.qkv.weight)``, ``self.rel_pos.get_bias()``): the re-run sees those
        uses, which the child's rule cannot. (The other children keep their own rules.)"""
        return super().covered_children(module) | children_used_outside_calls(module)

    def couples_batch(self, module: nn.Module) -> bool | None:
        """A BatchNorm subclass with a forward of its own (timm's ``BatchNormAct2d``) couples
        the batch as BatchNorm does."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return couples_batch(module)
        return None

    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        replay = replay_parameters(module, params)  # (gathered once: a collective if sharded)
        return summed_over_calls(calls, lambda call: self._checked(module, call, params, replay))

    def _checked(
        self,
        module: nn.Module,
        call: Call,
        params: Mapping[str, nn.Parameter],
        replay: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    ) -> dict[str, Tensor]:
        """The per-sample gradients of the first reading of ``call``'s inputs whose re-run
        reproduces the forward; a clear error if none does. The re-run calls the module with
        its hooks, as the forward did (:func:`pjd_optim.replaying` is true meanwhile)."""
        mismatch: ReplayMismatch | None = None
        for candidate in shared_alternatives(call):
            try:
                return per_sample_vjp(module, candidate, params, replay)
            except ReplayMismatch as error:
                mismatch = error
        raise ValueError(
            f"{type(module).__name__} cannot be re-run per sample: {mismatch}. Its per-sample "
            "gradients need a forward whose samples are independent along the batch dim and "
            "whose inputs are either per-sample or shared by all samples. Register a rule that "
            "says which inputs are per-sample (GramianRule.sample_dims), consider other modules, "
            "or pass gramian_mode='autograd'. Nothing was changed."
        ) from mismatch


@register_gramian_rule(nn.MultiheadAttention)
class AttentionRule(GenericRule):
    """``MultiheadAttention`` uses ``out_proj``'s parameters without calling ``out_proj``, so the
    rule covers the parameters of its sub-modules too. The batch is on dim 1 of the query, key,
    value and attention output unless ``batch_first``; ``key_padding_mask`` is per sample and
    ``attn_mask`` shared (a per-sample ``[B·heads, L, S]`` mask is refused by the replay check)."""

    recursive = True

    def batch_dims(self, module: nn.Module) -> tuple[Sequence[int], Sequence[int]]:
        batch = 0 if getattr(module, "batch_first", False) else 1
        return (batch,), (batch, 0)

    def sample_dims(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], rows: int
    ) -> tuple[tuple[int | None, ...], tuple[int, ...]]:
        batch = 0 if getattr(module, "batch_first", False) else 1
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        names = dict(bound.arguments)
        positional = list(bound.arguments)[: len(args)]
        order = [*positional, *kwargs]  # the order of the flattened (args, kwargs)
        dims: list[int | None] = []
        for name in order:
            value = names.get(name)
            if not isinstance(value, Tensor):
                continue
            if name in ("query", "key", "value"):
                dims.append(batch if value.ndim == 3 else None)
            elif name == "key_padding_mask":
                dims.append(0 if value.ndim == 2 else None)
            else:
                dims.append(None)
        return tuple(dims), (batch, 0)


@register_gramian_rule(nn.RNNCell, nn.GRUCell, nn.LSTMCell)
class CellRule(GenericRule):
    """Recurrent cells: a call without a state (``hx=None``, the first step of a loop) is re-run
    with the zeros the cell starts from, given as per-sample inputs (a state the cell makes
    inside the per-sample re-run has no batch dim)."""

    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        return super().per_sample_grads(module, [_with_state(module, c) for c in calls], params)


def _with_state(module: nn.Module, call: Call) -> Call:
    """``call`` with its missing state made explicit: zeros ``[rows, hidden]`` (two for LSTM)."""
    x = call.args[0] if call.args else None
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    if hx is not None or not isinstance(x, Tensor) or x.ndim != 2:
        return call
    zeros = x.new_zeros(x.shape[0], getattr(module, "hidden_size", 0))
    state: Tensor | tuple[Tensor, Tensor] = zeros
    if isinstance(module, nn.LSTMCell):
        state = (zeros, zeros.clone())
    kwargs = {k: v for k, v in call.kwargs.items() if k != "hx"}
    added = (0,) * (2 if isinstance(state, tuple) else 1)
    dims = (call.sample_dims[0], *added, *call.sample_dims[1:]) if call.sample_dims else ()
    return replace(call, args=(x, state), kwargs=kwargs, sample_dims=dims)
