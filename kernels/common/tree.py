"""Draft-tree topology: the one place that derives traversal order, node depth, ancestor sets
and the node limit from a parent list (docs/DESIGN.md "Where each concept lives").

It sits in the kernels package because the kernels' host side (geometry, reference and masked
attention) needs it and the kernels never import upward; `specsa.draft_tree` re-exports it
next to `DraftTree` and `TreeSpec` for the runtime, orchestrator and SGLang backend.

A tree is a parent list: parents[u] < u, -1 for a node hanging below the committed context
(node 0 in a draft tree; the reference kernels also accept forests of such roots).

Example: parents [-1, 0, 0, 1] -> depths [0, 1, 1, 2], BFS [0, 1, 2, 3], DFS [0, 1, 3, 2],
ancestor bits [0b1, 0b11, 0b101, 0b1011].
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# The verify kernels keep one int64 bitmask per query row (ancestors in the tree, members of a
# group), so a verified tree, a group and a chain verified as a tree have at most 64 nodes.
MAX_TREE_NODES = 64


class TreeError(ValueError):
    """A draft tree is malformed or cannot be laid out as asked; the message names the node."""


def parent_list(parents: Sequence[int] | torch.Tensor) -> list[int]:
    """Plain list of parent indices (no validation)."""
    return [int(p) for p in (parents.tolist() if isinstance(parents, torch.Tensor) else parents)]


def rooted_parents(parents: Sequence[int] | torch.Tensor) -> list[int]:
    """Parent list of a draft tree, validated: node 0 is the only root (parents[0] = -1) and
    parents precede children (0 <= parents[u] < u)."""
    par = parent_list(parents)
    if not par or par[0] != -1:
        raise TreeError("a draft tree needs node 0 as its root (parents[0] = -1)")
    for u, p in enumerate(par[1:], start=1):
        if not 0 <= p < u:
            raise TreeError(f"parents[{u}] = {p}: parents must precede children (0 <= p < u)")
    return par


def node_depths(parents: Sequence[int] | torch.Tensor) -> list[int]:
    """Depth of each node (0 for children of the committed context); validates parent < child."""
    depth: list[int] = []
    for u, p in enumerate(parent_list(parents)):
        if p >= u or p < -1:
            raise ValueError(f"parents[{u}] = {p}: must be -1 (context) or a smaller node index")
        depth.append(0 if p < 0 else depth[p] + 1)
    return depth


def node_children(parents: Sequence[int]) -> list[list[int]]:
    """children[u]: u's children in index order (the order acceptance tries them)."""
    kids: list[list[int]] = [[] for _ in parents]
    for u, p in enumerate(parents):
        if p >= 0:
            kids[p].append(u)
    return kids


def tree_path(u: int, parents: Sequence[int]) -> list[int]:
    """Tree nodes from the root down to u (inclusive)."""
    path = []
    while u >= 0:
        path.append(u)
        u = parents[u]
    return path[::-1]


def traversal_order(parents: Sequence[int], traversal) -> list[int]:
    """Flat order of the nodes of a tree rooted at node 0 (a permutation of range(T)).

    traversal: "chain" / "bfs" / "dfs" or an enum whose value is one of them
    (specsa.config.Traversal). CHAIN: index order, only for chains. BFS: by depth, siblings
    adjacent (children of earlier-placed parents first). DFS: pre-order, each parent directly
    before its first child. Both keep parents before children.

    Example: parents [-1, 0, 0, 1] -> BFS [0, 1, 2, 3], DFS [0, 1, 3, 2]; CHAIN refuses it.
    """
    kind = str(getattr(traversal, "value", traversal)).lower()
    kids = node_children(parents)
    if kind == "chain":
        branching = [u for u, c in enumerate(kids) if len(c) > 1]
        if branching:
            raise TreeError(f"CHAIN traversal needs a chain, but node(s) {branching} have several "
                            "children; use BFS or DFS")
        return list(range(len(parents)))
    if kind == "bfs":
        order, head = [0], 0
        while head < len(order):
            order.extend(kids[order[head]])
            head += 1
        return order
    if kind != "dfs":
        raise TreeError(f"unknown traversal {traversal!r} (allowed: chain, bfs, dfs)")
    order, stack = [], [0]
    while stack:
        u = stack.pop()
        order.append(u)
        stack.extend(reversed(kids[u]))
    return order


def ancestor_bits(parents: Sequence[int]) -> list[int]:
    """Per node, the bitmask of its ancestors and itself (bit v set: v is u or above u); the
    verify kernels' tree mask. Needs T <= MAX_TREE_NODES to fit an int64."""
    bits: list[int] = []
    for u, p in enumerate(parents):
        bits.append((1 << u) | (bits[p] if p >= 0 else 0))
    return bits


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[T, T] bool on parents' device: mask[u, v] iff v is u or an ancestor of u."""
    t = parents.shape[0]
    chain = torch.arange(-1, t - 1, device=parents.device)
    if torch.equal(parents, chain):  # prefill chunks: skip the per-depth loop
        return torch.ones(t, t, dtype=torch.bool, device=parents.device).tril()
    anc = torch.zeros(t, t, dtype=torch.bool, device=parents.device)
    rows = torch.arange(t, device=parents.device)
    cur = rows.clone()
    while True:
        live = cur >= 0
        if not bool(live.any()):
            return anc
        anc[rows[live], cur[live]] = True
        cur = torch.where(live, parents[cur.clamp(min=0)], cur)


def batched_depths_ancestor_bits(par: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth [B, T] and ancestor bitmask [B, T] (int64, self included) of B trees of T nodes,
    on the device by pointer jumping (no host sync: the device-side step plan uses it)."""
    b, t = par.shape
    u = torch.arange(t, device=par.device).expand(b, t)
    up = torch.where(par >= 0, par, u)                       # the root points at itself
    depth = (par >= 0).long()
    bit = torch.ones(b, t, dtype=torch.long, device=par.device) << u
    anc = bit | torch.where(par >= 0, bit.gather(1, up), 0)
    for _ in range(max(1, math.ceil(math.log2(max(t, 2))))):
        depth = depth + depth.gather(1, up)
        anc = anc | anc.gather(1, up)
        up = up.gather(1, up)
    return depth, anc
