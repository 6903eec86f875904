"""The plan of a hooked step: which module owns (and whose rule sees) which considered
parameter."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._uses import check_rules_read
from .gramian._registry import rule_for

Plan = dict[nn.Module, dict[str, nn.Parameter]]


def plan_modules(model: nn.Module, considered: Sequence[Tensor]) -> Plan:
    """Which module owns which considered parameter, by local name.

    A module owns its direct parameters, and those of the children its rule covers
    (``GramianRule.covered_children``: all of ``MultiheadAttention``'s; for a module re-run by the
    generic rule, the children whose weights its code reads), their whole subtrees. A parameter
    may have several owners (tied weights), none of them an ancestor of another: a parameter a
    module owns through a covered child is its alone (its re-run sees every use inside it),
    otherwise the innermost keeps it. Raises ``ValueError`` if some considered parameter has no
    owner in ``model``.
    """
    wanted = {id(p) for p in considered}
    plan: Plan = {}
    through_children: dict[nn.Module, set[int]] = {}  # owned through covered children
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        covered = rule_for(module).covered_children(module)
        named = list(module.named_parameters(recurse=False, remove_duplicate=False))
        if covered:  # (tied parameters once: a re-run takes each tensor under one name)
            everything = module.named_parameters(remove_duplicate=True)
            named = [(n, p) for n, p in everything if "." not in n or n.split(".")[0] in covered]
        owned = {name: p for name, p in named if id(p) in wanted}
        if owned:
            plan[module] = owned
            through_children[module] = {id(p) for n, p in owned.items() if "." in n}
        for name, child in module.named_children():
            if name not in covered:
                visit(child)

    visit(model)
    # Owned through a covered child: the module's re-run sees every use inside it, which a
    # descendant's rule would count again.
    for module, ids in through_children.items():
        for below in module.modules():
            if below is not module and below in plan:
                plan[below] = {n: p for n, p in plan[below].items() if id(p) not in ids}
    # A parameter registered in a module and in one of its descendants (Hugging Face's decoder
    # bias, tied to its head's): the innermost owner's rule sees its uses there, which an
    # ancestor's re-run would count again. (A use in the ancestor's own forward lies outside
    # every call of the innermost owner: refused, see _uses.)
    for module in list(plan):
        inner = {
            id(p) for m in module.modules() if m is not module for p in plan.get(m, {}).values()
        }
        kept = {name: p for name, p in plan[module].items() if id(p) not in inner}
        if not kept:
            del plan[module]
        elif len(kept) < len(plan[module]):
            plan[module] = kept
    check_rules_read(plan)
    owned_ids = {id(p) for params in plan.values() for p in params.values()}
    missing = [p for p in considered if id(p) not in owned_ids]
    if missing:
        shapes = ", ".join(str(tuple(p.shape)) for p in missing[:5])
        raise ValueError(
            f"{len(missing)} considered parameter(s) (shapes {shapes}) are not in `model`. Pass "
            "the model that uses them, or consider modules and parameters of that model only."
        )
    return plan
