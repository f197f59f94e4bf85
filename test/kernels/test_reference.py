"""The NSA reference (kernels/*/naive.py) against an independent brute-force formulation.

The brute force below is written from docs/DESIGN.md section 3 without sharing code with naive.py:
explicit position sets for every compressed token, selection block and branch; overlap
weights by literally intersecting position sets; float64 dense softmax over index lists.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import assert_close
from specsa.kernels.common.params import NSAParams
from specsa.kernels.compression.naive import (compress, naive_block_scores, naive_cmp_attention)
from specsa.kernels.nsa.naive import naive_nsa_prefill, naive_nsa_query, naive_nsa_tree
from specsa.kernels.selection.naive import naive_selected_attention, naive_topk
from specsa.kernels.window.naive import naive_window_attention


# ---------------------------------------------------------------- brute force (float64)
def _softmax_attend(qv, keys, vals, idx, scale):
    """Dense softmax of one head over the explicit index list idx."""
    if not idx:
        return torch.zeros_like(qv), []
    logits = [scale * float(qv @ keys[i]) for i in idx]
    m = max(logits)
    w = [math.exp(x - m) for x in logits]
    z = sum(w)
    out = sum((wi / z) * vals[i] for wi, i in zip(w, idx))
    return out, [wi / z for wi in w]


def brute_query(q, K, V, prm: NSAParams, scale, cw=None, gates=None):
    q, K, V = q.double(), K.double(), V.double()
    t, hkv = K.shape[0] - 1, K.shape[1]
    hq = q.shape[0]
    g = hq // hkv
    l, d, ls = prm.block, prm.stride, prm.select
    blocks = []                                   # positions covered by each compressed token
    while len(blocks) * d + l <= t + 1:
        i = len(blocks)
        blocks.append(list(range(i * d, i * d + l)))

    def phi(X, h, pos, w, b):
        acc = torch.zeros(X.shape[2], dtype=torch.float64)
        for j, x in enumerate(pos):
            acc = acc + (1.0 / l if w is None else float(w[h, j])) * X[x, h]
        return acc if b is None else acc + b[h].double()

    wk, bk, wv, bv = cw if cw is not None else (None, None, None, None)
    ck = [[phi(K, h, pos, wk, bk) for pos in blocks] for h in range(hkv)]
    cv = [[phi(V, h, pos, wv, bv) for pos in blocks] for h in range(hkv)]
    o_cmp, p = torch.zeros(hq, q.shape[1], dtype=torch.float64), []
    for h in range(hq):
        o, ph = _softmax_attend(q[h], ck[h // g], cv[h // g], list(range(len(blocks))), scale)
        o_cmp[h] = o
        p.append(ph)
    nsel = t // ls + 1
    sel_blocks = [set(range(j * ls, (j + 1) * ls)) for j in range(nsel)]
    scores = [[0.0] * nsel for _ in range(hkv)]
    for h in range(hq):
        for i, pos in enumerate(blocks):
            for j in range(nsel):
                scores[h // g][j] += p[h][i] * len(set(pos) & sel_blocks[j]) / d
    cur = t // ls
    forced = {j for j in range(nsel) if j < prm.init_blocks or cur - prm.local_blocks < j <= cur}
    sel = []
    for h in range(hkv):
        rest = sorted((j for j in range(nsel) if j not in forced), key=lambda j: (-scores[h][j], j))
        chosen = sorted(forced | set(rest[: prm.topn - len(forced)]))
        sel.append(chosen + [-1] * (prm.topn - len(chosen)))
    win = [x for x in range(t + 1) if x >= t - prm.window + 1]
    o_slc = torch.zeros_like(o_cmp)
    o_win = torch.zeros_like(o_cmp)
    o_uni = torch.zeros_like(o_cmp)
    for h in range(hq):
        chosen = {b for b in sel[h // g] if b >= 0}
        slc = [x for x in range(t + 1) if x // ls in chosen]
        o_slc[h] = _softmax_attend(q[h], K[:, h // g], V[:, h // g], slc, scale)[0]
        o_win[h] = _softmax_attend(q[h], K[:, h // g], V[:, h // g], win, scale)[0]
        o_uni[h] = _softmax_attend(q[h], K[:, h // g], V[:, h // g], sorted(set(slc) | set(win)), scale)[0]
    if gates is None:
        o = o_uni
    else:
        gd = gates.double()
        o = gd[:, 0:1] * o_cmp + gd[:, 1:2] * o_slc + gd[:, 2:3] * o_win
    return dict(o=o, sel=torch.tensor(sel), p=torch.tensor(p, dtype=torch.float64).reshape(hq, len(blocks)),
                scores=torch.tensor(scores, dtype=torch.float64), o_cmp=o_cmp, o_slc=o_slc, o_win=o_win,
                ck=torch.stack([torch.stack(c) for c in ck], 1) if blocks else None)


# ---------------------------------------------------------------- cases
SMALL = dict(block=8, stride=4, select=16, topn=4, window=32)
ALT = dict(block=16, stride=8, select=16, topn=3, init_blocks=1, local_blocks=1, window=32)

CASES = [  # (nsa kwargs, Hkv, G, D, positions t, gated, learned)
    pytest.param(SMALL, 2, 1, 64, [100, 47, 64], False, False, id="small-G1-D64-union-mean"),
    pytest.param(SMALL, 1, 4, 128, [100, 63], True, True, id="small-G4-D128-gated-learned"),
    pytest.param(SMALL, 2, 6, 64, [90, 5], False, True, id="small-G6-D64-union-learned"),
    pytest.param(SMALL, 1, 6, 128, [77, 40], True, False, id="small-G6-D128-gated-mean"),
    pytest.param(ALT, 2, 4, 64, [120, 15, 31], False, False, id="alt-G4-D64-union-mean"),
    pytest.param(ALT, 1, 1, 128, [95, 48], True, True, id="alt-G1-D128-gated-learned"),
    pytest.param({}, 1, 4, 64, [1100], False, False, id="default-G4-D64-union-mean-t1100"),
    pytest.param({}, 1, 1, 64, [1090], True, True, id="default-G1-D64-gated-learned-t1090"),
]


def _inputs(t, hkv, g, dim, gated, learned, prm):
    q = torch.randn(g * hkv, dim)
    k, v = torch.randn(t + 1, hkv, dim), torch.randn(t + 1, hkv, dim)
    gates = torch.rand(g * hkv, 3) if gated else None
    cw = None
    if learned:
        cw = (torch.randn(hkv, prm.block) / prm.block ** 0.5, torch.randn(hkv, dim) * 0.1,
              torch.randn(hkv, prm.block) / prm.block ** 0.5, None)
    return q, k, v, gates, cw


@pytest.mark.parametrize("nsa, hkv, g, dim, positions, gated, learned", CASES)
def test_query_matches_bruteforce(nsa, hkv, g, dim, positions, gated, learned):
    prm = NSAParams(**nsa, gated=gated)
    scale = dim ** -0.5
    for t in positions:
        q, k, v, gates, cw = _inputs(t, hkv, g, dim, gated, learned, prm)
        ref = brute_query(q, k, v, prm, scale, cw, gates)
        o, sel = naive_nsa_query(q, k, v, prm, scale, cw, gates)
        assert o.dtype == torch.float32 and sel.dtype == torch.int64
        assert torch.equal(sel, ref["sel"]), f"t={t}: sel {sel.tolist()} != {ref['sel'].tolist()}"
        assert_close(o, ref["o"].float(), what=f"o t={t}")
        # branch by branch, so a failure names the branch
        wk, bk, wv, bv = cw if cw is not None else (None,) * 4
        ck, cv = compress(k, prm, wk, bk), compress(v, prm, wv, bv)
        assert ck.shape[0] == prm.num_cmp(t + 1)
        if ref["ck"] is not None:
            assert_close(ck, ref["ck"].float(), what="ck")
        o_cmp, p = naive_cmp_attention(q, ck, cv, scale)
        assert p.shape == ref["p"].shape
        if p.numel():
            assert_close(p, ref["p"].float(), what="p_cmp")
        assert_close(o_cmp, ref["o_cmp"].float(), what="o_cmp")
        scores = naive_block_scores(p, t, prm, num_kv_heads=hkv)
        assert_close(scores, ref["scores"].float(), what="scores")
        assert torch.equal(naive_topk(scores, t, prm), ref["sel"])
        o_slc, lse_slc = naive_selected_attention(q, k, v, sel, prm, scale)
        o_win, lse_win = naive_window_attention(q, k, v, prm, scale)
        assert_close(o_slc, ref["o_slc"].float(), what="o_slc")
        assert_close(o_win, ref["o_win"].float(), what="o_win")
        assert torch.isfinite(lse_slc).all() and torch.isfinite(lse_win).all()


def test_branch_activity_of_cases():
    """The main cases really exercise every branch: compressed tokens exist, more candidates
    than topn, window shorter than the context."""
    for nsa, t in ((SMALL, 100), (ALT, 120), ({}, 1100)):
        prm = NSAParams(**nsa)
        assert prm.num_cmp(t + 1) > 0 and prm.num_sel(t + 1) > prm.topn and prm.window < t + 1


def test_edges_no_cmp_and_few_candidates():
    prm = NSAParams(**SMALL)
    q, k, v = torch.randn(4, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)   # t=5 < block
    o_cmp, p = naive_cmp_attention(q, compress(k, prm), compress(v, prm), 0.25)
    assert p.shape == (4, 0) and not o_cmp.any()
    o, sel = naive_nsa_query(q, k, v, prm, 0.25)
    assert sel.tolist() == [[0, -1, -1, -1]] * 2
    assert_close(o, brute_query(q, k, v, prm, 0.25)["o"].float(), what="t<block")
    k, v = torch.randn(41, 2, 16), torch.randn(41, 2, 16)                        # 3 candidates
    assert naive_nsa_query(q, k, v, prm, 0.25)[1].tolist() == [[0, 1, 2, -1]] * 2


def test_score_mass_is_conserved():
    """Each compressed token spreads l/d of weight over the blocks (README, Eq. 9)."""
    prm = NSAParams(**SMALL)
    q, k = torch.randn(8, 16), torch.randn(70, 2, 16)
    _, p = naive_cmp_attention(q, compress(k, prm), compress(k, prm), 0.25)
    scores = naive_block_scores(p, 69, prm, num_kv_heads=2)
    assert_close(scores.sum(dim=1), torch.full((2,), 4 * prm.block / prm.stride), what="mass")


def test_ties_go_to_lower_index():
    prm = NSAParams(select=16, topn=5, init_blocks=1, local_blocks=2)
    t = 100                                                    # Nsel 7, forced {0, 5, 6}
    scores = torch.tensor([[9.0, 1.0, 3.0, 3.0, 3.0, 9.0, 9.0],
                           [0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0]])
    assert naive_topk(scores, t, prm).tolist() == [[0, 2, 3, 5, 6], [0, 1, 2, 5, 6]]


def test_forced_blocks_win_over_scores():
    prm = NSAParams(select=16, topn=4, init_blocks=1, local_blocks=2)
    scores = torch.tensor([[0.0, 5.0, 6.0, 7.0, 8.0, 0.0, 0.0]])
    assert naive_topk(scores, 100, prm).tolist() == [[0, 4, 5, 6]]
    # t = 16: local blocks {0, 1} overlap the initial block; the free slots go to nothing else
    assert naive_topk(torch.tensor([[0.0, 0.0]]), 16, prm).tolist() == [[0, 1, -1, -1]]
    prm2 = NSAParams(select=16, topn=5, init_blocks=2, local_blocks=3)
    sel = naive_topk(torch.tensor([[0.0, 9.0, 0.0, 0.0, 1.0, 2.0, 0.0]]), 100, prm2)
    assert sel.tolist() == [[0, 1, 4, 5, 6]]


def test_bad_inputs_raise():
    prm = NSAParams(**SMALL)
    q, k = torch.randn(4, 16), torch.randn(20, 3, 16)
    with pytest.raises(ValueError, match="multiple"):
        naive_nsa_query(q, k, k, prm, 0.25)
    with pytest.raises(ValueError, match="gated"):
        naive_nsa_query(torch.randn(3, 16), k, k, prm, 0.25, gates=torch.rand(3, 3))
    with pytest.raises(ValueError, match="num_kv_heads"):
        naive_block_scores(torch.rand(4, 3), 20, prm)
    with pytest.raises(ValueError, match="topn"):
        naive_topk(torch.rand(1, 2), 20, NSAParams(topn=2, init_blocks=1, local_blocks=2))


# ---------------------------------------------------------------- trees
def _random_tree(n, rng):
    """Random tree with parent < child; parents drawn from the last 3 nodes keep it deep
    enough to cross compression boundaries while still branching."""
    return [-1] + [rng.randrange(max(0, u - 3), u) for u in range(1, n)]


@pytest.mark.parametrize("nsa, hkv, g, ctx, nodes, gated, learned", [
    pytest.param(SMALL, 2, 1, 29, 14, False, False, id="small-G1-P29-T14-union-mean"),
    pytest.param(SMALL, 1, 4, 37, 12, True, True, id="small-G4-P37-T12-gated-learned"),
    pytest.param(ALT, 1, 6, 42, 10, False, True, id="alt-G6-P42-T10-union-learned"),
    pytest.param(SMALL, 2, 4, 0, 16, True, False, id="small-G4-P0-T16-gated-mean"),
])
def test_tree_equals_explicit_paths(nsa, hkv, g, ctx, nodes, gated, learned):
    prm = NSAParams(**nsa, gated=gated)
    dim, scale = 32, 32 ** -0.5
    rng = random.Random(ctx * 100 + nodes)
    parents = _random_tree(nodes, rng)
    hq = hkv * g
    q_ctx, q = torch.randn(ctx, hq, dim), torch.randn(nodes, hq, dim)
    k_ctx, v_ctx = torch.randn(ctx, hkv, dim), torch.randn(ctx, hkv, dim)
    k_tree, v_tree = torch.randn(nodes, hkv, dim), torch.randn(nodes, hkv, dim)
    gates = torch.rand(nodes, hq, 3) if gated else None
    cw = None
    if learned:
        cw = (torch.randn(hkv, prm.block) / 4, torch.randn(hkv, dim) * 0.1, torch.randn(hkv, prm.block) / 4,
              torch.randn(hkv, dim) * 0.1)
    o, sel = naive_nsa_tree(q, k_ctx, v_ctx, k_tree, v_tree, torch.tensor(parents), prm, scale, cw, gates)
    depth = []
    for u, pu in enumerate(parents):
        depth.append(0 if pu < 0 else depth[pu] + 1)
        path = [u]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path = path[::-1]
        kp, vp = torch.cat([k_ctx, k_tree[path]]), torch.cat([v_ctx, v_tree[path]])
        qp = torch.cat([q_ctx, q[path]])
        gp = None if gates is None else torch.cat([torch.rand(ctx, hq, 3), gates[path]])
        o_ref, sel_ref = naive_nsa_prefill(qp[-1:].expand(ctx + len(path), -1, -1), kp, vp, prm, scale, cw,
                                           None if gp is None else gp[-1:].expand(ctx + len(path), -1, -1))
        assert torch.equal(sel[u], sel_ref[-1]), f"node {u}"
        assert_close(o[u], o_ref[-1], what=f"node {u}")
    # the tree really crosses a compression boundary (a provisional compressed token exists)
    closes = [ctx + dp for dp in depth if ctx + dp - prm.block + 1 >= 0
              and (ctx + dp - prm.block + 1) % prm.stride == 0]
    assert closes, "test tree should close a compression block"


def test_chain_tree_equals_prefill_rows():
    prm = NSAParams(**SMALL, gated=True)
    ctx, n, hkv, g, dim = 27, 12, 1, 4, 32
    q, k, v = torch.randn(ctx + n, hkv * g, dim), torch.randn(ctx + n, hkv, dim), torch.randn(ctx + n, hkv, dim)
    gates = torch.rand(ctx + n, hkv * g, 3)
    o_ref, sel_ref = naive_nsa_prefill(q, k, v, prm, 0.2, None, gates)
    parents = torch.arange(-1, n - 1)
    o, sel = naive_nsa_tree(q[ctx:], k[:ctx], v[:ctx], k[ctx:], v[ctx:], parents, prm, 0.2, None, gates[ctx:])
    assert torch.equal(sel, sel_ref[ctx:])
    assert_close(o, o_ref[ctx:], what="chain tree vs prefill")
