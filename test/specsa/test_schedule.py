"""Tree flattening and group cuts (specsa.schedule)."""
from __future__ import annotations

import pytest

from specsa.config import ConfigError, Traversal
from specsa.schedule import (as_parents, cut_groups, default_group_size, default_num_splits,
                             flatten)


def test_flatten_orders_example_tree():
    par = [-1, 0, 0, 1, 1, 2]
    assert flatten(par, Traversal.BFS) == [0, 1, 2, 3, 4, 5]
    assert flatten(par, Traversal.DFS) == [0, 1, 3, 4, 2, 5]
    assert flatten([-1, 0, 1, 2], Traversal.CHAIN) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="CHAIN traversal needs a chain"):
        flatten(par, Traversal.CHAIN)


def test_flatten_keeps_parents_first_and_siblings_or_children_adjacent():
    par = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7]
    for trav in (Traversal.BFS, Traversal.DFS):
        order = flatten(par, trav)
        assert sorted(order) == list(range(len(par)))
        pos = {u: i for i, u in enumerate(order)}
        assert all(pos[p] < pos[u] for u, p in enumerate(par) if p >= 0)
    dfs = flatten(par, Traversal.DFS)
    assert all(par[dfs[i + 1]] == dfs[i] or par[dfs[i + 1]] != dfs[i]
               for i in range(len(dfs) - 1))
    assert dfs[:4] == [0, 1, 4, 7]          # parent directly before its first child
    assert flatten(par, Traversal.BFS)[1:4] == [1, 2, 3]   # siblings adjacent


def test_cut_groups_and_defaults():
    assert cut_groups(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ConfigError):
        cut_groups([0], 0)
    assert default_group_size(4) == 4 and default_group_size(6) == 2 and default_group_size(1) == 16
    assert default_group_size(4, 1024) == 16 and default_group_size(8, 1024) == 8
    assert default_num_splits(512, 24, 132) == 1
    assert default_num_splits(8, 24, 132) == 12
    assert default_num_splits(8, 24, 0) == 1


def test_as_parents_rejects_bad_trees():
    with pytest.raises(ConfigError, match="root"):
        as_parents([0, 0])
    with pytest.raises(ConfigError, match="precede"):
        as_parents([-1, 2, 0])


@pytest.mark.parametrize("traversal", [Traversal.BFS, Traversal.DFS])
@pytest.mark.parametrize("c", [1, 2, 3, 4, 8])
def test_shared_sources_match_the_kernel_geometry(traversal, c):
    """The TORCH path's SHARED_INDEX sources are the Triton geometry's (build_geometry with
    shared=True): same groups, same representative (deepest, ties to the latest)."""
    import random

    import torch

    from specsa.kernels.fused import build_geometry
    from specsa.schedule import flatten, shared_sources

    rng = random.Random(c)
    for _ in range(20):
        t = rng.randrange(1, 20)
        par = [-1] + [rng.randrange(0, u) for u in range(1, t)]
        geo = build_geometry([par], [40], torch.zeros(1, 8, dtype=torch.int32),
                             [flatten(par, traversal)], c, 32, 1, shared=True)
        src = [0] * t
        for slot, u in zip(geo.sel_src.tolist(), geo.order.tolist()):
            src[u] = slot
        assert shared_sources(par, traversal, c) == src, (par, c)
