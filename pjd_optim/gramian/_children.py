"""Which modules read their children's parameters in their own code.

A parent whose forward passes a child's weight to a function (``F.linear(x, self.qkv.weight)``,
as timm's BEiT and EVA attention, or torchvision's Swin attention, do) uses it outside every
call of the child, where the child's rule cannot see it. A re-run of the parent (the generic
rule) sees every use inside the parent: such a parent's rule covers its children's parameters.
Read from the bytecode of the module's class, ``self.<child>.<parameter>`` not followed by a
metadata attribute (``.dtype``, ``.device``, ...). What this misses (a parameter reached by
``getattr``) stays refused at the step, as any use the rules do not see; what it over-reads
costs a re-run, never exactness.
"""

from __future__ import annotations

import dis
import functools
import inspect
import types

from torch import nn

METADATA = frozenset(
    {"dtype", "device", "shape", "ndim", "is_cuda", "requires_grad", "size", "dim"}
)


def reads_child_parameters(module: nn.Module) -> bool:
    """Whether the code of the module's class reads a direct parameter of one of its children by
    attribute (``self.qkv.weight``)."""
    children = dict(module.named_children())
    if not children:
        return False
    klass: type = type(module)
    for child_name, parameter_name in _attribute_pairs(klass):
        child = children.get(child_name)
        if child is not None and child._parameters.get(parameter_name) is not None:
            return True
    return False


@functools.cache
def _attribute_pairs(klass: type) -> frozenset[tuple[str, str]]:
    """``(a, b)`` for every ``self.a.b`` read in ``klass.forward`` and the methods of ``klass``
    it calls as ``self.<method>`` (transitively, nested functions included), unless a metadata
    attribute follows. Methods defined by ``nn.Module`` itself are not read."""
    pairs: set[tuple[str, str]] = set()
    seen: set[str] = set()
    todo = ["forward"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        owner = next((c for c in klass.__mro__ if name in vars(c)), None)
        if owner is None or owner is nn.Module or not issubclass(owner, nn.Module):
            continue
        function = getattr(vars(owner)[name], "__func__", vars(owner)[name])
        if callable(function):
            function = inspect.unwrap(function)  # (decorated by functools.wraps)
        code = getattr(function, "__code__", None)
        if isinstance(code, types.CodeType):
            todo.extend(_collect(code, pairs))
    return frozenset(pairs)


def _collect(
    code: types.CodeType, pairs: set[tuple[str, str]], self_name: str | None = None
) -> list[str]:
    """Adds ``code``'s ``self.a.b`` reads to ``pairs``; returns the ``self.<name>`` it reads.
    Nested code (closures, comprehensions) reads ``self`` as a free variable."""
    instructions = list(dis.get_instructions(code))
    if self_name is None:
        self_name = code.co_varnames[0] if code.co_argcount else ""
    loads = ("LOAD_DEREF", "LOAD_CLOSURE")
    names: list[str] = []
    for n, ins in enumerate(instructions[:-1]):
        local = ins.opname.startswith("LOAD_FAST") or ins.opname in loads
        if not (local and ins.argval == self_name):
            continue
        first = instructions[n + 1]
        if not _is_attribute(first):
            continue
        names.append(str(first.argval))
        second = instructions[n + 2] if n + 2 < len(instructions) else None
        if second is None or not _is_attribute(second):
            continue
        after = instructions[n + 3] if n + 3 < len(instructions) else None
        if after is not None and _is_attribute(after) and after.argval in METADATA:
            continue
        pairs.add((str(first.argval), str(second.argval)))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_collect(const, pairs, self_name))
    return names


def _is_attribute(ins: dis.Instruction) -> bool:
    return ins.opname in ("LOAD_ATTR", "LOAD_METHOD")
