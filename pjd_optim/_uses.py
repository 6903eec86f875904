"""Every use of a considered parameter must be seen by a rule: the checks that refuse the others.

A rule sees a parameter only through the recorded calls of its module (the taps), and only
under the names its maths reads (``GramianRule.parameters``). A use elsewhere would leave its
per-sample gradients out of the Gramian, silently: a penalty on a weight added to the losses, a
head tied by hand (``F.linear(h, emb.weight)``), a module whose hook did not run (code compiled
before the optimizer hooked it), a reparametrised weight. Each such case is refused before
anything changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from ._graph import reached_without
from ._hooks import HookSet, is_tap
from .gramian._registry import rule_for

Plan = Mapping[nn.Module, Mapping[str, Tensor]]


def check_rules_read(plan: Plan) -> None:
    """When the optimizer is built: refuses considered parameters that their module's rule does
    not read (under ``torch.nn.utils.parametrize``, or named otherwise than its maths)."""
    for module, owned in plan.items():
        if isinstance(module, nn.utils.parametrize.ParametrizationList):
            raise ValueError(
                f"Considered parameters {sorted(owned)} are under torch.nn.utils.parametrize "
                "(e.g. parametrizations.weight_norm, spectral_norm): the weight is computed from "
                "them once per forward, outside the layer's per-sample calls. Consider the "
                "layer's other parameters, remove the parametrization, or pass "
                "gramian_mode='autograd'."
            )
        known = rule_for(module).parameters
        unread = sorted(set(owned) - known) if known is not None else []
        if unread:
            raise ValueError(
                f"{type(module).__name__} has considered parameters {unread} that its Gramian "
                f"rule does not read (it reads {sorted(known or ())}): e.g. weight_g and weight_v "
                "of torch.nn.utils.weight_norm, whose weight is rebuilt outside the module's "
                "forward. Consider the module's other parameters only, remove the "
                "reparametrisation, or pass gramian_mode='autograd'."
            )


def refuse_outside_uses(losses: Tensor, hooks: HookSet, names: Mapping[int, str]) -> None:
    """Refuses losses that reach a considered parameter (ids: ``names``) along a path through no
    tap: a use outside its module's forward, whose per-sample gradients no rule sees."""
    used = _reached(losses, lambda node: is_tap(node) and node.hooks is hooks, set(names), names)
    if used:
        raise ValueError(
            f"The losses use {used} (considered) outside its module's forward, e.g. a "
            "penalty on the weight added to the losses, or a weight tied by hand (h @ "
            "emb.weight.T, F.linear(h, emb.weight)): the per-sample gradients of that use are "
            "not seen by the module hooks, so the Gramian would be wrong. Fixes: add weight "
            "penalties through the optimizer (weight_decay) or in a separate backward; tie "
            "weights by sharing the parameter between modules (head.weight = emb.weight); or "
            "gramian_mode='autograd' (exact, one backward per loss). (Under torch.compile: "
            "build this optimizer before the first compiled forward, or the compiled code "
            "runs without its hooks.) Nothing was changed."
        )


def refuse_unrecorded_uses(
    losses: Tensor, plan: Plan, reached: set[int], names: Mapping[int, str]
) -> None:
    """Refuses losses that depend on a considered module's parameters although the passes
    reached none of its calls (ids of the modules reached: ``reached``; a rare case, so the walk
    of the whole graph is affordable): its hook did not run, e.g. code compiled by
    ``torch.compile`` before the hook existed."""
    recorded = {id(p) for m, own in plan.items() if id(m) in reached for p in own.values()}
    silent = {id(p) for own in plan.values() for p in own.values()} - recorded
    used = _reached(losses, lambda node: False, silent, names)
    if used:
        raise ValueError(
            f"The losses depend on {used} (considered), but no call of its module was "
            "recorded: its forward hook did not run. Under torch.compile, code compiled "
            "before this optimizer hooked the module (for the model, or another instance of "
            "its class, with other considered modules) runs without the hook: build the "
            "optimizer before the first compiled forward, and one optimizer per compiled "
            "model; else the parameters are used without calling the module (see "
            "gramian_mode='autograd'). Nothing was changed."
        )


def _reached(
    losses: Tensor, stop: Callable[[Any], bool], wanted: set[int], names: Mapping[int, str]
) -> str:
    """The names of the parameters (ids in ``wanted``) the losses reach along paths through no
    node where ``stop`` holds (``""``: none)."""
    if losses.grad_fn is None or not wanted:
        return ""
    used = reached_without((losses.grad_fn, losses.output_nr), stop, wanted)
    return ", ".join(names[id(p)] for p in used[:5])
