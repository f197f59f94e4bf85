"""Grouped split refresh kernel (kernels/refresh/grouped.py) vs the fp32
references: selections exactly equal on fp32 inputs (ties -> lower block index); on bf16 a
differing selection is accepted only where the reference's n-th and (n+1)-th free-candidate
scores are within a tiny relative gap; o_cmp / lse close; outputs NaN-poisoned first."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import assert_close, poisoned  # noqa: E402
from test_compress_kernel import DEFAULT, SMALL, make_pool  # noqa: E402

from specsa.kernels.common.params import NSAParams  # noqa: E402
from specsa.kernels.compression import compress, naive_block_scores, naive_cmp_attention  # noqa: E402
from specsa.kernels.common.launch import split_counters  # noqa: E402
from specsa.kernels.refresh import ProvisionalTokens, RefreshArgs, refresh_groups, refresh_workspace, score_topk_grouped  # noqa: E402
from specsa.kernels.fused import build_geometry  # noqa: E402
from specsa.kernels.nsa.masked import build_tree_visibility, provisional_cmp  # noqa: E402
from specsa.kernels.common.tree import tree_path  # noqa: E402
from specsa.kernels.selection import naive_topk  # noqa: E402
from specsa.kernels.selection.naive import forced_blocks  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NEAR_TIE = 1e-5    # relative gap under which a bf16 selection may legitimately flip


def reference_row(q, k_path, v_path, params, scale, dtype):
    """(sel [Hkv, n], o_cmp [Hq, D], lse [Hq], scores [Hkv, Nsel]) of one query over its path;
    compressed tokens rounded to the cache dtype, as the kernel reads them."""
    t, hkv = k_path.shape[0] - 1, k_path.shape[1]
    ck = compress(k_path, params).to(dtype).float()
    cv = compress(v_path, params).to(dtype).float()
    o, p = naive_cmp_attention(q.float(), ck, cv, scale)
    scores = naive_block_scores(p, t, params, num_kv_heads=hkv)
    sel = naive_topk(scores, t, params)
    g = q.shape[0] // hkv
    if ck.shape[0]:
        logits = torch.einsum("hd,chd->hc", q.float(), ck.repeat_interleave(g, dim=1)) * scale
        lse = torch.logsumexp(logits, dim=1)
    else:
        lse = torch.full((q.shape[0],), float("-inf"))
    return sel, o, lse, scores


def build_case(params, ps, hkv, g, dim, dtype, ctx_lens, row_pos, tree_parents, tree_P, zero_q=False):
    """Requests 0..: linear (decode / prefill-like) rows at row_pos[b]; last request: a draft
    tree below tree_P committed tokens (provisional compressed tokens where its nodes close a
    block). Returns kernel arguments (CPU) and per-row references."""
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
    for u in range(nt):
        nodes = tree_path(u, parents.tolist())
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
    i32 = dict(dtype=torch.int32)
    args = dict(q=q, ck_cache=pool["ck_cache"], cv_cache=pool["cv_cache"], block_table=pool["block_table"],
                q_req=torch.tensor(q_req, **i32), q_pos=torch.tensor(q_pos, **i32),
                cmp_lens=torch.tensor([params.num_cmp(n) for n in lens], **i32),
                params=params, scale=scale, page_size=ps,
                prov=ProvisionalTokens(pk, pv, vis.cmp_idx.to(torch.int32), prov_vis))
    refs = [reference_row(q[i], kp, vp, params, scale, dtype) for i, (kp, vp) in enumerate(paths)]
    return args, refs


def to_dev(args):
    def move(v):
        if isinstance(v, ProvisionalTokens):
            return ProvisionalTokens(*(x.to(DEV) for x in (v.k, v.v, v.cidx, v.vis)))
        return v.to(DEV) if isinstance(v, torch.Tensor) else v
    return {k: move(v) for k, v in args.items()}


def near_tie(scores: torch.Tensor, t: int, params: NSAParams) -> bool:
    """True when the reference's last chosen and first rejected free candidates (one KV head's
    scores [Nsel]) are within NEAR_TIE relative of each other."""
    forced = set(forced_blocks(t, params))
    free = sorted((float(s) for j, s in enumerate(scores.tolist()) if j not in forced), reverse=True)
    k = params.topn - len(forced)
    if k <= 0 or len(free) <= k:
        return False
    a, b = free[k - 1], free[k]
    return abs(a - b) <= NEAR_TIE * max(abs(a), abs(b), 1e-30)


def check(args, refs, dtype, with_out, exact, **kw):
    q = args["q"]
    nq, hq, dim = q.shape
    hkv, n = args["ck_cache"].shape[2], args["params"].topn
    sel = torch.full((nq, hkv, n), -7, dtype=torch.int32, device=DEV)
    o_cmp, lse = poisoned(nq, hq, dim, dtype=dtype, device=DEV), poisoned(nq, hq, device=DEV)
    bufs = dict(o_cmp=o_cmp, lse=lse) if with_out else {}
    out = score_topk_grouped(RefreshArgs(**to_dev(args), with_out=with_out, sel=sel, **bufs), **kw)
    sel = sel.cpu()
    ref_sel = torch.stack([r[0] for r in refs]).to(torch.int32)
    bad = (sel != ref_sel).any(-1).nonzero().tolist()
    if exact:
        assert not bad, f"selection differs at (row, kv head) {bad[:5]}: {sel[bad[0][0], bad[0][1]].tolist()} " \
                        f"vs {ref_sel[bad[0][0], bad[0][1]].tolist()}"
    else:
        pos = args["q_pos"].tolist()
        far = [(r, h) for r, h in bad if not near_tie(refs[r][3][h], pos[r], args["params"])]
        assert not far, f"selection differs away from a near tie at (row, kv head) {far[:5]}"
        assert len(bad) <= max(1, sel.shape[0] * sel.shape[1] // 20), f"too many near-tie flips: {bad}"
    if with_out:
        assert out[1] is o_cmp and out[2] is lse
        assert_close(o_cmp.cpu(), torch.stack([r[1] for r in refs]), dtype, "o_cmp")
        ref_lse = torch.stack([r[2] for r in refs])
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse.cpu()), fin), "lse must be -inf exactly where no compressed token exists"
        assert_close(lse.cpu()[fin], ref_lse[fin], torch.float32 if dtype == torch.float32 else dtype, "lse")
    else:
        assert out[1] is None and out[2] is None, "with_out=False returns no o_cmp / lse"
    return sel


CASES = [
    # params, page, Hkv, G, D, dtype, contexts, row positions, tree parents, tree P, C, splits, out
    pytest.param(SMALL, 16, 2, 1, 64, torch.float32, [150], [[0, 7, 47, 48, 149]],
                 [-1, 0, 0, 1, 1, 2, 3], 61, 4, 2, True, id="ps16-G1-fp32-C4-S2-gated"),
    pytest.param(SMALL, 1, 1, 4, 64, torch.bfloat16, [230], [[131, 229]],
                 [-1, 0, 1, 1, 2, 4], 90, 8, 1, False, id="ps1-G4-bf16-C8-S1-union"),
    pytest.param(SMALL, 16, 1, 6, 128, torch.float32, [300, 12], [[299], [11]],
                 [-1, 0, 1, 2, 3, 4, 5, 6], 250, 8, 3, True, id="ps16-G6-D128-fp32-chain-C8-S3"),
    pytest.param(DEFAULT, 16, 1, 4, 64, torch.float32, [1100], [[1099]],
                 [-1, 0, 0, 1, 2], 1087, 1, 4, True, id="default-G4-decode-rows-C1-S4"),
    pytest.param(SMALL, 16, 1, 4, 64, torch.bfloat16, [], [],
                 [-1, 0, 1, 2, 0, 4, 1, 6, 7], 205, 16, 2, True, id="ps16-G4-bf16-tree-C16-S2"),
    pytest.param(SMALL, 16, 1, 2, 64, torch.float32, [700], [[699, 400]],
                 [-1, 0, 1], 520, 4, 1, False, id="ps16-G2-multitile-S1"),
    pytest.param(SMALL, 16, 1, 2, 64, torch.float32, [700], [[699, 400]],
                 [-1, 0, 1], 520, 4, 2, True, id="ps16-G2-multitile-S2"),
]


# merge: the interpreter default (rank) and the GPU default (bitonic)
VARIANTS = [pytest.param("auto", id="auto"), pytest.param("bitonic", id="bitonic")]


@pytest.mark.parametrize("merge", VARIANTS)
@pytest.mark.parametrize("params,ps,hkv,g,dim,dtype,ctx,rows,parents,P,c,ns,with_out", CASES)
def test_score_topk_grouped(params, ps, hkv, g, dim, dtype, ctx, rows, parents, P, c, ns, with_out,
                            merge):
    args, refs = build_case(params, ps, hkv, g, dim, dtype, ctx, rows, parents, P)
    groups = tuple(x.to(DEV) for x in refresh_groups(args["q_req"].tolist(), c))
    check(args, refs, dtype, with_out, exact=dtype == torch.float32, group_size=c, groups=groups,
          num_splits=ns, merge=merge, stats_tile=32 if ns == 2 else None)


@pytest.mark.parametrize("ns", [1, 2])
def test_plan_groups_permuted_order(ns):
    # the group cuts of a verifier's step metadata (VerifyGeometry: BFS-like order, groups of 3, an unused slot)
    parents = [-1, 0, 0, 1, 2, 3, 3]
    args, refs = build_case(SMALL, 16, 1, 2, 64, torch.float32, [], [], parents, 97)
    order = [0, 2, 1, 4, 3, 6, 5]
    geo = build_geometry([parents], [97], args["block_table"][:1].to(DEV), [order], 3, SMALL.window, 1)
    g_start = torch.cat([geo.g_start, torch.tensor([0], dtype=torch.int32, device=DEV)])
    g_len = torch.cat([geo.g_len, torch.tensor([0], dtype=torch.int32, device=DEV)])  # unused slot
    check(args, refs, torch.float32, True, exact=True, group_size=geo.C,
          groups=(geo.order, g_start, g_len), num_splits=ns)


@pytest.mark.parametrize("merge", ["rank", "bitonic"])
def test_ties_go_to_lower_index_across_splits(merge):
    # q = 0 -> uniform p (exact): interior blocks tie exactly; the lowest indices must win, also
    # when the tied blocks sit in different splits (the merge's tie order)
    params = NSAParams(block=8, stride=4, select=16, topn=6, window=32)
    args, refs = build_case(params, 16, 1, 3, 64, torch.float32, [600], [[599, 259]], [-1], 20, zero_q=True)
    sel = check(args, refs, torch.float32, False, exact=True, group_size=2, num_splits=3, merge=merge)
    check(args, refs, torch.float32, False, exact=True, group_size=2, num_splits=1, merge=merge)
    assert sel[1, 0].tolist() == [0, 1, 2, 3, 15, 16]  # t=259: local blocks 15, 16


def test_no_provisional_default_groups_and_workspace():
    args, refs = build_case(SMALL, 16, 2, 2, 64, torch.float32, [90, 70], [[89, 30], [69]], [-1], 10)
    nctx = 3
    args["prov"] = None
    for key in ("q", "q_req", "q_pos"):
        args[key] = args[key][:nctx]
    ws = refresh_workspace(nctx, 4, 2, 64, SMALL, 2, True, DEV)
    # group_size 2 without groups: built from q_req on the host (rows of one request only);
    # the workspace serves two launches (as CUDA-graph replays do): the last split of each
    # (group, KV head) merges, and leaves its counter zero for the next launch
    for _ in range(2):
        check(args, refs[:nctx], torch.float32, True, exact=True, group_size=2, num_splits=2,
              workspace=ws)
        assert int(ws[-1].abs().sum()) == 0, ws[-1]
    check(args, refs[:nctx], torch.float32, False, exact=True)        # defaults: rows alone
    # split without a workspace: the device's shared counters, zero again after the launch
    check(args, refs[:nctx], torch.float32, True, exact=True, group_size=2, num_splits=3)
    assert int(split_counters(DEV, 4096).abs().sum()) == 0


def test_bad_inputs_are_named():
    args, _ = build_case(SMALL, 16, 1, 2, 64, torch.float32, [40], [[39]], [-1], 10)
    args = RefreshArgs(**args)
    with pytest.raises(ValueError, match="group_size"):
        score_topk_grouped(args, group_size=65)
    with pytest.raises(ValueError, match="workspace too small"):
        score_topk_grouped(args, num_splits=2, workspace=refresh_workspace(1, 2, 1, 64, SMALL, 1, True, "cpu"))
    with pytest.raises(ValueError, match="merge must be"):
        score_topk_grouped(args, merge="heap")
    with pytest.raises(ValueError, match="stats_tile"):
        score_topk_grouped(args, stats_tile=24)
    with pytest.raises(ValueError, match="groups must be"):
        score_topk_grouped(args, groups=(torch.zeros(5, dtype=torch.int32),) * 3)
