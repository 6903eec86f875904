"""Which modules use their children's parameters outside the children's calls.

A parent whose forward passes a child's weight to a function (``F.linear(x, self.qkv.weight)``,
as timm's BEiT and EVA attention, or torchvision's Swin attention, do), or calls a child's
method other than its forward (``self.rel_pos.get_bias()``, timm's MaxViT), uses the child's
parameters outside every call of the child, where the child's rule cannot see them. A re-run of
the parent (the generic rule) sees every use inside the parent: such a parent's rule covers its
children's parameters. Read from the bytecode of the module's class: ``self.<child>.<name>``
not followed by a metadata attribute (``.dtype``, ``.device``, ...). What this misses (a
parameter reached by ``getattr``) stays refused at the step, as any use the rules do not see;
what it over-reads costs a re-run, never exactness.
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


def children_used_outside_calls(module: nn.Module) -> frozenset[str]:
    """The children of ``module`` whose direct parameters its class's code reads
    (``self.qkv.weight``; only where the module has parameters of its own, as a container reading
    a child's weight for a check would re-run all of it for nothing), or whose methods other than
    ``forward`` that read their parameters it calls (``self.rel_pos.get_bias()``)."""
    children = dict(module.named_children())
    if not children:
        return frozenset()
    own = any(p is not None for p in module._parameters.values())
    klass: type = type(module)
    used: set[str] = set()
    for child_name, attribute in _reads(klass, "forward")[1]:
        child = children.get(child_name)
        if child is None:
            continue
        if own and child._parameters.get(attribute) is not None:
            used.add(child_name)
            continue
        child_class: type = type(child)
        if attribute != "forward" and _method(child_class, attribute) is not None:
            names = _reads(child_class, attribute)[0]
            if any(child._parameters.get(name) is not None for name in names):
                used.add(child_name)
    return frozenset(used)


def _method(klass: type, name: str) -> types.CodeType | None:
    """The code of ``klass.<name>`` where a class of its MRO below ``nn.Module`` defines it as a
    function (unwrapping ``functools.wraps`` decorators)."""
    for base in klass.__mro__:
        if base is nn.Module or not issubclass(base, nn.Module):
            return None
        if name in vars(base):
            function = getattr(vars(base)[name], "__func__", vars(base)[name])
            if callable(function):
                function = inspect.unwrap(function)
            code = getattr(function, "__code__", None)
            return code if isinstance(code, types.CodeType) else None
    return None


@functools.cache
def _reads(klass: type, start: str) -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
    """``self.<a>`` and ``self.<a>.<b>`` read in ``klass.<start>`` and in the methods of
    ``klass`` it calls (transitively, nested functions included), unless a metadata attribute
    follows the pair."""
    names: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        code = None if name in seen else _method(klass, name)
        seen.add(name)
        if code is not None:
            read = _collect(code, pairs)
            names.update(read)
            todo.extend(read)
    return frozenset(names), frozenset(pairs)


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
