"""The device step metadata (specsa.device_metadata) against the host builders it replaces:
positions, tree masks, provisional compressed tokens (sources, indices, visibility), group
windows and shared-index sources on random trees whose positions cross compression-block
boundaries, page sizes 1 and 16; and parents recovered from EAGLE's child / sibling links."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import links, random_tree

from specsa.device_metadata import DeviceStepMetadata, parents_from_links
from specsa.kernels.common.params import NSAParams
from specsa.kernels.fused.geometry import build_geometry
from specsa.provisional import closing_blocks, visible_rows


@pytest.mark.parametrize("t", [1, 2, 5, 8, 17, 64])
def test_parents_from_links(t):
    rng = random.Random(t)
    trees = [random_tree(rng, t) for _ in range(5)] + [list(range(-1, t - 1))]
    nt = torch.tensor([links(p)[0] for p in trees])
    ns = torch.tensor([links(p)[1] for p in trees])
    assert parents_from_links(nt, ns).tolist() == trees


PARAMS = [NSAParams(block=8, stride=4, select=16, topn=4, window=32),
          NSAParams()]


@pytest.mark.parametrize("params", PARAMS, ids=["tiny", "default"])
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("t, c, shared", [(1, 1, False), (4, 1, False), (6, 4, False),
                                          (13, 4, True), (16, 16, False), (9, 2, True)])
def test_device_metadata_equals_host_builders(params, page, t, c, shared):
    rng = random.Random(t * 131 + page + c)
    bs = 3
    trees = [random_tree(rng, t) for _ in range(bs)]
    if t > 2:
        trees[0] = list(range(-1, t - 1))                   # a chain too
    # committed lengths around block boundaries (l - 1, multiples of d, ...), one long one
    prefix = [params.block - 1 - rng.randrange(3), 3 * params.stride + rng.randrange(4),
              1000 + rng.randrange(64)][:bs]
    width = (max(prefix) + t) // page + 2
    perm = torch.randperm(4 * width)[:bs * width].view(bs, width).to(torch.int32)
    dm = DeviceStepMetadata(bs, t, width, page, params, c, shared, margin=5, device="cpu")
    # poison the outputs
    for x in (dm.q_pos, dm.prov_idx, dm.prov_cidx, dm.prov_vis, dm.geo.g_winlo):
        x.fill_(-7)
    dm.fill(torch.tensor(prefix, dtype=torch.int32), torch.tensor(trees), perm, params.window)

    geo = build_geometry(trees, prefix, perm, [list(range(t))] * bs, c, params.window, 1,
                         shared=shared)
    assert torch.equal(dm.q_pos, geo.q_pos)
    assert torch.equal(dm.geo.q_anc, geo.q_anc)
    assert torch.equal(dm.geo.g_winlo, geo.g_winlo)
    assert torch.equal(dm.geo.g_start, geo.g_start) and torch.equal(dm.geo.g_len, geo.g_len)
    assert torch.equal(dm.geo.sel_src, geo.sel_src)
    assert dm.cmp_lens.tolist() == [params.num_cmp(P) for P in prefix]
    assert dm.upd_lo.tolist() == [max(0, P - 5) for P in prefix]
    for b, (par, P) in enumerate(zip(trees, prefix)):
        blocks = closing_blocks(par, P, params,
                                lambda pos: int(perm[b, pos // page]) * page + pos % page, b * t)
        vis = visible_rows(par, {v: b * t + v for v, x in enumerate(blocks) if x is not None})
        for v, x in enumerate(blocks):
            row = b * t + v
            if x is not None:
                assert dm.prov_idx[row].tolist() == x[0], (b, v)
                assert int(dm.prov_cidx[row]) == x[1]
            got = sorted(r for r in dm.prov_vis[row].tolist() if r >= 0)
            assert got == sorted(vis[v]) and (dm.prov_vis[row] >= -1).all()
