"""masked_nsa (the vectorised CPU path) against the fp32 reference naive.py: prefill, chunked
prefill after a committed context, decode and tree verification; fp32 and bf16 inputs."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import assert_close, poisoned
from specsa.kernels.common.params import NSAParams
from specsa.kernels.compression.naive import compress
from specsa.kernels.nsa.masked import build_tree_visibility, masked_nsa, provisional_cmp
from specsa.kernels.nsa.naive import naive_nsa_prefill, naive_nsa_query, naive_nsa_tree

SMALL = dict(block=8, stride=4, select=16, topn=4, window=32)
ALT = dict(block=16, stride=8, select=16, topn=3, init_blocks=1, local_blocks=1, window=24)


def _weights(prm, hkv, dim, learned):
    if not learned:
        return None
    return (torch.randn(hkv, prm.block) / 3, torch.randn(hkv, dim) * 0.1,
            torch.randn(hkv, prm.block) / 3, None)


def _run_masked(q, k_ctx, v_ctx, k_tree, v_tree, parents, prm, scale, cw, gates, chunk, out=None,
                **given):
    """Tree / chain / decode through build_tree_visibility + provisional_cmp + masked_nsa, with
    committed compressed tokens from `compress` over the context (as the cache would hold)."""
    P = k_ctx.shape[0]
    wk, bk, wv, bv = cw if cw is not None else (None,) * 4
    vis = build_tree_visibility(P, parents, prm)
    tail = max(0, P - (prm.block - 1))     # provisional tokens need only the last l-1 keys
    pk = provisional_cmp(k_ctx[tail:], k_tree, parents, prm, wk, bk, ctx_len=P)
    pv = provisional_cmp(v_ctx[tail:], v_tree, parents, prm, wv, bv, ctx_len=P)
    ck = torch.cat([compress(k_ctx, prm, wk, bk), pk])
    cv = torch.cat([compress(v_ctx, prm, wv, bv), pv])
    assert ck.shape[0] == vis.c_idx.shape[0]
    return masked_nsa(q, torch.cat([k_ctx, k_tree]), torch.cat([v_ctx, v_tree]), vis.q_pos, vis.k_pos,
                      vis.kv_visible, ck, cv, vis.c_idx, vis.c_visible, prm, scale, gates, out=out,
                      chunk=chunk, **given)


CASES = [  # nsa, Hkv, G, D, gated, learned
    pytest.param(SMALL, 2, 1, 64, False, False, id="small-G1-union-mean"),
    pytest.param(SMALL, 1, 4, 64, True, True, id="small-G4-gated-learned"),
    pytest.param(ALT, 2, 6, 32, False, True, id="alt-G6-union-learned"),
    pytest.param(ALT, 1, 4, 128, True, False, id="alt-G4-gated-mean"),
]


@pytest.mark.parametrize("nsa, hkv, g, dim, gated, learned", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_matches_naive(nsa, hkv, g, dim, gated, learned, dtype):
    prm = NSAParams(**nsa, gated=gated)
    T, hq, scale = 83, hkv * g, dim ** -0.5
    q, k, v = (torch.randn(T, h, dim).to(dtype) for h in (hq, hkv, hkv))
    gates = torch.rand(T, hq, 3) if gated else None
    cw = _weights(prm, hkv, dim, learned)
    o_ref, sel_ref = naive_nsa_prefill(q.float(), k.float(), v.float(), prm, scale, cw, gates)
    out = poisoned(T, hq, dim, dtype=dtype)
    o, sel = _run_masked(q, k[:0], v[:0], k, v, torch.arange(-1, T - 1), prm, scale, cw, gates,
                         chunk=16, out=out)
    assert o is out and o.dtype == dtype
    assert torch.equal(sel, sel_ref), "selection differs"
    assert_close(o, o_ref, what="prefill")


@pytest.mark.parametrize("nsa, hkv, g, dim, gated, learned", CASES)
def test_chunked_prefill_and_decode(nsa, hkv, g, dim, gated, learned):
    """A chain chunk after P committed tokens, and a single decode query (T = 1)."""
    prm = NSAParams(**nsa, gated=gated)
    P, T, hq, scale = 45, 30, hkv * g, dim ** -0.5
    q, k, v = torch.randn(P + T, hq, dim), torch.randn(P + T, hkv, dim), torch.randn(P + T, hkv, dim)
    gates = torch.rand(P + T, hq, 3) if gated else None
    cw = _weights(prm, hkv, dim, learned)
    o_ref, sel_ref = naive_nsa_prefill(q, k, v, prm, scale, cw, gates)
    g_chunk = None if gates is None else gates[P:]
    o, sel = _run_masked(q[P:], k[:P], v[:P], k[P:], v[P:], torch.arange(-1, T - 1), prm, scale, cw,
                         g_chunk, chunk=7, out=poisoned(T, hq, dim))
    assert torch.equal(sel, sel_ref[P:])
    assert_close(o, o_ref[P:], what="chunked prefill")
    t = P + T - 1                                                # decode the last token
    o1, sel1 = _run_masked(q[t:], k[:t], v[:t], k[t:], v[t:], torch.tensor([-1]), prm, scale, cw,
                           None if gates is None else gates[t:], chunk=128)
    o1_ref, sel1_ref = naive_nsa_query(q[t], k, v, prm, scale, cw, None if gates is None else gates[t])
    assert torch.equal(sel1[0], sel1_ref)
    assert_close(o1[0], o1_ref, what="decode")


@pytest.mark.parametrize("nsa, hkv, g, dim, gated, learned", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tree_matches_naive(nsa, hkv, g, dim, gated, learned, dtype):
    prm = NSAParams(**nsa, gated=gated)
    rng = random.Random(hkv * 10 + g)
    P, T, hq, scale = 37, 18, hkv * g, dim ** -0.5
    parents = torch.tensor([-1] + [rng.randrange(max(0, u - 3), u) for u in range(1, T)])
    q = torch.randn(T, hq, dim).to(dtype)
    k_ctx, v_ctx = torch.randn(P, hkv, dim).to(dtype), torch.randn(P, hkv, dim).to(dtype)
    k_tree, v_tree = torch.randn(T, hkv, dim).to(dtype), torch.randn(T, hkv, dim).to(dtype)
    gates = torch.rand(T, hq, 3) if gated else None
    cw = _weights(prm, hkv, dim, learned)
    o_ref, sel_ref = naive_nsa_tree(q.float(), k_ctx.float(), v_ctx.float(), k_tree.float(),
                                    v_tree.float(), parents, prm, scale, cw, gates)
    vis = build_tree_visibility(P, parents, prm)
    assert vis.cmp_nodes.numel() > 0, "tree should close a compression block"
    o, sel = _run_masked(q, k_ctx, v_ctx, k_tree, v_tree, parents, prm, scale, cw, gates, chunk=5,
                         out=poisoned(T, hq, dim, dtype=dtype))
    assert torch.equal(sel, sel_ref)
    assert_close(o, o_ref, dtype=dtype, what="tree")


def test_tree_visibility_fields():
    prm = NSAParams(block=8, stride=4, select=16, topn=4, window=32)
    P, parents = 26, torch.tensor([-1, 0, 0, 1, 3, 2])      # positions 26 27 27 28 29 28
    vis = build_tree_visibility(P, parents, prm)
    assert vis.q_pos.tolist() == [26, 27, 27, 28, 29, 28]
    assert vis.k_pos.tolist() == list(range(P)) + [26, 27, 27, 28, 29, 28]
    assert vis.kv_visible[:, :P].all()
    assert vis.kv_visible[4, P:].tolist() == [True, True, False, True, True, False]
    assert vis.ancestors[5].tolist() == [True, False, True, False, False, True]
    # blocks close at positions i*4 + 7: 27 (i=5) by nodes 1 and 2 (siblings)
    assert vis.num_committed_cmp == prm.num_cmp(P) == 5
    assert vis.cmp_nodes.tolist() == [1, 2] and vis.cmp_idx.tolist() == [5, 5]
    assert vis.c_idx.tolist() == [0, 1, 2, 3, 4, 5, 5]
    assert vis.c_visible[:, :5].all()
    assert vis.c_visible[:, 5:].tolist() == [[False, False], [True, False], [False, True],
                                              [True, False], [True, False], [False, True]]


def test_provisional_cmp_equals_compress_over_path():
    prm = NSAParams(block=8, stride=4, select=16, topn=4, window=32)
    P, parents = 26, [-1, 0, 0, 1, 3, 2, 4, 6, 7]
    k_ctx, k_tree = torch.randn(P, 2, 16), torch.randn(len(parents), 2, 16)
    w, b = torch.randn(2, 8), torch.randn(2, 16)
    vis = build_tree_visibility(P, torch.tensor(parents), prm)
    pk = provisional_cmp(k_ctx[-7:], k_tree, torch.tensor(parents), prm, w, b, ctx_len=P)
    assert torch.equal(pk, provisional_cmp(k_ctx, k_tree, torch.tensor(parents), prm, w, b))
    assert pk.shape[0] == vis.cmp_nodes.numel() > 1
    for r, (u, i) in enumerate(zip(vis.cmp_nodes.tolist(), vis.cmp_idx.tolist())):
        path = [u]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        seq = torch.cat([k_ctx, k_tree[path[::-1]]])
        assert torch.equal(pk[r], compress(seq, prm, w, b)[i]), f"node {u}"
    with pytest.raises(ValueError, match="last 7 committed keys"):
        provisional_cmp(k_ctx[-3:], k_tree, torch.tensor(parents), prm, w, b, ctx_len=P)


def test_masked_rejects_bad_inputs():
    prm = NSAParams(block=8, stride=4, select=16, topn=4, window=32)
    q, k = torch.randn(3, 4, 16), torch.randn(10, 2, 16)
    pos = torch.arange(7, 10)
    vis = torch.ones(3, 10, dtype=torch.bool)
    ck, cidx, cvis = torch.zeros(0, 2, 16), torch.zeros(0, dtype=torch.int64), torch.zeros(3, 0, dtype=torch.bool)
    with pytest.raises(ValueError, match="kv_visible"):
        masked_nsa(q, k, k, pos, torch.arange(10), vis.int(), ck, ck, cidx, cvis, prm, 0.25)
    with pytest.raises(ValueError, match="gated"):
        masked_nsa(q, k, k, pos, torch.arange(10), vis, ck, ck, cidx, cvis, prm, 0.25, gates=torch.rand(3, 4, 3))
    with pytest.raises(ValueError, match="out"):
        masked_nsa(q, k, k, pos, torch.arange(10), vis, ck, ck, cidx, cvis, prm, 0.25, out=torch.empty(3, 4))


def _tree_case(nsa, hkv, g, dim, gated, learned, seed):
    prm = NSAParams(**nsa, gated=gated)
    rng = random.Random(seed)
    P, T, hq = 150, 12, hkv * g
    parents = torch.tensor([-1] + [rng.randrange(max(0, u - 3), u) for u in range(1, T)])
    x = dict(q=torch.randn(T, hq, dim), k_ctx=torch.randn(P, hkv, dim),
             v_ctx=torch.randn(P, hkv, dim), k_tree=torch.randn(T, hkv, dim),
             v_tree=torch.randn(T, hkv, dim))
    gates = torch.rand(T, hq, 3) if gated else None
    return prm, parents, x, gates, _weights(prm, hkv, dim, learned), dim ** -0.5


def _masked(prm, parents, x, gates, cw, scale, **given):
    return _run_masked(x["q"], x["k_ctx"], x["v_ctx"], x["k_tree"], x["v_tree"], parents, prm,
                       scale, cw, gates, chunk=5, **given)


def _naive(prm, parents, x, gates, cw, scale, sel=None):
    return naive_nsa_tree(x["q"], x["k_ctx"], x["v_ctx"], x["k_tree"], x["v_tree"], parents,
                          prm, scale, cw, gates, sel=sel)


@pytest.mark.parametrize("nsa, hkv, g, dim, gated, learned", CASES)
def test_given_selection_matches_naive(nsa, hkv, g, dim, gated, learned):
    """Index reuse: masked_nsa(sel=X) attends with X (another layer's selection) exactly as
    the reference given X; its own selection given back changes nothing."""
    prm, parents, x, gates, cw, scale = _tree_case(nsa, hkv, g, dim, gated, learned, 7)
    o_own, sel_own = _masked(prm, parents, x, gates, cw, scale)
    o_same, sel_same = _masked(prm, parents, x, gates, cw, scale, sel=sel_own.clone())
    assert torch.equal(sel_same, sel_own) and torch.equal(o_same, o_own)
    # another query set's selection ("another layer"): a fresh random q gives other blocks
    other = dict(x, q=torch.randn_like(x["q"]))
    _, sel_other = _masked(prm, parents, other, gates, cw, scale)
    assert not torch.equal(sel_other, sel_own)
    o, sel = _masked(prm, parents, x, gates, cw, scale, sel=sel_other)
    o_ref, _ = _naive(prm, parents, x, gates, cw, scale, sel=sel_other)
    assert torch.equal(sel, sel_other)
    assert_close(o, o_ref, what="given selection")


@pytest.mark.parametrize("nsa, hkv, g, dim, gated, learned", CASES)
def test_shared_selection_matches_naive(nsa, hkv, g, dim, gated, learned):
    """SHARED_INDEX: masked_nsa(sel_src=src) attends with the selection each query's source
    computes, as the reference given those selections; src = identity is exact NSA."""
    from specsa.config import Traversal
    from specsa.schedule import shared_sources

    prm, parents, x, gates, cw, scale = _tree_case(nsa, hkv, g, dim, gated, learned, 9)
    o_own, sel_own = _masked(prm, parents, x, gates, cw, scale)
    ident = torch.arange(parents.shape[0])
    o_id, sel_id = _masked(prm, parents, x, gates, cw, scale, sel_src=ident)
    assert torch.equal(sel_id, sel_own) and torch.equal(o_id, o_own)
    src = torch.tensor(shared_sources(parents.tolist(), Traversal.BFS, 4))
    assert not torch.equal(src, ident)
    assert not torch.equal(sel_own[src], sel_own), "sharing should change some selection"
    o, sel = _masked(prm, parents, x, gates, cw, scale, sel_src=src)
    assert torch.equal(sel, sel_own[src])
    o_ref, _ = _naive(prm, parents, x, gates, cw, scale, sel=sel_own[src])
    assert_close(o, o_ref, what="shared selection")
    with pytest.raises(ValueError, match="not both"):
        _masked(prm, parents, x, gates, cw, scale, sel=sel_own, sel_src=src)
