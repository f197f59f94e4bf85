"""Flat orders of a verification step and group cuts (specsa.schedule)."""
from __future__ import annotations

import pytest

from specsa.config import ConfigError, Traversal
from specsa.schedule import (as_parents, cut_groups, default_group_size, default_num_splits,
                             flat_orders)


def test_flat_orders_refuse_chain_traversal_of_a_branching_tree():
    assert flat_orders([[-1, 0, 1, 2], [-1, 0]], Traversal.CHAIN) == [[0, 1, 2, 3], [0, 1]]
    with pytest.raises(ConfigError, match="CHAIN traversal needs a chain"):
        flat_orders([[-1, 0, 0, 1, 1, 2]], Traversal.CHAIN)


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
    from specsa.schedule import flat_orders, shared_sources

    rng = random.Random(c)
    for _ in range(20):
        t = rng.randrange(1, 20)
        par = [-1] + [rng.randrange(0, u) for u in range(1, t)]
        geo = build_geometry([par], [40], torch.zeros(1, 8, dtype=torch.int32),
                             flat_orders([par], traversal), c, 32, 1, shared=True)
        src = [0] * t
        for slot, u in zip(geo.sel_src.tolist(), geo.order.tolist()):
            src[u] = slot
        assert shared_sources(par, traversal, c) == src, (par, c)
