"""Refresh kernel (kernels/refresh/per_row.py) vs the fp32 references: compressed
attention (o, lse) close, selections exactly equal (ties -> lower block index)."""
from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import assert_close, poisoned, on_device  # noqa: E402
from test_compress_kernel import DEFAULT, SMALL, make_pool  # noqa: E402

from specsa.kernels.common.params import NSAParams  # noqa: E402
from specsa.kernels.compression import compress, naive_block_scores, naive_cmp_attention  # noqa: E402
from specsa.kernels.refresh import ProvisionalTokens, RefreshArgs, score_topk  # noqa: E402
from specsa.kernels.nsa.masked import build_tree_visibility, provisional_cmp  # noqa: E402
from specsa.kernels.common.tree import tree_path  # noqa: E402
from specsa.kernels.selection import naive_topk  # noqa: E402

# compiled kernels take device tensors; these tests build CPU ones (conftest.on_device)
score_topk = on_device(score_topk)


def reference_row(q, k_path, v_path, params, scale, dtype):
    """(sel [Hkv, n], o_cmp [Hq, D], lse [Hq]) of one query over its path; compressed tokens are
    rounded to the cache dtype, as the kernel reads them from a cache of that dtype."""
    t, hkv = k_path.shape[0] - 1, k_path.shape[1]
    ck = compress(k_path, params).to(dtype).float()
    cv = compress(v_path, params).to(dtype).float()
    o, p = naive_cmp_attention(q.float(), ck, cv, scale)
    sel = naive_topk(naive_block_scores(p, t, params, num_kv_heads=hkv), t, params)
    g = q.shape[0] // hkv
    if ck.shape[0]:
        logits = torch.einsum("hd,chd->hc", q.float(), ck.repeat_interleave(g, dim=1)) * scale
        lse = torch.logsumexp(logits, dim=1)
    else:
        lse = torch.full((q.shape[0],), float("-inf"))
    return sel, o, lse


def build_case(params, ps, hkv, g, dim, dtype, ctx_lens, row_pos, tree_parents, tree_P, zero_q=False):
    """Request 0..: linear rows at row_pos[b] over committed sequences; last request: a draft
    tree below tree_P committed tokens. Returns kernel inputs and per-row references."""
    lens = list(ctx_lens) + [tree_P]
    pool = make_pool(lens, ps, hkv, dim, dtype, params, extra=len(tree_parents))
    hq, scale = hkv * g, dim ** -0.5
    q_req, q_pos, paths = [], [], []
    for b, rows in enumerate(row_pos):
        for t in rows:
            q_req.append(b)
            q_pos.append(t)
            paths.append((pool["k"][b][: t + 1], pool["v"][b][: t + 1]))
    tb = len(ctx_lens)
    parents = torch.tensor(tree_parents)
    vis = build_tree_visibility(tree_P, parents, params)
    nt = len(tree_parents)
    k_tree = torch.randn(nt, hkv, dim).to(dtype).float()
    v_tree = torch.randn(nt, hkv, dim).to(dtype).float()
    par = parents.tolist()
    for u in range(nt):
        nodes = tree_path(u, par)
        q_req.append(tb)
        q_pos.append(int(vis.q_pos[u]))
        paths.append((torch.cat([pool["k"][tb], k_tree[nodes]]), torch.cat([pool["v"][tb], v_tree[nodes]])))
    nq = len(q_pos)
    q = (torch.zeros if zero_q else torch.randn)(nq, hq, dim).to(dtype)
    pk = provisional_cmp(pool["k"][tb], k_tree, parents, params).to(dtype)
    pv = provisional_cmp(pool["v"][tb], v_tree, parents, params).to(dtype)
    vis_rows = [[r for r, v in enumerate(vis.cmp_nodes.tolist()) if bool(vis.ancestors[u, v])] for u in range(nt)]
    mp = max([len(r) for r in vis_rows] + [1])
    prov_vis = torch.full((nq, mp), -1, dtype=torch.int32)
    for u, rows in enumerate(vis_rows):
        prov_vis[nq - nt + u, : len(rows)] = torch.tensor(rows, dtype=torch.int32)
    args = dict(q=q, ck_cache=pool["ck_cache"], cv_cache=pool["cv_cache"], block_table=pool["block_table"],
                q_req=torch.tensor(q_req, dtype=torch.int32), q_pos=torch.tensor(q_pos, dtype=torch.int32),
                cmp_lens=torch.tensor([params.num_cmp(n) for n in lens], dtype=torch.int32),
                params=params, scale=scale, page_size=ps,
                prov=ProvisionalTokens(pk, pv, vis.cmp_idx.to(torch.int32), prov_vis))
    refs = [reference_row(q[i], kp, vp, params, scale, dtype) for i, (kp, vp) in enumerate(paths)]
    return args, refs


def run_and_check(args, refs, dtype, with_out=True):
    q = args["q"]
    nq, hq, dim = q.shape
    hkv, n = args["ck_cache"].shape[2], args["params"].topn
    sel = torch.full((nq, hkv, n), -7, dtype=torch.int32)
    o_cmp, lse = poisoned(nq, hq, dim, dtype=dtype), poisoned(nq, hq)
    score_topk(RefreshArgs(**args, with_out=with_out, sel=sel, o_cmp=o_cmp, lse=lse))
    ref_sel = torch.stack([r[0] for r in refs]).to(torch.int32)
    bad = (sel != ref_sel).any(-1).nonzero().tolist()
    assert not bad, f"selection differs at (row, kv head) {bad[:5]}: {sel[bad[0][0], bad[0][1]].tolist()} vs " \
                    f"{ref_sel[bad[0][0], bad[0][1]].tolist()}"
    if with_out:
        assert_close(o_cmp, torch.stack([r[1] for r in refs]), dtype, "o_cmp")
        ref_lse = torch.stack([r[2] for r in refs])
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin), "lse must be -inf exactly where no compressed token exists"
        assert_close(lse[fin], ref_lse[fin], torch.float32 if dtype == torch.float32 else dtype, "lse")


CASES = [
    # params, page size, Hkv, G, D, dtype, contexts, row positions, tree parents, tree P
    pytest.param(SMALL, 16, 2, 1, 64, torch.float32, [150], [[0, 7, 8, 47, 48, 99, 149]],
                 [-1, 0, 0, 1, 1, 2, 3], 61, id="small-ps16-G1-fp32"),
    pytest.param(SMALL, 1, 1, 4, 64, torch.bfloat16, [230], [[20, 131, 229]],
                 [-1, 0, 1, 1, 2, 4], 90, id="small-ps1-G4-bf16"),
    pytest.param(SMALL, 16, 2, 6, 128, torch.float32, [300, 12], [[299, 170], [11]],
                 [-1, 0, 1, 2, 3, 4, 5, 6, 7], 250, id="small-ps16-G6-D128-fp32-chain"),
    pytest.param(DEFAULT, 64, 1, 4, 64, torch.float32, [1100], [[1099, 700]],
                 [-1, 0, 0, 1, 2], 1087, id="default-ps64-G4-fp32-ctx1100"),
    pytest.param(DEFAULT, 16, 2, 1, 128, torch.bfloat16, [], [],
                 [-1, 0, 1, 2, 0], 1050, id="default-ps16-G1-bf16-tree"),
]


@pytest.mark.parametrize("params,ps,hkv,g,dim,dtype,ctx,rows,parents,P", CASES)
def test_score_topk(params, ps, hkv, g, dim, dtype, ctx, rows, parents, P):
    args, refs = build_case(params, ps, hkv, g, dim, dtype, ctx, rows, parents, P)
    run_and_check(args, refs, dtype)


def test_score_topk_ties_go_to_lower_index():
    # q = 0 -> uniform p = 1/64 (exact): interior blocks tie exactly, the lowest indices win
    params = NSAParams(block=8, stride=4, select=16, topn=6, window=32)
    args, refs = build_case(params, 16, 1, 3, 64, torch.float32, [260], [[259]], [-1], 20, zero_q=True)
    run_and_check(args, refs, torch.float32)
    prov = dataclasses.replace(args["prov"], vis=args["prov"].vis[:1])
    sel, _, _ = score_topk(RefreshArgs(**{**args, "q": args["q"][:1], "q_req": args["q_req"][:1],
                                          "q_pos": args["q_pos"][:1], "prov": prov}))
    assert sel[0, 0].tolist() == [0, 1, 2, 3, 15, 16]  # t=259: local blocks 15, 16


def test_score_topk_without_provisional_and_no_out():
    args, refs = build_case(SMALL, 16, 2, 2, 64, torch.float32, [90], [[89, 30]], [-1], 10)
    args["prov"] = None
    nctx = 2
    sel, o_cmp, lse = score_topk(RefreshArgs(**{**args, "q": args["q"][:nctx], "q_req": args["q_req"][:nctx],
                                                "q_pos": args["q_pos"][:nctx]}, with_out=False))
    assert o_cmp is None and lse is None
    assert torch.equal(sel, torch.stack([r[0] for r in refs[:nctx]]).to(torch.int32))
