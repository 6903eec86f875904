"""Walks of the autograd graph: the one module that reads autograd nodes.

Nodes are visited latest created first (by sequence number, counted per thread), so a node is
visited after every node with an edge into it: all the ways it was reached are known then.
Leaves (``AccumulateGrad`` nodes of parameters) are never visited; callers see them among a
node's children (:func:`leaf`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

Node = Any  # torch.autograd.graph.Node (its Python type is not exported with a stable name)
Edge = tuple[Node, int]  # (node, output number)


def children(node: Node) -> list[Edge]:
    """The edges out of ``node`` (towards the inputs), without the undefined ones."""
    return [(child, nr) for child, nr in node.next_functions if child is not None]


def leaf(node: Node) -> Tensor | None:
    """The tensor a leaf node accumulates into, or ``None`` for any other node."""
    variable: Tensor | None = getattr(node, "variable", None)
    return variable


def latest_first(
    roots: Iterable[Edge], follow: Callable[[Node, set[int]], Iterable[Edge] | None]
) -> bool:
    """Visit the non-leaf nodes reachable from ``roots``, each once, latest created first.
    ``follow(node, numbers)`` gets the output numbers of the edges that reached ``node`` and
    returns the edges to go on along (none: stop there), or ``None`` to end the walk, which then
    returns ``False`` (``True`` when it went through)."""
    reached: dict[Node, set[int]] = {}
    heap: list[tuple[int, int, Node]] = []

    def push(edges: Iterable[Edge]) -> None:
        for node, nr in edges:
            if leaf(node) is not None:
                continue
            if node not in reached:
                reached[node] = set()
                heapq.heappush(heap, (-node._sequence_nr(), len(reached), node))
            reached[node].add(nr)

    push(roots)
    while heap:
        node = heapq.heappop(heap)[2]
        edges = follow(node, reached[node])
        if edges is None:
            return False
        push(edges)
    return True


def independent(nodes: set[Node]) -> bool:
    """Whether no node of ``nodes`` is reachable from another. Walks only nodes created after
    the earliest of them."""
    if len(nodes) < 2:
        return True
    floor = min(node._sequence_nr() for node in nodes)

    def follow(node: Node, _: set[int]) -> list[Edge] | None:
        if node in nodes:
            return None
        return children(node) if node._sequence_nr() >= floor else []

    return latest_first((edge for node in nodes for edge in children(node)), follow)


def through_views(node: Node) -> Tensor | None:
    """The leaf that ``node`` is, or reaches through nodes of one input each (a transpose, a
    view: how ``F.linear`` takes its weight), else ``None``."""
    while leaf(node) is None:
        edges = children(node)
        if len(edges) != 1:
            return None
        node = edges[0][0]
    return leaf(node)


def leaves_and_uses(roots: Iterable[Node], used: set[int]) -> tuple[dict[int, None], list[Edge]]:
    """Ids of the leaves reachable from ``roots`` (in the order first seen), and the other inputs
    of the nodes that take a leaf whose id is in ``used`` (directly or through views), leaves
    (the op's other parameters) apart."""
    leaves: dict[int, None] = {}
    inputs: list[Edge] = []

    def follow(node: Node, _: set[int]) -> list[Edge]:
        edges = children(node)
        ids = [id(v) if (v := through_views(child)) is not None else None for child, _ in edges]
        leaves.update((i, None) for i in ids if i is not None)
        if any(i in used for i in ids):  # (the op's own parameters, e.g. a bias, are not inputs)
            inputs.extend(edge for edge, i in zip(edges, ids, strict=True) if i is None)
        return edges

    nodes = [root for root in roots if root is not None]
    leaves.update((id(leaf(n)), None) for n in nodes if leaf(n) is not None)
    latest_first(((root, 0) for root in nodes), follow)
    return leaves, inputs


def reached_leaves(root: Edge, wanted: set[int]) -> list[Tensor]:
    """The leaves whose id is in ``wanted`` that ``root`` reaches (each once, in the order first
    seen)."""
    found: dict[int, Tensor] = {}

    def follow(node: Node, _: set[int]) -> list[Edge]:
        edges = children(node)
        for child, _nr in edges:
            variable = leaf(child)
            if variable is not None and id(variable) in wanted:
                found.setdefault(id(variable), variable)
        return edges

    latest_first([root], follow)
    return list(found.values())
