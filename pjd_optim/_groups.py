"""Parameter-group helpers: which parameters are *considered* (enter the Gramian).

Pure functions over ``param_groups`` (lists of dicts as in ``torch.optim``), so they are testable
alone and work on groups built by any factory (``timm.optim.create_optimizer_v2`` included).
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


def split_considered(
    groups: Sequence[ParamGroup], considered: Sequence[Tensor]
) -> list[ParamGroup]:
    """Split every group into a part outside and a part inside ``considered``.

    Each part keeps every hyper-parameter of its group (lr, weight decay, ``lr_scale``, ...) and
    gets ``"considered": False`` / ``True``; groups already flagged stay considered. Raises
    ``ValueError`` if some considered parameter is in no group.
    """
    wanted = {id(p) for p in considered}
    in_groups = {id(p) for group in groups for p in group["params"]}
    missing = [p for p in considered if id(p) not in in_groups and p.requires_grad]
    if missing:
        raise ValueError(
            f"{len(missing)} parameter(s) given in considered= are not optimized by the base "
            "optimizer. Build the base optimizer over all the model's trainable parameters."
        )
    result: list[ParamGroup] = []
    for group in groups:
        names = group.get("param_names")
        flags = [bool(group.get("considered")) or id(p) in wanted for p in group["params"]]
        for flag in (False, True):
            keep = [i for i, f in enumerate(flags) if f == flag]
            if not keep:
                continue
            part = dict(group, params=[group["params"][i] for i in keep], considered=flag)
            if names is not None:
                part["param_names"] = [names[i] for i in keep]
            result.append(part)
    return result


def considered_parameters(groups: Sequence[ParamGroup]) -> list[nn.Parameter]:
    """Parameters of the groups flagged ``"considered": True``, in group order."""
    return [p for group in groups if group.get("considered") for p in group["params"]]


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
