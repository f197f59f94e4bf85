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

Code by purpose: this file (CLI, verify / decode / dense sections), kernel_cases.py (inputs,
synthetic selections, byte floors, torch reference), kernel_refresh.py (refresh and full-step
sections), kernel_report.py (summary, metadata, plots); timing.py (CUDA-graph timing).

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
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import L2Flush, bench, copy_bandwidth  # noqa: E402

from specsa.verifier import NSAVerifier  # noqa: E402
from specsa.config import NSAConfig, PrecisionClass, Schedule, Traversal  # noqa: E402
from specsa.kernels.dense import dense_tree_verify  # noqa: E402
from specsa.kernels.fused import VerifyArgs, build_geometry, decode_geometry, fused_decode, split_workspace  # noqa: E402
from specsa.draft_tree import traversal_order  # noqa: E402
from specsa.schedule import default_num_splits  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

from kernel_cases import (floor_bytes, measured_overlap, refresh_group_cuts,  # noqa: E402,F401
                          synthetic_sel, torch_reference, tree_parents)
from kernel_refresh import RefreshSections  # noqa: E402
from kernel_report import meta, plots, summary  # noqa: E402,F401


# ---------------------------------------------------------------- verify / decode ---------
class Bench(RefreshSections):
    """Verify / decode sections here; the refresh and full-step ones in kernel_refresh.py."""

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
            ver.prepare(case["parents"], case["prefix_lens"], case["block_table"], schedule=sched,
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
            ws = split_workspace(ns, 1, o.shape[0], o.shape[1], d, geo.num_groups * self.hkv, DEV)
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
                    ver.prepare(case["parents"], case["prefix_lens"], case["block_table"],
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
        meta = ver.prepare(case["parents"], case["prefix_lens"], case["block_table"],
                           schedule=Schedule.EXACT_MERGED, traversal=traversal,
                           group_size=self.args.group_size)
        g = meta.geometry
        return lambda: merge_group_selections(case["sel"], g.sel_src, g.g_start, g.g_len,
                                              meta.group_size, out=meta.union)

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
        ws = None if ns == 1 else split_workspace(ns, nb, o.shape[0], o.shape[1], d,
                                                  geo.num_groups * self.hkv, DEV)
        a = VerifyArgs(case["q"], case["k_new"], case["v_new"], case["k_cache"], case["v_cache"],
                       geo, params, d ** -0.5, sel=case["sel"], o_cmp=case.get("o_cmp"),
                       gates=case.get("gates"), out=o, workspace=ws)
        fn = lambda: fused_decode(a, **(launch or {}))
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
