"""GPU check of the refresh / compression / commit / prefill kernels at full shapes.

    python benchmark/gpu_check_refresh.py [--out DIR]

Correctness vs the fp32 references (64K context, Hq=32, Hkv=8, D=128, bf16, page 64) and
median times (triton.testing.do_bench) with bytes-that-must-move / measured copy bandwidth
as the floor. Writes refresh_check.json to --out (default: current directory).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench

from specsa.kernels.commit import fused_commit, naive_commit
from specsa.kernels.common.params import NSAParams
from specsa.kernels.compression import (compress, compress_paged, naive_block_scores,
                                        naive_cmp_attention)
from specsa.kernels.nsa.masked import build_tree_visibility, provisional_cmp
from specsa.kernels.prefill import chunked_nsa_prefill, naive_nsa_prefill_rows
from specsa.kernels.refresh import ProvisionalTokens, RefreshArgs, score_topk
from specsa.kernels.selection import naive_topk

DEV, DT = "cuda", torch.bfloat16
HQ, HKV, D, PS, L = 32, 8, 128, 64, 65536
P = NSAParams()
SCALE = D ** -0.5


def make_pool(nb, length, extra=128):
    npg = -(-(length + extra) // PS)
    bt = torch.randperm(nb * npg, device=DEV).to(torch.int32).view(nb, npg)
    kc = torch.randn(nb * npg, PS, HKV, D, device=DEV, dtype=DT)
    vc = torch.randn(nb * npg, PS, HKV, D, device=DEV, dtype=DT)
    cpp = P.cmp_per_page(PS)
    ckc = torch.full((nb * npg, cpp, HKV, D), float("nan"), device=DEV, dtype=DT)
    cvc = ckc.clone()
    return kc, vc, ckc, cvc, bt


def read_seq(cache, bt_row, n):
    pos = torch.arange(n, device=DEV)
    return cache[bt_row.long()[pos // PS], pos % PS]


def read_cmp(cache, bt_row, n):
    i = torch.arange(n, device=DEV)
    e = i * P.stride + P.block - 1
    lp = e // PS
    lo = (lp * PS - (P.block - 1)).clamp(min=0)
    return cache[bt_row.long()[lp], i - (lo + P.stride - 1) // P.stride]


def median_us(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    out_dir = ap.parse_args().out
    res = {"gpu": torch.cuda.get_device_name(), "shape": dict(Hq=HQ, Hkv=HKV, D=D, page=PS, ctx=L, dtype="bf16")}
    torch.manual_seed(0)
    x = torch.empty(1 << 29, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    t_copy = median_us(lambda: y.copy_(x))
    bw = 2 * x.numel() / (t_copy * 1e-6)
    res["copy_GBps"] = bw / 1e9
    del x, y

    # ---- correctness: compression at 64K ----
    kc, vc, ckc, cvc, bt = make_pool(2, L)
    lens = torch.tensor([L, L - 37], device=DEV, dtype=torch.int32)
    compress_paged(kc, vc, ckc, cvc, bt, torch.zeros_like(lens), lens, P, num_programs=64)
    err = 0.0
    for b in range(2):
        n = int(lens[b])
        ref = compress(read_seq(kc, bt[b], n), P)
        err = max(err, (read_cmp(ckc, bt[b], P.num_cmp(n)).float() - ref).abs().max().item())
    res["compress_paged_maxabs"] = err

    # ---- correctness: score_topk, decode rows + a tree with provisional tokens (req 0 at P=L) ----
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], device=DEV)
    nt = parents.numel()
    vis = build_tree_visibility(L, parents, P)
    k_tree = torch.randn(nt, HKV, D, device=DEV, dtype=DT)
    v_tree = torch.randn(nt, HKV, D, device=DEV, dtype=DT)
    kctx = read_seq(kc, bt[0], L)[-(P.block - 1):].float()
    vctx = read_seq(vc, bt[0], L)[-(P.block - 1):].float()
    pk = provisional_cmp(kctx, k_tree.float(), parents, P, ctx_len=L).to(DT)
    pv = provisional_cmp(vctx, v_tree.float(), parents, P, ctx_len=L).to(DT)
    rows_t = [L - 1, L - 1000, 40000, 777, L - 40]
    q_req = [0, 0, 1, 1, 1] + [0] * nt
    q_pos = rows_t + vis.q_pos.tolist()
    nq = len(q_pos)
    q = torch.randn(nq, HQ, D, device=DEV, dtype=DT)
    vis_rows = [[r for r, v in enumerate(vis.cmp_nodes.tolist()) if bool(vis.ancestors[u, v])] for u in range(nt)]
    mp = max([len(r) for r in vis_rows] + [1])
    prov_vis = torch.full((nq, mp), -1, dtype=torch.int32, device=DEV)
    for u, r in enumerate(vis_rows):
        if r:
            prov_vis[len(rows_t) + u, : len(r)] = torch.tensor(r, dtype=torch.int32)
    cmp_lens = torch.tensor([P.num_cmp(L), P.num_cmp(L - 37)], dtype=torch.int32, device=DEV)
    sel, o_cmp, lse = score_topk(RefreshArgs(
        q, ckc, cvc, bt, torch.tensor(q_req, dtype=torch.int32, device=DEV),
        torch.tensor(q_pos, dtype=torch.int32, device=DEV), cmp_lens, P, SCALE, PS,
        prov=ProvisionalTokens(pk, pv, vis.cmp_idx.to(torch.int32), prov_vis), with_out=True))
    agree, o_err = 0, 0.0
    for r in range(nq):
        b, t = q_req[r], q_pos[r]
        nc = min(int(cmp_lens[b]), P.num_cmp(t + 1))
        ck, cv = read_cmp(ckc, bt[b], nc).float(), read_cmp(cvc, bt[b], nc).float()
        cidx = torch.arange(nc, device=DEV)
        pr = prov_vis[r][prov_vis[r] >= 0].long()
        ck, cv = torch.cat([ck, pk[pr].float()]), torch.cat([cv, pv[pr].float()])
        cidx = torch.cat([cidx, vis.cmp_idx[pr]])
        o_ref, p_ref = naive_cmp_attention(q[r].float(), ck, cv, SCALE)
        s_ref = naive_topk(naive_block_scores(p_ref, t, P, c_idx=cidx, num_kv_heads=HKV), t, P)
        agree += int((sel[r].long() == s_ref).all(-1).sum())
        o_err = max(o_err, (o_cmp[r].float() - o_ref).abs().max().item())
    res["score_topk_sel_rows_equal"] = f"{agree}/{nq * HKV}"
    res["score_topk_o_cmp_maxabs"] = o_err

    # ---- correctness: fused commit vs naive (req 0 accepts the path to node 13) ----
    par = parents.tolist()
    u, path = 13, []
    while u >= 0:
        path.append(u)
        u = par[u]
    path = path[::-1]
    caches = [kc, vc, ckc, cvc]
    ref = [c.clone() for c in caches]
    path_rows = torch.full((2, 16), -1, dtype=torch.int32, device=DEV)
    path_rows[0, : len(path)] = torch.tensor(path, dtype=torch.int32)
    pc = [r for r, v in enumerate(vis.cmp_nodes.tolist()) if v in path]
    path_cmp = torch.full((2, 4), -1, dtype=torch.int32, device=DEV)
    if pc:
        path_cmp[0, : len(pc)] = torch.tensor(pc, dtype=torch.int32)
    args = dict(block_table=bt, seq_lens=lens, k_tail=k_tree, v_tail=v_tree, path_rows=path_rows,
                prov_k=pk, prov_v=pv, prov_cidx=vis.cmp_idx.to(torch.int32), path_cmp=path_cmp, params=P)
    fused_commit(*caches, **args)
    naive_commit(*ref, **args)
    res["fused_commit_equal"] = all(torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)) for a, b in zip(caches, ref))
    del ref

    # ---- correctness: chunked prefill (chunk = last 512 positions of req 1), sampled rows ----
    n1 = L - 37
    chunk = torch.arange(n1 - 512, n1, device=DEV, dtype=torch.int32)
    qp = torch.randn(512, HQ, D, device=DEV, dtype=DT)
    ckc[:] = float("nan")
    cvc[:] = float("nan")
    compress_paged(kc, vc, ckc, cvc, bt[1:], torch.zeros(1, dtype=torch.int32, device=DEV),
                   torch.tensor([n1 - 512], dtype=torch.int32, device=DEV), P, num_programs=64)
    o_p, s_p = chunked_nsa_prefill(qp, kc, vc, ckc, cvc, bt[1:], torch.zeros(512, dtype=torch.int32, device=DEV),
                                   chunk, torch.tensor([n1 - 512], dtype=torch.int32, device=DEV),
                                   torch.tensor([n1], dtype=torch.int32, device=DEV), P, SCALE)
    pick = [0, 100, 511]
    kseq, vseq = read_seq(kc, bt[1], n1).float(), read_seq(vc, bt[1], n1).float()
    o_ref, s_ref = naive_nsa_prefill_rows(qp[pick].float(), kseq, vseq, [int(chunk[i]) for i in pick], P, SCALE)
    res["prefill_sel_rows_equal"] = f"{int((s_p[pick].long() == s_ref).all(-1).sum())}/{len(pick) * HKV}"
    res["prefill_out_maxabs"] = (o_p[pick].float() - o_ref).abs().max().item()
    print(json.dumps(res, indent=1), flush=True)
    del kc, vc, ckc, cvc

    # ---- timings ----
    times = {}
    for nb in (1, 16):
        kc, vc, ckc, cvc, bt = make_pool(nb, L)
        full = torch.full((nb,), L, dtype=torch.int32, device=DEV)
        compress_paged(kc, vc, ckc, cvc, bt, torch.zeros_like(full), full, P, num_programs=64)
        cl = torch.full((nb,), P.num_cmp(L), dtype=torch.int32, device=DEV)
        cmp_bytes = nb * P.num_cmp(L) * HKV * D * 2
        for T in (1, 16, 64):
            qr = torch.arange(nb, device=DEV, dtype=torch.int32).repeat_interleave(T)
            qp_ = (L - T + torch.arange(T, device=DEV, dtype=torch.int32)).repeat(nb)
            qq = torch.randn(nb * T, HQ, D, device=DEV, dtype=DT)
            for wo in (False, True):
                a = RefreshArgs(qq, ckc, cvc, bt, qr, qp_, cl, P, SCALE, PS, with_out=wo)
                us = median_us(lambda: score_topk(a))
                floor = (cmp_bytes * (2 if wo else 1)) / bw * 1e6
                times[f"score_topk B{nb} T{T} out={wo}"] = dict(us=us, floor_us=floor, ratio=us / floor)
        old = full - 1
        us = median_us(lambda: compress_paged(kc, vc, ckc, cvc, bt, old, full, P, num_programs=1))
        times[f"compress_paged decode B{nb}"] = dict(us=us)
        pr = torch.arange(8, device=DEV, dtype=torch.int32).repeat(nb, 1)
        kt = torch.randn(8, HKV, D, device=DEV, dtype=DT)
        pcm = torch.full((nb, 1), -1, dtype=torch.int32, device=DEV)
        sl = full - 200
        us = median_us(lambda: fused_commit(kc, vc, ckc, cvc, bt, sl, kt, kt, pr, kt, kt,
                                            torch.zeros(8, dtype=torch.int32, device=DEV), pcm, P))
        times[f"fused_commit a=8 B{nb}"] = dict(us=us, floor_us=nb * 8 * HKV * D * 2 * 4 / bw * 1e6)
        if nb == 1:
            for C in (1024, 4096):
                ch = torch.arange(L - C, L, device=DEV, dtype=torch.int32)
                qc = torch.randn(C, HQ, D, device=DEV, dtype=DT)
                z = torch.zeros(C, dtype=torch.int32, device=DEV)
                pre = torch.tensor([L - C], dtype=torch.int32, device=DEV)
                us = median_us(lambda: chunked_nsa_prefill(qc, kc, vc, ckc, cvc, bt, z, ch, pre, full, P, SCALE))
                times[f"prefill chunk {C} at 64K"] = dict(us=us)
        print(json.dumps(times, indent=1), flush=True)
        del kc, vc, ckc, cvc
        torch.cuda.empty_cache()
    res["times"] = times
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "refresh_check.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
