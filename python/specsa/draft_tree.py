"""Draft trees: the token tree one verification step checks (docs/CONTRACTS.md section 6).

The one draft-tree module: `TreeSpec` (the shape a drafter drafts and the planner chooses),
`DraftTree` (one drafted tree) and, re-exported from `specsa.kernels.common.tree` (where the
kernels' host side reaches them without importing upward), traversal order, node depths,
ancestor sets and the kernels' node limit MAX_TREE_NODES.

Node 0 is the root: the last sampled token, whose KV is not cached yet. Every node is a
verifier query at position P + depth (P = committed length) and sees the committed context,
its ancestors and itself, never siblings or cousins. Node u's logits predict the token
after u. Parents precede children (parents[u] < u), so index order is a topological order
and the ancestor mask can be built in one forward pass over the nodes.

Example: root 7 with children 3 and 5, and 9 below 3, committed length P = 10:

    DraftTree(tokens=[7, 3, 5, 9], parents=[-1, 0, 0, 1], prefix_len=10)
    depth = [0, 1, 1, 2], positions = [10, 11, 11, 12], path_to(3) = [0, 1, 3]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from specsa.config import ConfigError, Traversal, parse_enum
from specsa.kernels.common.tree import (MAX_TREE_NODES, TreeError, ancestor_bits, ancestor_mask,
                                        batched_depths_ancestor_bits, node_children, node_depths,
                                        parent_list, rooted_parents, traversal_order, tree_path)

__all__ = ["DEFAULT_MAX_NODES", "MAX_TREE_NODES", "DraftTree", "TreeError", "TreeSpec",
           "ancestor_bits", "ancestor_mask", "batched_depths_ancestor_bits", "node_children",
           "node_depths", "parent_list", "rooted_parents", "traversal_order", "tree_path"]

# A DraftTree object may be larger than what one verify kernel launch takes (MAX_TREE_NODES):
# the CPU paths verify any size. Verification cost grows with the node count and the tree must
# fit the cache; a tree this large is almost certainly a bug upstream, so it is refused unless
# the caller raises it.
DEFAULT_MAX_NODES = 1024


@dataclass(frozen=True)
class TreeSpec:
    """Shape of a drafted tree: `topk` children per expanded node, `depth` levels below the
    root, at most `tokens` draft nodes (root excluded). A chain of gamma tokens is
    TreeSpec(topk=1, depth=gamma, tokens=gamma). The drafters draft it and the orchestrator's
    planner chooses among such shapes (`Strategy.shape`)."""

    topk: int = 1
    depth: int = 4
    tokens: int = 4

    def __post_init__(self) -> None:
        for name in ("topk", "depth", "tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--tree: {name} must be a positive integer, got {v!r}")

    @property
    def is_chain(self) -> bool:
        return self.topk == 1

    @classmethod
    def chain(cls, gamma: int) -> "TreeSpec":
        if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
            raise ConfigError(f"--gamma must be a positive integer, got {gamma!r}")
        return cls(topk=1, depth=gamma, tokens=gamma)

    @classmethod
    def parse(cls, spec: str) -> "TreeSpec":
        """`topk=K,depth=D,tokens=N` (any order; tokens defaults to the full tree capped
        at MAX_TREE_NODES, depth to 4, topk to 1)."""
        kw: dict[str, int] = {}
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ConfigError(f"--tree: expected key=value, got {part!r} "
                                  "(format: topk=K,depth=D,tokens=N)")
            k, v = (s.strip().lower() for s in part.split("=", 1))
            if k not in ("topk", "depth", "tokens"):
                raise ConfigError(f"--tree: unknown key {k!r} (allowed: topk, depth, tokens)")
            if k in kw:
                raise ConfigError(f"--tree: key {k!r} given twice")
            try:
                kw[k] = int(v)
            except ValueError:
                raise ConfigError(f"--tree: {k} must be an integer, got {v!r}") from None
        if not kw:
            raise ConfigError("--tree: empty spec (format: topk=K,depth=D,tokens=N)")
        topk, depth = kw.get("topk", 1), kw.get("depth", 4)
        if "tokens" not in kw and topk >= 1 and depth >= 1:
            kw["tokens"] = min(MAX_TREE_NODES, sum(topk ** i for i in range(1, depth + 1)))
        return cls(**{"topk": topk, "depth": depth, **kw})


@dataclass(frozen=True)
class DraftTree:
    """tokens [T] int64, parents [T] int64 (parents[0] = -1, parents[u] < u), prefix_len P.

    Derived (computed once at construction): depth [T] int64, positions [T] int64 = P + depth,
    ancestors [T, T] bool (ancestors[u, v]: v is u or an ancestor of u), children: tuple of
    tuples of child indices in index order (the order in which acceptance tries them).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    prefix_len: int
    max_nodes: int = DEFAULT_MAX_NODES
    depth: torch.Tensor = field(init=False, repr=False)
    positions: torch.Tensor = field(init=False, repr=False)
    ancestors: torch.Tensor = field(init=False, repr=False)
    children: tuple[tuple[int, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        tokens = torch.as_tensor(self.tokens, dtype=torch.long).reshape(-1).cpu()
        parents = torch.as_tensor(self.parents, dtype=torch.long).reshape(-1).cpu()
        par = _validate(tokens, parents, self.prefix_len, self.max_nodes)
        d = torch.tensor(node_depths(par), dtype=torch.long)
        anc = ancestor_mask(parents)
        kids = node_children(par)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "depth", d)
        object.__setattr__(self, "positions", d + int(self.prefix_len))
        object.__setattr__(self, "ancestors", anc)
        object.__setattr__(self, "children", tuple(tuple(k) for k in kids))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def chain(cls, root: int, draft: Sequence[int] | torch.Tensor, prefix_len: int,
              max_nodes: int = DEFAULT_MAX_NODES) -> "DraftTree":
        """Root followed by a chain of draft tokens (gamma = len(draft))."""
        toks = [int(root)] + [int(t) for t in torch.as_tensor(draft).reshape(-1).tolist()]
        return cls(tokens=toks, parents=list(range(-1, len(toks) - 1)),
                   prefix_len=prefix_len, max_nodes=max_nodes)

    @classmethod
    def from_expansion(cls, root: int, expansions: Sequence[tuple[int, Sequence[int]]],
                       prefix_len: int, max_nodes: int = DEFAULT_MAX_NODES) -> "DraftTree":
        """Build by top-k expansion: each (node, children_tokens) appends one child per token
        under `node` (an index of a node already built). Expansions apply in order."""
        toks, pars = [int(root)], [-1]
        for node, child_tokens in expansions:
            if not 0 <= int(node) < len(toks):
                raise TreeError(f"expansion of node {node}: node does not exist yet "
                                f"(tree has {len(toks)} nodes)")
            for t in child_tokens:
                toks.append(int(t))
                pars.append(int(node))
        return cls(tokens=toks, parents=pars, prefix_len=prefix_len, max_nodes=max_nodes)

    # -- queries --------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    @property
    def is_chain(self) -> bool:
        return all(len(c) <= 1 for c in self.children)

    def path_to(self, u: int) -> list[int]:
        """Node indices from the root to u, both included."""
        if not 0 <= u < self.size:
            raise TreeError(f"path_to({u}): node out of range [0, {self.size})")
        return tree_path(u, self.parents.tolist())

    def order(self, traversal: Traversal | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(perm, inv) int64 [T]: flat slot i holds node perm[i]; node u sits in slot inv[u].

        CHAIN: only for chains (index order). BFS: by depth, siblings adjacent (children of
        earlier-placed parents first). DFS: pre-order, each parent directly before its first
        child. Both keep parents before children, so a permuted tree is again valid.
        """
        traversal = parse_enum(Traversal, traversal, "traversal")
        p = torch.tensor(traversal_order(self.parents.tolist(), traversal), dtype=torch.long)
        inv = torch.empty_like(p)
        inv[p] = torch.arange(self.size)
        return p, inv

    def permuted(self, traversal: Traversal | str) -> tuple["DraftTree", torch.Tensor]:
        """The same tree with nodes renumbered in `traversal` order, and perm (new -> old)."""
        perm, inv = self.order(traversal)
        par = self.parents[perm]
        new_par = torch.where(par < 0, par, inv[par.clamp(min=0)])
        return DraftTree(tokens=self.tokens[perm], parents=new_par, prefix_len=self.prefix_len,
                         max_nodes=self.max_nodes), perm


def _validate(tokens: torch.Tensor, parents: torch.Tensor, prefix_len: int,
              max_nodes: int) -> list[int]:
    n = tokens.numel()
    if n == 0:
        raise TreeError("draft tree is empty: it needs at least the root node")
    if parents.numel() != n:
        raise TreeError(f"tokens has {n} nodes but parents has {parents.numel()}")
    if n > max_nodes:
        raise TreeError(f"draft tree has {n} nodes, more than the limit {max_nodes}")
    if not isinstance(prefix_len, int) or isinstance(prefix_len, bool) or prefix_len < 0:
        raise TreeError(f"prefix_len must be a non-negative integer, got {prefix_len!r}")
    if (tokens < 0).any():
        raise TreeError(f"negative token id at node {int((tokens < 0).nonzero()[0])}")
    par = parents.tolist()
    if par[0] != -1:
        raise TreeError(f"node 0 must be the root (parent -1), got parent {par[0]}")
    for u in range(1, n):
        p = par[u]
        if p == -1:
            raise TreeError(f"node {u} has parent -1: only node 0 may be the root")
        if not 0 <= p < n:
            raise TreeError(f"node {u} has parent {p}, outside [0, {n})")
        if p >= u:
            # Tell a cycle apart from a mere ordering problem: both are refused, but the
            # fix differs (a cycle is a drafter bug, misordering needs a topological sort).
            seen, v = {u}, p
            while 0 < v < n and v not in seen:
                seen.add(v)
                v = par[v]
            if v in seen:
                raise TreeError(f"parents contain a cycle through node {u}")
            raise TreeError(f"node {u} has parent {p} >= {u}: parents must precede children")
    return par
