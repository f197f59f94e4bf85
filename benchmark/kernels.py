"""NSA verification / decode kernels on one GPU: correctness at full shapes, then median time
(CUDA graphs, cold L2) of INDEPENDENT, EXACT_MERGED, SHARED_INDEX and dense tree verification
against the memory floor, over contexts, tree sizes / shapes, batch and selection overlap.

    python benchmark/kernels.py --out $OUT            # H200: < 8 minutes, one call
    python benchmark/kernels.py --out $OUT --only refresh,fullstep   # just the new sections
    TRITON_INTERPRET=1 python benchmark/kernels.py --smoke --out /tmp/b   # CPU plumbing check

Sections (--only, comma list; default all): correctness, decode, head, sweep, grid, d64, tune,
refresh (the refresh kernel alone: per-row `score_topk` vs grouped `score_topk_grouped`, batch 1
decode and batch 16 x T=64 tree rows, with selection agreement), fullstep (a full verification
step = refresh + sparse attention: INDEPENDENT = per-row score_topk + independent verify,
EXACT_MERGED = grouped refresh + exact_merged verify, 64K, T in {16, 64}, batch 1 and 16,
overlap ~0.5, floor = compressed tokens + window + union of selected blocks each read once).
The verify half of fullstep uses the synthetic selections (controlled overlap), the refresh half
writes its own selection buffer: the refresh's time does not depend on which blocks win.

Writes kernels.json (rewritten after every point, so a failure keeps earlier results) and PNG
plots. Floors: bytes that must move / measured copy bandwidth. "attn" bytes = the union over a
request's T queries of (selected-block tokens U window tokens) once per KV head + the draft
tail + q/out; "full" adds the committed compressed tokens (read by the refresh kernel, not
timed here). Overlap: mean over adjacent verifier queries (flat order) and KV heads of
|sel_i & sel_j| / topn, measured on the synthetic selections actually used.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import L2Flush, bench, copy_bandwidth  # noqa: E402

from specsa.verifier import NSAVerifier  # noqa: E402
from specsa.config import NSAConfig, PrecisionClass, Schedule, Traversal  # noqa: E402
from specsa.kernels.common.params import NSAParams  # noqa: E402
from specsa.kernels.refresh import refresh_workspace, score_topk, score_topk_grouped  # noqa: E402
from specsa.kernels.refresh.grouped import default_refresh_splits, refresh_rows  # noqa: E402
from specsa.kernels.nsa.masked import build_tree_visibility  # noqa: E402
from specsa.kernels.dense import dense_tree_verify  # noqa: E402
from specsa.kernels.fused import build_geometry, decode_geometry, fused_decode  # noqa: E402
from specsa.draft_tree import traversal_order  # noqa: E402
from specsa.schedule import default_num_splits  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- inputs ----------------
def tree_parents(t: int, chain: bool) -> list[int]:
    """Chain, or a binary tree (node u under (u-1)//2): depth log2(T), siblings everywhere."""
    return list(range(-1, t - 1)) if chain else [-1] + [(u - 1) // 2 for u in range(1, t)]


def synthetic_sel(pos: torch.Tensor, order: list[int], hkv: int, p: NSAParams, overlap: float,
                  gen: torch.Generator) -> torch.Tensor:
    """sel [T, Hkv, topn] int32 for one request: forced blocks + free blocks; walking the flat
    order, each free block of the previous query is kept with probability rho, the rest drawn
    fresh (top-k of random scores keeps them distinct). rho is set from the target overlap."""
    t = pos.shape[0]
    forced_n = p.init_blocks + p.local_blocks
    free = p.topn - forced_n
    rho = max(0.0, min(1.0, (overlap - forced_n / p.topn) / max(1e-9, free / p.topn)))
    nsel = p.num_sel(int(pos.max()) + 1)
    sel = torch.full((t, hkv, p.topn), -1, dtype=torch.int64, device=pos.device)
    prev = None
    for u in order:
        tu = int(pos[u])
        cur = tu // p.select
        forced = sorted(set(range(min(p.init_blocks, cur + 1)))
                        | {j for j in range(cur - p.local_blocks + 1, cur + 1) if j >= 0})
        score = torch.rand(hkv, nsel, generator=gen, device="cpu").to(pos.device)
        score[:, cur + 1:] = -2.0
        score[:, forced] = -1.0
        if prev is not None:
            keep = torch.rand(prev.shape, generator=gen).to(pos.device) < rho
            score.scatter_(1, prev, torch.where(keep, 2.0, score.gather(1, prev)))
            score[:, forced] = -1.0
            score[:, cur + 1:] = -2.0
        n_free = min(free, max(0, cur + 1 - len(forced)))
        pick = score.topk(n_free, dim=1).indices
        prev = pick
        row = torch.cat([torch.tensor(forced, device=pos.device).expand(hkv, -1), pick], 1)
        row = row.sort(1).values
        sel[u, :, :row.shape[1]] = row
    return sel.to(torch.int32)


def measured_overlap(sel: torch.Tensor, orders: list[list[int]], sizes: list[int], topn: int) -> float:
    tot, n, off = 0.0, 0, 0
    for order, t in zip(orders, sizes):
        for a, b in zip(order[:-1], order[1:]):
            sa, sb = sel[off + a], sel[off + b]                       # [Hkv, topn]
            eq = (sa[:, :, None] == sb[:, None, :]) & (sa[:, :, None] >= 0)
            tot += float(eq.any(2).sum(1).float().mean()) / topn
            n += 1
        off += t
    return tot / max(1, n)


def floor_bytes(sel, prefix_lens, sizes, params, hq, hkv, d, elt=2) -> dict:
    """Bytes each read once: union over the request of (sel-block tokens < P U window), tail,
    compressed tokens, q and out."""
    attn_tok, cmp_tok, off = 0, 0, 0
    for P, t in zip(prefix_lens, sizes):
        s = sel[off:off + t]
        w_lo = max(0, P - params.window + 1)
        for h in range(hkv):
            blocks = torch.unique(s[:, h][s[:, h] >= 0]).tolist()
            toks = sum(max(0, min(b * params.select + params.select, w_lo) - b * params.select)
                       for b in blocks)
            attn_tok += toks + (P - w_lo) + t
        cmp_tok += params.num_cmp(P) * hkv
        off += t
    nq = sum(sizes)
    qo = 2 * nq * hq * d * elt
    attn = attn_tok * 2 * d * elt + qo
    return {"attn_bytes": attn, "full_bytes": attn + cmp_tok * 2 * d * elt,
            "dense_bytes": sum(P + t for P, t in zip(prefix_lens, sizes)) * hkv * 2 * d * elt + qo}


# ---------------------------------------------------------------- reference -------------
def torch_reference(case, params, scale, gates=None, o_cmp=None):
    """Vectorised fp32 reference of one batch (per request: all keys, explicit masks)."""
    outs, off = [], 0
    kc, vc, bt = case["k_cache"], case["v_cache"], case["block_table"]
    ps = kc.shape[1]
    for b, (P, par) in enumerate(zip(case["prefix_lens"], case["parents"])):
        t = len(par)
        npg = -(-P // ps)
        k = torch.cat([kc[bt[b, :npg].long()].reshape(-1, *kc.shape[2:])[:P],
                       case["k_new"][off:off + t]]).float()
        v = torch.cat([vc[bt[b, :npg].long()].reshape(-1, *vc.shape[2:])[:P],
                       case["v_new"][off:off + t]]).float()
        dep = [0] * t
        anc = torch.eye(t, dtype=torch.bool, device=k.device)
        for u in range(1, t):
            dep[u] = dep[par[u]] + 1
            anc[u] |= anc[par[u]]
        tq = P + torch.tensor(dep, device=k.device)
        kpos = torch.cat([torch.arange(P, device=k.device), tq])
        vis = torch.cat([torch.ones(t, P, dtype=torch.bool, device=k.device), anc], 1)  # [T, N]
        s = case["sel"][off:off + t].long()                                            # [T, H, n]
        nblk = int(kpos.max()) // params.select + 1
        bm = torch.zeros(t, s.shape[1], nblk + 1, dtype=torch.bool, device=k.device)
        bm.scatter_(2, torch.where(s < 0, nblk, s), True)
        selm = bm[:, :, kpos // params.select] & vis[:, None]
        winm = (kpos[None] >= tq[:, None] - params.window + 1) & vis                     # [T, N]
        g = case["q"].shape[1] // k.shape[1]
        q = case["q"][off:off + t].float()
        logits = torch.einsum("thd,nhd->thn", q, k.repeat_interleave(g, 1)) * scale
        vv = v.repeat_interleave(g, 1)

        def attend(mask):
            lg = logits.masked_fill(~mask, float("-inf"))
            p = torch.softmax(lg, -1).nan_to_num(0.0)
            return torch.einsum("thn,nhd->thd", p, vv)

        if gates is None:
            outs.append(attend((selm | winm[:, None]).repeat_interleave(g, 1)))
        else:
            gt = gates[off:off + t].float()
            o = (gt[..., 0:1] * o_cmp[off:off + t].float()
                 + gt[..., 1:2] * attend(selm.repeat_interleave(g, 1))
                 + gt[..., 2:3] * attend(winm[:, None].expand(-1, q.shape[1], -1)))
            outs.append(o)
        off += t
    return torch.cat(outs)


def refresh_group_cuts(case, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, g_start, g_len) int32 on DEV: each request's rows in flat order, cut every c."""
    order, g_start, g_len = [], [], []
    off = 0
    for t, ordr in zip(case["sizes"], case["orders"]):
        for s0 in range(0, t, c):
            g_start.append(len(order))
            g_len.append(len(ordr[s0:s0 + c]))
            order.extend(off + u for u in ordr[s0:s0 + c])
        off += t
    i32 = {"dtype": torch.int32, "device": DEV}
    return (torch.tensor(order, **i32), torch.tensor(g_start, **i32), torch.tensor(g_len, **i32))


# ---------------------------------------------------------------- one point ------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.hq, self.hkv = args.hq, args.hkv
        self.ps = args.page_size
        self.flush = L2Flush(DEV) if DEV == "cuda" else None
        self.cache = {}
        self.t0 = time.time()
        self.results = {"meta": {}, "correctness": [], "points": [], "decode": [], "errors": [],
                        "refresh": [], "fullstep": []}
        self.cmp_cache = {}

    def caches(self, d: int, tokens_per_req: int, batch: int):
        key = d
        need = batch * -(-tokens_per_req // self.ps)
        if key not in self.cache or self.cache[key][0].shape[0] < need:
            self.cache.clear()
            torch.cuda.empty_cache() if DEV == "cuda" else None
            shape = (need, self.ps, self.hkv, d)
            self.cache[key] = (torch.randn(shape, device=DEV, dtype=self.args.dtype),
                               torch.randn(shape, device=DEV, dtype=self.args.dtype),
                               torch.randperm(need, device=DEV).to(torch.int32))
        return self.cache[key]

    def case(self, ctx, t, chain, batch, overlap, d, params, seed=0, traversal=Traversal.BFS):
        gen = torch.Generator().manual_seed(seed)
        maxp = -(-(ctx + t) // self.ps)
        kc, vc, perm = self.caches(d, ctx + t, batch)
        bt = perm[:batch * maxp].view(batch, maxp).contiguous()
        parents = [tree_parents(t, chain) for _ in range(batch)]
        orders = [traversal_order(p, Traversal.CHAIN if chain else traversal) for p in parents]
        prefix = [ctx] * batch
        nq = batch * t
        mk = lambda *s: torch.randn(*s, device=DEV, dtype=self.args.dtype)
        sels = []
        for b in range(batch):
            dep = [0] * t
            for u in range(1, t):
                dep[u] = dep[parents[b][u]] + 1
            pos = torch.tensor([ctx + x for x in dep], device=DEV)
            sels.append(synthetic_sel(pos, orders[b], self.hkv, params, overlap, gen))
        case = dict(q=mk(nq, self.hq, d), k_new=mk(nq, self.hkv, d), v_new=mk(nq, self.hkv, d),
                    k_cache=kc, v_cache=vc, block_table=bt, sel=torch.cat(sels),
                    parents=parents, prefix_lens=prefix, orders=orders, sizes=[t] * batch)
        if params.gated:
            case["o_cmp"] = mk(nq, self.hq, d)
            case["gates"] = torch.rand(nq, self.hq, 3, device=DEV, dtype=self.args.dtype)
        return case

    def variants(self, case, params, d, traversal, extra_c=()):
        """name -> zero-arg callable writing into a fixed out buffer."""
        cfg = NSAConfig(**{**self.args.nsa.to_dict(),
                           "combine": "gated" if params.gated else "union"})
        out = {}
        o = torch.empty_like(case["q"])
        kw = dict(o_cmp=case.get("o_cmp"), gates=case.get("gates"), out=o)
        runs = [("independent", Schedule.INDEPENDENT, PrecisionClass.STRICT, None),
                ("exact_merged", Schedule.EXACT_MERGED, PrecisionClass.STRICT, self.args.group_size),
                ("shared_index", Schedule.SHARED_INDEX, PrecisionClass.APPROX, self.args.group_size)]
        runs += [(f"exact_merged_c{c}", Schedule.EXACT_MERGED, PrecisionClass.STRICT, c) for c in extra_c]
        for name, sched, prec, gs in runs:
            ver = NSAVerifier(cfg, self.hq, self.hkv, d, device=DEV)
            ver.plan(case["parents"], case["prefix_lens"], case["block_table"], schedule=sched,
                     traversal=traversal, precision=prec, group_size=gs)
            out[name] = (lambda v=ver: v.run(case["q"], case["k_new"], case["v_new"],
                                             case["k_cache"], case["v_cache"], case["sel"], **kw))
        c = max(1, 64 // (self.hq // self.hkv))
        ng = sum(-(-t // c) for t in case["sizes"])
        nsm = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 0
        ns = default_num_splits(ng * self.hkv, case["prefix_lens"][0] // 64, nsm)
        geo = build_geometry(case["parents"], case["prefix_lens"], case["block_table"],
                             case["orders"], c, params.window, ns)
        ws = None
        if ns > 1:
            ws = (torch.empty(ns * o.numel(), device=DEV), torch.empty(ns * o.numel() // d, device=DEV))
        out["dense"] = lambda: dense_tree_verify(case["q"], case["k_new"], case["v_new"],
                                                 case["k_cache"], case["v_cache"], geo,
                                                 d ** -0.5, out=o, workspace=ws)
        return out, o

    def tune(self, d=128, ctx=65536):
        """(num_warps, num_stages) of the fused kernel at the target points; recorded only."""
        params = self.args.nsa.params
        cfgs = [(4, 2), (4, 3), (8, 2), (8, 3), (4, 1)]
        for nw, ns in cfgs:
            launch = {"num_warps": nw, "num_stages": ns}
            r = self.decode(ctx, 16, d, False, launch=launch, record=False)
            rec = {"what": "decode B16", "num_warps": nw, "num_stages": ns, "median_us": r["median_us"],
                   "over_floor_attn": r["over_floor_attn"]}
            for t, bb in ((64, 16), (16, 1), (16, 16)):
                case = self.case(ctx, t, False, bb, 0.5, d, params, seed=ctx + t + bb)
                for c in (4, 16):
                    ver = NSAVerifier(self.args.nsa, self.hq, self.hkv, d, device=DEV, **launch)
                    ver.plan(case["parents"], case["prefix_lens"], case["block_table"],
                             schedule=Schedule.EXACT_MERGED, group_size=c)
                    fn = lambda: ver.run(case["q"], case["k_new"], case["v_new"], case["k_cache"],
                                         case["v_cache"], case["sel"])
                    rec[f"em_T{t}_B{bb}_C{c}_us"] = bench(fn, self.flush, reps=self.args.reps)["median_us"]
            self.results.setdefault("tuning", []).append(rec)
            print("tune", rec, flush=True)
            self.save()

    def union_only(self, case, params, d, traversal):
        """The on-device union kernel alone (part of exact_merged's time)."""
        from specsa.kernels.common.index import merge_group_selections
        ver = NSAVerifier(self.args.nsa, self.hq, self.hkv, d, device=DEV)
        plan = ver.plan(case["parents"], case["prefix_lens"], case["block_table"],
                        schedule=Schedule.EXACT_MERGED, traversal=traversal,
                        group_size=self.args.group_size)
        g = plan.geometry
        return lambda: merge_group_selections(case["sel"], g.sel_src, g.g_start, g.g_len,
                                              plan.group_size, out=plan.union)

    def save(self):
        path = Path(self.args.out) / "kernels.json"
        path.write_text(json.dumps(self.results, indent=1, default=str))

    def correctness(self, d, gated, ctx, t, batch):
        params = NSAConfig(**{**self.args.nsa.to_dict(), "combine": "gated" if gated else "union"}).params
        case = self.case(ctx, t, False, batch, 0.5, d, params, seed=1)
        fns, o = self.variants(case, params, d, Traversal.BFS)
        ref = torch_reference(case, params, d ** -0.5, case.get("gates"), case.get("o_cmp"))
        rec = {"d": d, "gated": gated, "ctx": ctx, "T": t, "batch": batch}
        for name, fn in fns.items():
            if name == "shared_index":
                continue
            if name == "dense":
                dref = torch_reference({**case, "sel": torch.full_like(case["sel"], -1)},
                                       NSAConfig(window=1 << 30).params, d ** -0.5)
                cur = dref
            else:
                cur = ref
            o.fill_(float("nan"))
            fn()
            err = float((o.float() - cur).norm() / cur.norm())
            rec[name + "_rel_err"] = err
            rec[name + "_nan"] = bool(torch.isnan(o).any())
        rec["ok"] = all(v < 2e-2 for k, v in rec.items() if k.endswith("rel_err")) and \
            not any(v for k, v in rec.items() if k.endswith("_nan"))
        self.results["correctness"].append(rec)
        print("correctness", rec, flush=True)
        self.save()

    def point(self, ctx, t, chain, batch, overlap, d, tag):
        params = self.args.nsa.params
        trav = Traversal.CHAIN if chain else Traversal.BFS
        case = self.case(ctx, t, chain, batch, overlap, d, params, seed=ctx + t + batch)
        fns, _ = self.variants(case, params, d, trav, extra_c=(4, 8, 16) if tag == "head" else ())
        fb = floor_bytes(case["sel"], case["prefix_lens"], case["sizes"], params, self.hq, self.hkv, d)
        rec = {"tag": tag, "ctx": ctx, "T": t, "shape": "chain" if chain else "tree", "batch": batch,
               "d": d, "overlap_target": overlap,
               "overlap_measured": measured_overlap(case["sel"].cpu(), case["orders"], case["sizes"], params.topn),
               **fb, "floor_attn_us": fb["attn_bytes"] / self.bw * 1e6,
               "floor_full_us": fb["full_bytes"] / self.bw * 1e6,
               "floor_dense_us": fb["dense_bytes"] / self.bw * 1e6}
        if tag == "head":
            fns["union_only"] = self.union_only(case, params, d, trav)
        for name, fn in fns.items():
            try:
                rec[name] = bench(fn, self.flush, reps=self.args.reps)
            except Exception as e:  # keep the other variants' numbers
                rec[name] = {"error": repr(e)[:300]}
        m = lambda n: rec[n].get("median_us") if isinstance(rec.get(n), dict) else None
        if m("exact_merged"):
            em = m("exact_merged")
            rec["speedup_vs_independent"] = m("independent") / em if m("independent") else None
            rec["speedup_vs_dense"] = m("dense") / em if m("dense") else None
            rec["merged_over_floor_attn"] = em / rec["floor_attn_us"]
        self.results["points"].append(rec)
        times = " ".join(f"{n}={m(n):.1f}" for n in fns if m(n))
        print(f"{tag:8s} ctx={ctx:6d} T={t:2d} {rec['shape']:5s} B={batch:2d} D={d:3d} "
              f"ov={rec['overlap_measured']:.2f} floor={rec['floor_attn_us']:.1f} {times}", flush=True)
        self.save()

    def decode(self, ctx, batch, d, gated, split_mult=1, launch=None, record=True):
        params = NSAConfig(**{**self.args.nsa.to_dict(), "combine": "gated" if gated else "union"}).params
        case = self.case(ctx, 1, True, batch, 0.5, d, params, seed=7)
        nsm = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 0
        ns = default_num_splits(batch * self.hkv, params.topn + params.window // 64, nsm) * split_mult
        geo = decode_geometry(case["prefix_lens"], case["block_table"], params, ns)
        o = torch.empty_like(case["q"])
        nb = 2 if gated else 1
        ws = None if ns == 1 else (torch.empty(ns * nb * o.numel(), device=DEV),
                                   torch.empty(ns * nb * o.numel() // d, device=DEV))
        fn = lambda: fused_decode(case["q"], case["k_new"], case["v_new"], case["k_cache"],
                                  case["v_cache"], case["sel"], geo, params, d ** -0.5,
                                  o_cmp=case.get("o_cmp"), gates=case.get("gates"), out=o, workspace=ws,
                                  **(launch or {}))
        o.fill_(float("nan"))
        fn()
        ref = torch_reference(case, params, d ** -0.5, case.get("gates"), case.get("o_cmp"))
        fb = floor_bytes(case["sel"], case["prefix_lens"], case["sizes"], params, self.hq, self.hkv, d)
        rec = {"ctx": ctx, "batch": batch, "d": d, "gated": gated, "splits": ns, "split_mult": split_mult,
               "rel_err": float((o.float() - ref).norm() / ref.norm()), **fb,
               "floor_attn_us": fb["attn_bytes"] / self.bw * 1e6,
               "floor_full_us": fb["full_bytes"] / self.bw * 1e6, **bench(fn, self.flush, reps=self.args.reps)}
        rec["over_floor_attn"] = rec["median_us"] / rec["floor_attn_us"]
        rec["launch"] = launch
        if not record:
            return rec
        self.results["decode"].append(rec)
        print("decode", {k: rec[k] for k in ("ctx", "batch", "d", "gated", "rel_err", "median_us",
                                             "floor_attn_us", "over_floor_attn")}, flush=True)
        self.save()

    # ------------------------------------------------------------ refresh / full step ----
    def refresh_inputs(self, case, params, d, with_prov=True):
        """score_topk(_grouped) keyword arguments for every verifier row of `case`: random
        compressed caches (times do not depend on values) sharing the case's block table,
        committed compressed counts, and the trees' provisional tokens (nodes closing a block)."""
        kc = case["k_cache"]
        cpp = params.cmp_per_page(self.ps)
        key = (kc.shape[0], cpp, d)
        if key not in self.cmp_cache:
            self.cmp_cache.clear()
            shape = (kc.shape[0], cpp, self.hkv, d)
            self.cmp_cache[key] = (torch.randn(shape, device=DEV, dtype=self.args.dtype),
                                   torch.randn(shape, device=DEV, dtype=self.args.dtype))
        ckc, cvc = self.cmp_cache[key]
        q_req, q_pos, vis_rows, prov_cidx = [], [], [], []
        for b, (P, par) in enumerate(zip(case["prefix_lens"], case["parents"])):
            vis = build_tree_visibility(P, torch.tensor(par), params)
            base = len(prov_cidx)
            prov_cidx += vis.cmp_idx.tolist()
            nodes = vis.cmp_nodes.tolist()
            for u in range(len(par)):
                q_req.append(b)
                q_pos.append(int(vis.q_pos[u]))
                vis_rows.append([base + r for r, v in enumerate(nodes) if bool(vis.ancestors[u, v])])
        i32 = dict(dtype=torch.int32, device=DEV)
        kw = dict(ck_cache=ckc, cv_cache=cvc, block_table=case["block_table"],
                  q_req=torch.tensor(q_req, **i32), q_pos=torch.tensor(q_pos, **i32),
                  cmp_lens=torch.tensor([params.num_cmp(P) for P in case["prefix_lens"]], **i32),
                  params=params, scale=d ** -0.5, page_size=self.ps)
        mp = max(len(r) for r in vis_rows)
        if with_prov and prov_cidx and mp > 0:
            pv = torch.full((len(q_req), mp), -1, dtype=torch.int32)
            for i, r in enumerate(vis_rows):
                pv[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
            npv = len(prov_cidx)
            kw.update(prov_k=torch.randn(npv, self.hkv, d, device=DEV, dtype=self.args.dtype),
                      prov_v=torch.randn(npv, self.hkv, d, device=DEV, dtype=self.args.dtype),
                      prov_cidx=torch.tensor(prov_cidx, **i32), prov_vis=pv.to(DEV))
        return kw

    def refresh_fns(self, case, params, d, group_size=None, num_splits=None):
        """{"old": per-row score_topk, "grouped": score_topk_grouped} writing fixed buffers;
        groups = the request's rows in flat order, cut every C rows (C*G <= 128 rows and C <= the
        tree size by default: stages_tune.json)."""
        kw = self.refresh_inputs(case, params, d)
        q = case["q"]
        nq, hq, _ = q.shape
        g = hq // self.hkv
        c = group_size or max(1, min(64, 128 // g, max(case["sizes"])))
        with_out = params.gated
        bufs = {name: (torch.empty(nq, self.hkv, params.topn, dtype=torch.int32, device=DEV),
                       torch.empty_like(q) if with_out else None,
                       torch.empty(nq, hq, device=DEV) if with_out else None)
                for name in ("old", "grouped", "row_split")}
        groups = refresh_group_cuts(case, c)
        g_len = groups[2]
        nsm = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 0
        sel_blocks = -(-max(case["prefix_lens"]) // params.select) + 1
        if num_splits is None:
            num_splits = default_refresh_splits(len(g_len) * self.hkv, sel_blocks, params, nsm,
                                                refresh_rows(c, hq, self.hkv))
        ws = refresh_workspace(nq, hq, self.hkv, d, params, num_splits, with_out, DEV) if num_splits > 1 else None
        so, oo, lo = bufs["old"]
        sg, og, lg = bufs["grouped"]
        sr, orr, lr = bufs["row_split"]
        # the per-row refresh engineered like the grouped one (one row per group, split over
        # the selection-block range for occupancy): INDEPENDENT's fair refresh
        ns1 = default_refresh_splits(nq * self.hkv, sel_blocks, params, nsm, refresh_rows(1, hq, self.hkv))
        ws1 = refresh_workspace(nq, hq, self.hkv, d, params, ns1, with_out, DEV) if ns1 > 1 else None
        fns = {"old": lambda: score_topk(q, **kw, with_out=with_out, sel=so, o_cmp=oo, lse=lo),
               "grouped": lambda: score_topk_grouped(q, **kw, with_out=with_out, sel=sg, o_cmp=og, lse=lg,
                                                     group_size=c, groups=groups, num_splits=num_splits,
                                                     workspace=ws),
               "row_split": lambda: score_topk_grouped(q, **kw, with_out=with_out, sel=sr, o_cmp=orr,
                                                       lse=lr, group_size=1, num_splits=ns1,
                                                       workspace=ws1)}
        info = {"refresh_group_size": c, "refresh_num_splits": num_splits,
                "refresh_groups": len(g_len), "provisional_tokens": int(kw.get("prov_cidx", torch.zeros(0)).numel())}
        return fns, bufs, info

    def refresh(self, ctx, t, batch, d):
        """Refresh kernels alone: old vs grouped, times, floor (compressed K (+V gated) once per
        request) and how many (row, KV head) selections agree exactly (bf16: rare near-tie flips)."""
        params = self.args.nsa.params
        case = self.case(ctx, t, t == 1, batch, 0.5, d, params, seed=11 + t + batch)
        fns, bufs, info = self.refresh_fns(case, params, d)
        elt = torch.finfo(self.args.dtype).bits // 8
        cmp_bytes = sum(params.num_cmp(P) for P in case["prefix_lens"]) * self.hkv * d * elt \
            * (2 if params.gated else 1)
        qb = case["q"].numel() * elt
        rec = {"ctx": ctx, "T": t, "batch": batch, "d": d, "gated": params.gated, **info,
               "floor_bytes": cmp_bytes + qb, "floor_us": (cmp_bytes + qb) / self.bw * 1e6}
        for name, fn in fns.items():
            try:
                fn()
                rec[name] = bench(fn, self.flush, reps=self.args.reps)
                rec[name]["over_floor"] = rec[name]["median_us"] / rec["floor_us"]
            except Exception as e:
                rec[name] = {"error": repr(e)[:300]}
                self.results["errors"].append({"what": f"refresh {name}", "traceback": traceback.format_exc()[-2000:]})
        try:
            a, b = bufs["old"][0], bufs["grouped"][0]
            rec["sel_rows_equal"] = f"{int((a == b).all(-1).sum())}/{a.shape[0] * a.shape[1]}"
        except Exception as e:
            rec["sel_rows_equal"] = repr(e)[:200]
        m = lambda n: rec[n].get("median_us") if isinstance(rec.get(n), dict) else None
        if m("old") and m("grouped"):
            rec["speedup_grouped_vs_old"] = m("old") / m("grouped")
        self.results["refresh"].append(rec)
        print("refresh", {k: rec[k] for k in ("ctx", "T", "batch", "floor_us", "sel_rows_equal")},
              {n: m(n) for n in fns}, flush=True)
        self.save()

    def fullstep(self, ctx, t, batch, d, overlap=0.5):
        """A full verification step: refresh + sparse verification, INDEPENDENT (per-row refresh,
        per-query attention) vs EXACT_MERGED (grouped refresh, grouped attention)."""
        params = self.args.nsa.params
        case = self.case(ctx, t, False, batch, overlap, d, params, seed=ctx + t + batch + 5)
        vfns, _ = self.variants(case, params, d, Traversal.BFS)
        rfns, _, info = self.refresh_fns(case, params, d)
        fb = floor_bytes(case["sel"], case["prefix_lens"], case["sizes"], params, self.hq, self.hkv, d)
        elt = torch.finfo(self.args.dtype).bits // 8
        cmp_bytes = sum(params.num_cmp(P) for P in case["prefix_lens"]) * self.hkv * d * elt \
            * (2 if params.gated else 1)
        step_bytes = fb["attn_bytes"] + cmp_bytes
        rec = {"ctx": ctx, "T": t, "batch": batch, "d": d, "gated": params.gated, "overlap_target": overlap,
               "overlap_measured": measured_overlap(case["sel"].cpu(), case["orders"], case["sizes"], params.topn),
               **info, "attn_bytes": fb["attn_bytes"], "cmp_bytes": cmp_bytes, "step_bytes": step_bytes,
               "floor_step_us": step_bytes / self.bw * 1e6}
        pairs = {"independent": (rfns["old"], vfns["independent"]),
                 "independent_split": (rfns["row_split"], vfns["independent"]),
                 "exact_merged": (rfns["grouped"], vfns["exact_merged"]),
                 "refresh_old": (rfns["old"], None), "refresh_grouped": (rfns["grouped"], None),
                 "refresh_row_split": (rfns["row_split"], None),
                 "verify_independent": (None, vfns["independent"]),
                 "verify_exact_merged": (None, vfns["exact_merged"])}
        for name, (rf, vf) in pairs.items():
            fn = (lambda rf=rf, vf=vf: (rf() if rf else None, vf() if vf else None))
            try:
                rec[name] = bench(fn, self.flush, reps=self.args.reps)
            except Exception as e:
                rec[name] = {"error": repr(e)[:300]}
                self.results["errors"].append({"what": f"fullstep {name}", "traceback": traceback.format_exc()[-2000:]})
        m = lambda n: rec[n].get("median_us") if isinstance(rec.get(n), dict) else None
        if m("independent") and m("exact_merged"):
            rec["speedup_merged_vs_independent"] = m("independent") / m("exact_merged")
        if m("independent_split") and m("exact_merged"):
            rec["speedup_merged_vs_independent_split"] = m("independent_split") / m("exact_merged")
        if m("exact_merged"):
            rec["merged_over_floor_step"] = m("exact_merged") / rec["floor_step_us"]
        self.results["fullstep"].append(rec)
        print(f"fullstep ctx={ctx} T={t} B={batch} ov={rec['overlap_measured']:.2f} "
              f"floor={rec['floor_step_us']:.1f} " + " ".join(f"{n}={m(n):.1f}" for n in pairs if m(n))
              + f" speedup={rec.get('speedup_merged_vs_independent')}", flush=True)
        self.save()

    def guarded(self, what, fn, *a):
        if time.time() - self.t0 > self.args.budget_s:
            self.results["errors"].append({"what": what, "skipped": "time budget", "args": repr(a)})
            return
        try:
            fn(*a)
        except Exception:
            tb = traceback.format_exc()
            print(f"FAILED {what}: {tb}", flush=True)
            self.results["errors"].append({"what": what, "traceback": tb[-2000:]})
            self.save()


SECTIONS = ("correctness", "decode", "head", "refresh", "fullstep", "sweep", "grid", "d64", "tune")


def summary(results) -> dict:
    """The issue's targets (H200 bf16, D=128, 64K, overlap ~0.5) from the measured points."""
    out = {}
    med = lambda p, n: p[n].get("median_us") if isinstance(p.get(n), dict) else None
    for p in results["points"]:
        if p["tag"] != "head":
            continue
        key = f"T{p['T']}_B{p['batch']}"
        em = med(p, "exact_merged")
        if not em:
            continue
        out[f"merged_vs_independent_{key}"] = med(p, "independent") / em if med(p, "independent") else None
        out[f"merged_over_floor_attn_{key}"] = em / p["floor_attn_us"]
        out[f"merged_vs_dense_{key}"] = med(p, "dense") / em if med(p, "dense") else None
        out[f"independent_over_floor_attn_{key}"] = (med(p, "independent") or 0) / p["floor_attn_us"]
    for d in results["decode"]:
        if d["batch"] == 16 and d["d"] == 128 and d.get("split_mult") == 1:
            out[f"decode_B16_{'gated' if d['gated'] else 'union'}_over_floor_attn"] = d["over_floor_attn"]
    for f in results.get("fullstep", []):
        key = f"T{f['T']}_B{f['batch']}"
        out[f"fullstep_merged_vs_independent_{key}"] = f.get("speedup_merged_vs_independent")
        out[f"fullstep_merged_vs_independent_split_{key}"] = f.get("speedup_merged_vs_independent_split")
        out[f"fullstep_merged_over_floor_step_{key}"] = f.get("merged_over_floor_step")
    for r in results.get("refresh", []):
        out[f"refresh_grouped_vs_old_T{r['T']}_B{r['batch']}"] = r.get("speedup_grouped_vs_old")
    out["targets"] = {"merged_vs_independent_T64 (B1, B16)": ">= 6.86",
                      "merged_over_floor_attn B16 64K": "<= 1.5",
                      "merged_vs_dense_T16": ">= 3", "decode_B16_over_floor": "<= 1.5"}
    return out


def meta(args) -> dict:
    m = {"command": " ".join(sys.argv), "torch": torch.__version__, "python": platform.python_version(),
         "time": time.strftime("%Y-%m-%d %H:%M:%S"), "dtype": str(args.dtype), "page_size": args.page_size,
         "hq": args.hq, "hkv": args.hkv, "nsa": args.nsa.to_dict(),
         "commit": os.environ.get("SPECSA_COMMIT") or _git()}
    import triton
    m["triton"] = triton.__version__
    if DEV == "cuda":
        p = torch.cuda.get_device_properties(0)
        m.update(gpu=p.name, sms=p.multi_processor_count, l2_bytes=p.L2_cache_size)
    return m


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def plots(results, out: Path) -> None:
    for fn in (_plot_overlap, _plot_context, _plot_fullstep):
        try:
            fn(results, out)
        except Exception as e:  # a plot must never lose the JSON
            print(f"plot {fn.__name__} failed: {e!r}")


def _mpl():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _ok(results):
    return [p for p in results["points"] if isinstance(p.get("exact_merged"), dict)
            and "median_us" in p["exact_merged"]]


def _plot_overlap(results, out: Path) -> None:
    plt = _mpl()
    pts = _ok(results)
    sweep = [p for p in pts if p["tag"] == "overlap"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(p["T"], p["batch"]) for p in sweep}):
        s = sorted((p for p in sweep if (p["T"], p["batch"]) == key), key=lambda p: p["overlap_measured"])
        ax.plot([p["overlap_measured"] for p in s], [p.get("speedup_vs_independent") or 0 for p in s],
                "o-", label=f"T={key[0]} B={key[1]}")
    ax.axhline(6.86, ls="--", c="gray", label="6.86x target")
    ax.set(xlabel="measured overlap (adjacent queries)", ylabel="INDEPENDENT / EXACT_MERGED",
           title="64K tree, D=128, bf16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_overlap.png", dpi=120)
    plt.close("all")


def _plot_context(results, out: Path) -> None:
    plt = _mpl()
    pts = _ok(results)
    grid = [p for p in pts if p["tag"] == "grid" and p["shape"] == "tree" and p["T"] == 16 and p["d"] == 128]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, b in zip(axes, (1, 16)):
        s = sorted((p for p in grid if p["batch"] == b), key=lambda p: p["ctx"])
        xs = [p["ctx"] // 1024 for p in s]
        if not s:
            continue
        for n in ("independent", "exact_merged", "shared_index", "dense"):
            ax.plot(xs, [p[n].get("median_us", float("nan")) for p in s], "o-", label=n)
        ax.plot(xs, [p["floor_attn_us"] for p in s], "k--", label="floor (sel U win)")
        ax.set(xscale="log", yscale="log", xlabel="context (K tokens)", ylabel="median us",
               title=f"T=16 tree, batch {b}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "time_vs_context.png", dpi=120)
    plt.close("all")


def _plot_fullstep(results, out: Path) -> None:
    """fullstep.png: a whole verification step (refresh + verify) per (T, batch), INDEPENDENT
    (per-row / split refresh) vs EXACT_MERGED split into its refresh and verify parts, floor."""
    recs = [f for f in results.get("fullstep", []) if isinstance(f.get("exact_merged"), dict)
            and "median_us" in f["exact_merged"]]
    if not recs:
        return
    plt = _mpl()
    med = lambda f, n: f[n]["median_us"] if isinstance(f.get(n), dict) and "median_us" in f[n] else 0
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(recs))
    w = 0.2
    ax.bar([x - 1.5 * w for x in xs], [med(f, "independent") for f in recs], w, label="INDEPENDENT")
    ax.bar([x - 0.5 * w for x in xs], [med(f, "independent_split") for f in recs], w,
           label="INDEPENDENT (split refresh)")
    ax.bar([x + 0.5 * w for x in xs], [med(f, "refresh_grouped") for f in recs], w,
           label="EXACT_MERGED: refresh")
    ax.bar([x + 0.5 * w for x in xs], [med(f, "verify_exact_merged") for f in recs], w,
           bottom=[med(f, "refresh_grouped") for f in recs], label="EXACT_MERGED: verify")
    ax.bar([x + 1.5 * w for x in xs], [f["floor_step_us"] for f in recs], w, color="k", label="floor")
    ax.set_xticks(list(xs), [f"T={f['T']} B={f['batch']}\n{med(f, 'independent') / med(f, 'exact_merged'):.2f}x"
                             for f in recs])
    ax.set(yscale="log", ylabel="median us", title="full verification step, 64K, D=128, bf16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fullstep.png", dpi=120)
    plt.close("all")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmark/results/h200"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter plumbing check)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--tune", action="store_true", help="also sweep num_warps / num_stages")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new point after this")
    ap.add_argument("--only", default="", help="comma list of sections: " + ",".join(SECTIONS))
    args = ap.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if only - set(SECTIONS):
        ap.error(f"--only: unknown sections {sorted(only - set(SECTIONS))}; choose from {SECTIONS}")
    want = lambda sec: (not only and sec != "tune") or sec in only
    args.dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    if args.smoke:
        args.hq, args.hkv = 8, 2
        args.nsa = NSAConfig(block=8, stride=4, select=16, topn=4, window=32)
        ctxs, ts, batches, ds, dec_ctx = [200, 400], [4, 16], [1, 2], [16], 300
        ov_ctx, sweep = 400, [0.3, 0.8]
    else:
        args.hq, args.hkv = 32, 8
        args.nsa = NSAConfig()
        ctxs, ts, batches, ds, dec_ctx = [16384, 32768, 65536, 131072], [4, 16, 64], [1, 16], [128, 64], 65536
        ov_ctx, sweep = 65536, [0.2, 0.35, 0.5, 0.7, 0.9]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    b = Bench(args)
    b.results["meta"] = meta(args)
    b.bw = copy_bandwidth(DEV)
    b.results["meta"]["copy_bandwidth_Bps"] = b.bw
    print("meta", b.results["meta"], flush=True)
    t0 = b.t0 = time.time()
    if want("correctness"):
        for d in ds[:1]:
            for gated in (False, True):
                b.guarded(f"correctness d={d} gated={gated}", b.correctness, d, gated, ov_ctx, 16, 2)
        b.guarded("correctness d64", b.correctness, ds[-1], False, ov_ctx, 16, 2)
    if want("decode"):
        for gated in (False, True):
            for d in ds:
                for mult in (1, 2, 4):
                    b.guarded(f"decode d={d} gated={gated}", b.decode, dec_ctx, 16, d, gated, mult)
        b.guarded("decode b1", b.decode, dec_ctx, 1, ds[0], False)
    # headline points first, so a time-out still leaves them
    if want("head"):
        for t in (64, 16):
            for bb in batches:
                b.guarded("head", b.point, ov_ctx, t, False, bb, 0.5, ds[0], "head")
    # refresh kernels alone (old per-row vs grouped), then the full verification step
    if want("refresh"):
        for t, bb in ((1, 1), (64, 16), (64, 1), (1, 16)) if not args.smoke else ((1, 1), (4, 2)):
            b.guarded(f"refresh T={t} B={bb}", b.refresh, ov_ctx, t, bb, ds[0])
    if want("fullstep"):
        for t in (64, 16) if not args.smoke else (4,):
            for bb in batches:
                b.guarded(f"fullstep T={t} B={bb}", b.fullstep, ov_ctx, t, bb, ds[0])
    if want("sweep"):
        for ov in sweep:
            for t in (16, 64) if not args.smoke else (16,):
                for bb in batches:
                    b.guarded("sweep", b.point, ov_ctx, t, False, bb, ov, ds[0], "overlap")
    if want("grid"):
        for ctx in ctxs:
            for t in ts:
                for chain in (False, True):
                    for bb in batches:
                        b.guarded("grid", b.point, ctx, t, chain, bb, 0.5, ds[0], "grid")
    if want("d64"):
        for t in (16, 64):
            for bb in batches:
                b.guarded("d64", b.point, ov_ctx, t, False, bb, 0.5, ds[-1], "d64")
    if not args.smoke and (args.tune or "tune" in only):
        b.guarded("tune", b.tune)
    b.results["meta"]["wall_s"] = time.time() - t0
    b.results["summary"] = summary(b.results)
    print("summary", json.dumps(b.results["summary"], indent=1), flush=True)
    b.save()
    plots(b.results, out)
    print(f"done in {time.time() - t0:.0f} s; {len(b.results['errors'])} errors", flush=True)


if __name__ == "__main__":
    main()
