"""Every use of a considered parameter must be seen by a rule: the checks that refuse the others.

A rule sees a parameter only through the recorded calls of its module (the taps), and only
under the names its maths reads (``GramianRule.parameters``). A use elsewhere would leave its
per-sample gradients out of the Gramian, silently: a penalty on a weight added to the losses, a
head tied by hand (``F.linear(h, emb.weight)``), a module whose hook did not run (code compiled
before the optimizer hooked it), a reparametrised weight. Each such case is refused before
anything changes.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from torch import Tensor, nn

from ._graph import Edge, Node, children, latest_first, leaf, reached_leaves
from ._hooks import HookSet, ModuleCall, is_tap
from .gramian._registry import rule_for

Plan = Mapping[nn.Module, Mapping[str, Tensor]]
Owners = Mapping[int, set[int]]  # id of a considered parameter -> ids of the modules owning it
Context = frozenset[ModuleCall]  # the calls whose regions a path lies in
MAX_CONTEXTS = 64  # distinct contexts kept per node; beyond, their intersection (stricter)
COMPILED = (
    "(Under torch.compile a graph compiled without a module's hook runs without it: compiled "
    "before this optimizer was built, or for another instance of the class that is not "
    "considered, e.g. the other blocks when only the last one is, which dynamo reuses unless "
    "torch._dynamo.config.skip_nnmodule_hook_guards = False is set before compiling.)"
)


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


def refuse_outside_uses(
    losses: Tensor, hooks: HookSet, owners: Owners, names: Mapping[int, str]
) -> None:
    """Refuses losses that reach a considered parameter from a node outside every recorded call
    of a module that owns it (``owners``): a use outside its module's forward, whose per-sample
    gradients no rule sees."""
    if losses.grad_fn is None:
        return
    used = _outside_owners(losses.grad_fn, hooks, owners)
    if used:
        listed = ", ".join(names[id(p)] for p in used[:5])
        raise ValueError(
            f"The losses use {listed} (considered) outside its module's forward, e.g. a "
            "penalty on the weight added to the losses, or a weight tied by hand (h @ "
            "emb.weight.T, F.linear(h, emb.weight)): the per-sample gradients of that use are "
            "not seen by the module hooks, so the Gramian would be wrong. Fixes: add weight "
            "penalties through the optimizer (weight_decay) or in a separate backward; tie "
            "weights by sharing the parameter between modules (head.weight = emb.weight); or "
            f"gramian_mode='autograd' (exact, one backward per loss). {COMPILED} Nothing was "
            "changed."
        )


def _outside_owners(root: Node, hooks: HookSet, owners: Owners) -> list[Tensor]:
    """The considered parameters (``owners``: id → ids of the modules owning it) that some node
    takes outside every recorded call of their owners. Nodes are visited latest first, each with
    the sets of calls whose region (between the call's tap and its inputs) its paths lie in, one
    set per distinct path context (autocast's cached cast of a weight, say, is taken by every
    call of the module). The walk goes on below the considered part, through the whole trunk:
    a parameter used there by hand (a bias added to its module's input) is outside every call
    too (measured: 0.2 ms of a ResNet-18 step, 0.9 ms of a ViT-tiny's)."""
    state: dict[Node, set[Context]] = {}
    heap: list[tuple[int, int, Node]] = []
    exits: dict[int, set[Edge]] = {}
    found: dict[int, Tensor] = {}

    def push(node: Node, contexts: set[Context]) -> None:
        if node in state:
            merged = state[node] | contexts
            if len(merged) > MAX_CONTEXTS:  # (never seen: the calls every path lies in)
                merged = {frozenset.intersection(*merged)}
            state[node] = merged
            return
        state[node] = contexts
        heapq.heappush(heap, (-node._sequence_nr(), len(state), node))

    def inputs_of(call: ModuleCall) -> set[Edge]:
        if id(call) not in exits:
            exits[id(call)] = {(t.grad_fn, t.output_nr) for t in call.sources if t.grad_fn}
        return exits[id(call)]

    push(root, {frozenset()})
    while heap:
        node = heapq.heappop(heap)[2]
        contexts = state.pop(node)
        edges = children(node)
        if is_tap(node) and node.hooks is hooks:  # (its first edge goes to the anchor)
            inner = {context | {node.call} for context in contexts}
            for child, _ in edges[1:]:
                if leaf(child) is None:
                    push(child, inner)
            continue
        for child, nr in edges:
            variable = leaf(child)
            if variable is None:
                kept = {
                    frozenset(c for c in ctx if (child, nr) not in inputs_of(c)) for ctx in contexts
                }
                push(child, kept)
                continue
            mine = owners.get(id(variable))
            if mine is not None and not all(
                any(id(c.module) in mine for c in context) for context in contexts
            ):
                found.setdefault(id(variable), variable)
    return list(found.values())


def refuse_unrecorded_uses(
    losses: Tensor, owners: Owners, reached: set[int], names: Mapping[int, str]
) -> None:
    """Refuses losses that depend on a considered parameter although the passes reached no call
    of a module that owns it (ids of the modules reached: ``reached``; a rare case, so the walk
    of the whole graph is affordable): its hook did not run, e.g. code compiled by
    ``torch.compile`` before the hook existed."""
    silent = {pid for pid, modules in owners.items() if not modules & reached}
    if not silent or losses.grad_fn is None:
        return
    found = reached_leaves((losses.grad_fn, losses.output_nr), silent)
    used = ", ".join(names[id(p)] for p in found[:5])
    if not used and _behind_reentrant(losses.grad_fn):
        raise ValueError(
            "The losses go through a torch.utils.checkpoint with use_reentrant=True, which "
            "runs its function without gradients and hides it from the graph: considered "
            "modules inside it cannot be followed (their calls were not recorded). Use "
            "use_reentrant=False. Nothing was changed."
        )
    if used:
        raise ValueError(
            f"The losses depend on {used} (considered), but no call of its module was "
            "recorded: the parameters are used without calling their module (by hand, or by a "
            "parent's forward, as Hugging Face's MambaMixer uses its conv1d's weight), or the "
            f"module's forward hook did not run. {COMPILED} Fixes: consider other modules (a "
            "parent's own parameters), call the module instead of reading its parameters, or "
            "pass gramian_mode='autograd'. Nothing was changed."
        )


def _behind_reentrant(root: Node) -> bool:
    """Whether the graph below ``root`` holds a reentrant checkpoint's node."""

    def follow(node: Node, _: set[int]) -> list[Edge] | None:
        return None if type(node).__name__ == "CheckpointFunctionBackward" else children(node)

    return not latest_first([(root, 0)], follow)
