"""specsa.draft_tree: DraftTree derived fields, traversal orders (against a brute-force
definition), depths and ancestor sets, validation errors, TreeSpec parsing."""
from __future__ import annotations

import random

import pytest
import torch

from specsa.config import ConfigError, Traversal
from specsa.draft_tree import (DraftTree, TreeError, TreeSpec, ancestor_bits, ancestor_mask,
                               node_depths, traversal_order, tree_path)


def random_tree(rng: random.Random, n: int, prefix_len: int = 0, vocab: int = 50) -> DraftTree:
    parents = [-1] + [rng.randrange(u) for u in range(1, n)]
    return DraftTree(tokens=[rng.randrange(vocab) for _ in range(n)], parents=parents,
                     prefix_len=prefix_len)


def test_example_fields():
    t = DraftTree(tokens=[7, 3, 5, 9], parents=[-1, 0, 0, 1], prefix_len=10)
    assert t.depth.tolist() == [0, 1, 1, 2]
    assert t.positions.tolist() == [10, 11, 11, 12]
    assert t.children == ((1, 2), (3,), (), ())
    assert t.path_to(3) == [0, 1, 3] and t.path_to(0) == [0]
    expect = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(t.ancestors, expect)
    assert not t.is_chain


def test_chain_and_expansion():
    c = DraftTree.chain(5, [1, 2, 3], prefix_len=4)
    assert c.is_chain and c.tokens.tolist() == [5, 1, 2, 3] and c.positions.tolist() == [4, 5, 6, 7]
    assert torch.equal(c.ancestors, torch.ones(4, 4, dtype=torch.bool).tril())
    e = DraftTree.from_expansion(5, [(0, [1, 2]), (1, [3]), (2, [4, 6])], prefix_len=0)
    assert e.parents.tolist() == [-1, 0, 0, 1, 2, 2]
    with pytest.raises(TreeError, match="does not exist"):
        DraftTree.from_expansion(5, [(3, [1])], prefix_len=0)


@pytest.mark.parametrize("seed", range(20))
def test_random_tree_invariants(seed):
    rng = random.Random(seed)
    t = random_tree(rng, rng.randrange(1, 40), prefix_len=rng.randrange(100))
    n = t.size
    for u in range(n):
        path = t.path_to(u)
        assert len(path) == int(t.depth[u]) + 1
        assert t.ancestors[u].nonzero().flatten().tolist() == sorted(path)
    for trav in (Traversal.BFS, Traversal.DFS):
        perm, inv = t.order(trav)
        assert sorted(perm.tolist()) == list(range(n))
        assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))
        nt, p2 = t.permuted(trav)
        assert torch.equal(p2, perm) and torch.equal(nt.tokens, t.tokens[perm])
        # the ancestor relation is preserved under renumbering
        assert torch.equal(nt.ancestors, t.ancestors[perm][:, perm])
        assert torch.equal(nt.positions, t.positions[perm])
        if trav is Traversal.BFS:
            assert nt.depth.tolist() == sorted(nt.depth.tolist())
            for kids in nt.children:  # siblings occupy adjacent slots
                assert list(kids) == list(range(kids[0], kids[0] + len(kids))) if kids else True
        else:
            for u in range(n):        # pre-order: first child right after its parent
                if nt.children[u]:
                    assert nt.children[u][0] == u + 1
                # subtree of u is a contiguous slot range
                sub = nt.ancestors[:, u].nonzero().flatten().tolist()
                assert sub == list(range(u, u + len(sub)))


def test_chain_traversal():
    c = DraftTree.chain(1, [2, 3], prefix_len=0)
    perm, inv = c.order("chain")
    assert perm.tolist() == [0, 1, 2] and inv.tolist() == [0, 1, 2]
    t = DraftTree(tokens=[1, 2, 3], parents=[-1, 0, 0], prefix_len=0)
    with pytest.raises(TreeError, match="CHAIN traversal needs a chain"):
        t.order(Traversal.CHAIN)
    with pytest.raises(ConfigError, match="allowed: chain, bfs, dfs"):
        t.order("zigzag")


@pytest.mark.parametrize("tokens,parents,match", [
    pytest.param([1, 2, 3], [-1, 2, 1], "cycle", id="cycle"),
    pytest.param([1, 2, 3], [-1, 0, 2], "cycle", id="self-parent"),
    pytest.param([1, 2, 3], [-1, 2, 0], "must precede", id="parent-after-child"),
    pytest.param([1, 2], [0, 0], "must be the root", id="no-root"),
    pytest.param([1, 2, 3], [-1, 0, -1], "only node 0", id="two-roots"),
    pytest.param([1, 2], [-1, 5], "outside", id="parent-out-of-range"),
    pytest.param([1, 2], [-1], "parents has 1", id="length-mismatch"),
    pytest.param([], [], "empty", id="empty"),
    pytest.param([1, -2], [-1, 0], "negative token", id="negative-token"),
])
def test_invalid_trees(tokens, parents, match):
    with pytest.raises(TreeError, match=match):
        DraftTree(tokens=tokens, parents=parents, prefix_len=0)


def test_size_limit():
    DraftTree.chain(0, [1] * 7, prefix_len=0, max_nodes=8)
    with pytest.raises(TreeError, match="more than the limit 8"):
        DraftTree.chain(0, [1] * 8, prefix_len=0, max_nodes=8)


@pytest.mark.parametrize("spec,expect", [
    pytest.param("topk=2,depth=3,tokens=6", TreeSpec(2, 3, 6), id="full"),
    pytest.param("depth=3, topk=2", TreeSpec(2, 3, 14), id="default-tokens"),
    pytest.param("topk=1,depth=5", TreeSpec(1, 5, 5), id="chain"),
])
def test_treespec_parse(spec, expect):
    assert TreeSpec.parse(spec) == expect


@pytest.mark.parametrize("spec,match", [
    pytest.param("topk=0,depth=3", "topk must be a positive", id="zero"),
    pytest.param("width=2", "unknown key 'width'", id="unknown"),
    pytest.param("topk=two", "must be an integer", id="not-int"),
    pytest.param("topk2", "expected key=value", id="no-eq"),
    pytest.param("", "empty spec", id="empty"),
    pytest.param("topk=1,topk=2", "given twice", id="dup"),
])
def test_treespec_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        TreeSpec.parse(spec)
    with pytest.raises(ConfigError, match="--gamma"):
        TreeSpec.chain(0)


def test_traversal_order_orders_example_tree():
    par = [-1, 0, 0, 1, 1, 2]
    assert traversal_order(par, Traversal.BFS) == [0, 1, 2, 3, 4, 5]
    assert traversal_order(par, Traversal.DFS) == [0, 1, 3, 4, 2, 5]
    assert traversal_order([-1, 0, 1, 2], Traversal.CHAIN) == [0, 1, 2, 3]
    with pytest.raises(TreeError, match="CHAIN traversal needs a chain"):
        traversal_order(par, Traversal.CHAIN)


def test_traversal_order_keeps_parents_first_and_siblings_or_children_adjacent():
    par = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7]
    for trav in (Traversal.BFS, Traversal.DFS):
        order = traversal_order(par, trav)
        assert sorted(order) == list(range(len(par)))
        pos = {u: i for i, u in enumerate(order)}
        assert all(pos[p] < pos[u] for u, p in enumerate(par) if p >= 0)
    dfs = traversal_order(par, Traversal.DFS)
    assert all(par[dfs[i + 1]] == dfs[i] or par[dfs[i + 1]] != dfs[i]
               for i in range(len(dfs) - 1))
    assert dfs[:4] == [0, 1, 4, 7]          # parent directly before its first child
    assert traversal_order(par, Traversal.BFS)[1:4] == [1, 2, 3]   # siblings adjacent


@pytest.mark.parametrize("seed", range(10))
def test_traversal_order_against_brute_force(seed):
    """BFS is level order with children in index order: nodes sorted by (depth, root path);
    DFS pre-order is nodes sorted by root path (paths compared lexicographically)."""
    rng = random.Random(seed)
    par = [-1] + [rng.randrange(u) for u in range(1, rng.randrange(1, 40))]
    path = {u: tuple(tree_path(u, par)) for u in range(len(par))}
    assert traversal_order(par, Traversal.BFS) == sorted(path, key=lambda u: (len(path[u]), path[u]))
    assert traversal_order(par, Traversal.DFS) == sorted(path, key=lambda u: path[u])
    t = DraftTree(tokens=[0] * len(par), parents=par, prefix_len=0)
    for trav in (Traversal.BFS, Traversal.DFS):
        assert t.order(trav)[0].tolist() == traversal_order(par, trav)
    assert node_depths(par) == [len(path[u]) - 1 for u in range(len(par))]
    bits = ancestor_bits(par)
    assert [[v for v in range(len(par)) if bits[u] >> v & 1] for u in range(len(par))] == \
        [sorted(path[u]) for u in range(len(par))]
    assert torch.equal(ancestor_mask(torch.tensor(par)),
                       torch.tensor([[v in path[u] for v in range(len(par))]
                                     for u in range(len(par))]))
