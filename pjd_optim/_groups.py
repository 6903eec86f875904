"""Parameter-group helpers: which parameters are *considered* (enter the Gramian).

Pure functions over ``param_groups`` (lists of dicts as in ``torch.optim``), so they are testable
alone and work on groups built by any factory (``timm.optim.create_optimizer_v2`` included). The
wrapper never rewrites the base optimizer's groups: it keeps the considered parameters beside them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

ParamGroup = dict[str, Any]


def parameters_of(items: Iterable[nn.Module | Tensor] | nn.Module | Tensor) -> list[Tensor]:
    """The parameters named by ``items`` (modules contribute all their parameters), deduplicated."""
    if isinstance(items, (nn.Module, Tensor)):
        items = [items]
    out: dict[int, Tensor] = {}
    for item in items:
        if isinstance(item, nn.Module):
            out.update((id(p), p) for p in item.parameters())
        elif isinstance(item, Tensor):
            out[id(item)] = item
        else:
            raise TypeError(
                f"considered= takes modules or parameters, got {type(item).__name__}. "
                "Example: considered=[model.head, model.blocks[-1]]."
            )
    return list(out.values())


def flagged_parameters(groups: Sequence[ParamGroup]) -> list[Tensor]:
    """Parameters of the groups flagged ``"considered": True``, in group order."""
    return [p for group in groups if group.get("considered") for p in group["params"]]


def considered_of(
    groups: Sequence[ParamGroup], considered: Iterable[nn.Module | Tensor] | nn.Module | Tensor
) -> list[Tensor]:
    """The considered parameters: those of flagged groups, then those named by ``considered``
    (deduplicated, in that order)."""
    out = {id(p): p for p in flagged_parameters(groups)}
    out.update((id(p), p) for p in parameters_of(considered))
    return list(out.values())


def check_optimized(groups: Sequence[ParamGroup], considered: Sequence[Tensor]) -> None:
    """``ValueError`` if a trainable considered parameter is in no group."""
    in_groups = {id(p) for group in groups for p in group["params"]}
    missing = [p for p in considered if id(p) not in in_groups and p.requires_grad]
    if missing:
        raise ValueError(
            f"{len(missing)} considered parameter(s) are not optimized by the base optimizer. "
            "Build the base optimizer over all the model's trainable parameters."
        )


def check_disjoint(groups: Sequence[ParamGroup]) -> None:
    """``ValueError`` if a parameter appears in two groups (its update would be applied twice)."""
    seen: set[int] = set()
    for group in groups:
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(
                    f"A parameter of shape {tuple(p.shape)} is in two parameter groups; each "
                    "parameter must be in exactly one group."
                )
            seen.add(id(p))


def considered_names(model: nn.Module, considered: list[Tensor]) -> list[str]:
    """The considered parameters as the model's names: a module whose parameters are all
    considered by its name (``blocks.11``), others parameter by parameter."""
    ids = {id(p) for p in considered}
    names: list[str] = []
    covered: set[int] = set()
    for name, module in model.named_modules():
        params = list(module.parameters())
        if params and all(id(p) in ids for p in params) and not covered >= {id(p) for p in params}:
            names.append(name or type(module).__name__)
            covered.update(id(p) for p in params)
    for name, p in model.named_parameters():
        if id(p) in ids and id(p) not in covered:
            names.append(name)
            covered.add(id(p))
    return names
