"""Re-running a module whose parameters FSDP2 (``fully_shard``) shards as ``DTensor``s.

Rules that re-run a module (the generic and recurrent rules) need its parameters whole. Between
forwards FSDP2 keeps each rank's shard only (a ``DTensor``); :func:`replay_parameters` gathers
the parameters of *that one module* (``DTensor.full_tensor()``, an all-gather every rank joins:
rules run in the same order on every rank), cast to the dtype FSDP2 ran its forward in
(``MixedPrecisionPolicy.param_dtype``), so that the re-run is the forward that happened.
:func:`call_forward` then runs ``module.forward`` under those tensors without the module's forward
hooks: FSDP2's hooks would all-gather (and reshard) inside ``vmap``.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module


def _first_found(modules: tuple[str, ...], name: str) -> Any:
    """``name`` from the first of ``modules`` that defines it (torch moved FSDP2 and ``DTensor``
    out of private modules in 2.5 and 2.6), or ``None`` (a torch built without distributed)."""
    for module in modules:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    return None


DTensor = _first_found(("torch.distributed.tensor", "torch.distributed._tensor"), "DTensor")
_FSDP_STATE = (
    "torch.distributed.fsdp._fully_shard._fsdp_state",
    "torch.distributed._composable.fsdp._fsdp_state",
)


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2-sharded parameter, say)."""
    return DTensor is not None and isinstance(t, DTensor)


def sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` (its children's included) is a ``DTensor``."""
    return any(is_sharded(p) for p in module.parameters())


def replay_parameters(
    module: nn.Module, params: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(considered, others)``: detached whole tensors for ``params`` (named as in ``module``)
    and for every other parameter and buffer of ``module`` (children's included), gathered from
    their shards where they are ``DTensor``s and cast to the dtype FSDP2's forward used. For a
    module without sharded parameters: ``params`` detached, and no others (``functional_call``
    takes the module's own)."""
    if not sharded(module):
        return {name: p.detach() for name, p in params.items()}, {}
    dtypes = _forward_dtypes()
    current = dict(module.named_parameters(remove_duplicate=False))

    def whole(name: str, t: Tensor) -> Tensor:
        t = current.get(name, t).detach()  # FSDP2 without resharding: the unsharded tensor
        if DTensor is not None and isinstance(t, DTensor):
            dtype = dtypes.get(id(current.get(name)), t.dtype)
            t = t.full_tensor().to(dtype)
        return t

    considered = {name: whole(name, p) for name, p in params.items()}
    others = {n: whole(n, p) for n, p in current.items() if n not in considered}
    others.update((n, b.detach()) for n, b in module.named_buffers(remove_duplicate=False))
    return considered, others


def call_forward(
    module: nn.Module, tensors: Mapping[str, Tensor], args: tuple[Any, ...], kw: Mapping[str, Any]
) -> Any:
    """``module(*args, **kw)`` with its parameters and buffers replaced by ``tensors``; for a
    module with sharded parameters, its ``forward`` alone (no FSDP2 hooks: no collectives)."""
    if not sharded(module):
        return torch.func.functional_call(module, dict(tensors), args, dict(kw))
    # (sharded: every parameter and buffer is in ``tensors``, see replay_parameters)
    with _reparametrize_module(module, dict(tensors)):
        return module.forward(*args, **kw)


def _forward_dtypes() -> dict[int, torch.dtype]:
    """``{id(sharded parameter): dtype of its forward}`` over the live FSDP2 states."""
    mapping = _first_found(("torch.distributed._composable_state",), "_module_state_mapping")
    FSDPState = _first_found(_FSDP_STATE, "FSDPState")
    if mapping is None or FSDPState is None:  # another torch layout: the parameters' own dtype
        return {}
    dtypes: dict[int, torch.dtype] = {}
    for entry in list(mapping.values()):
        state = entry() if isinstance(entry, weakref.ReferenceType) else entry
        group = state._fsdp_param_group if isinstance(state, FSDPState) else None
        for fsdp_param in group.fsdp_params if group is not None else ():
            dtype = getattr(fsdp_param, "param_dtype", None)  # (set at FSDP2's first forward)
            if dtype is not None:
                dtypes[id(fsdp_param.sharded_param)] = dtype
    return dtypes
