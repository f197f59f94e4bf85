"""Host-side geometry of provisional compressed tokens (specsa.provisional) against the torch
path's tree visibility: the same closing nodes and block indices, sources on each node's path."""
from __future__ import annotations

import random

import pytest
import torch

from specsa.kernels.common.params import NSAParams
from specsa.kernels.nsa.masked import build_tree_visibility
from specsa.kernels.common.tree import node_depths
from specsa.provisional import closing_blocks, visible_rows


@pytest.mark.parametrize("seed", range(6))
def test_closing_blocks_match_tree_visibility(seed):
    rng = random.Random(seed)
    prm = NSAParams(block=8, stride=4, select=16, topn=4, window=32)
    t = rng.randrange(1, 20)
    parents = [-1] + [rng.randrange(0, u) for u in range(1, t)]
    P, off = rng.randrange(0, 60), rng.randrange(0, 5)
    blocks = closing_blocks(parents, P, prm, lambda x: 1000 + x, off)
    vis = build_tree_visibility(P, torch.tensor(parents), prm)
    close = [v for v, b in enumerate(blocks) if b is not None]
    assert close == vis.cmp_nodes.tolist()
    assert [blocks[v][1] for v in close] == vis.cmp_idx.tolist()
    depth = node_depths(parents)
    for v in close:
        src, i = blocks[v]
        path, cur = [], v                  # v's path positions, newest first
        while cur >= 0:
            path.append((P + depth[cur], -1 - (off + cur)))
            cur = parents[cur]
        want = {pos: code for pos, code in path}
        positions = range(i * prm.stride, i * prm.stride + prm.block)
        assert src == [want.get(x, 1000 + x) for x in positions]
    rows = visible_rows(parents, {v: 7 + j for j, v in enumerate(close)})
    for u in range(t):
        anc = vis.ancestors[u].tolist()
        assert rows[u] == [7 + j for j, v in enumerate(close) if anc[v]]
