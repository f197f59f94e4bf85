"""The refresh-kernel sections of benchmark/kernels.py: the refresh alone (per-row
`score_topk` vs grouped `score_topk_grouped`) and the full verification step (refresh +
sparse attention), as a mixin of its `Bench`."""
from __future__ import annotations

import traceback
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench  # noqa: E402

from specsa.config import Traversal  # noqa: E402
from specsa.kernels.refresh import (  # noqa: E402
    ProvisionalTokens, RefreshArgs, refresh_workspace, score_topk, score_topk_grouped)
from specsa.kernels.refresh.grouped import default_refresh_splits, refresh_rows  # noqa: E402
from specsa.kernels.nsa.masked import build_tree_visibility  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
from kernel_cases import floor_bytes, measured_overlap, refresh_group_cuts, torch_reference  # noqa: E402,F401


class RefreshSections:
    """Needs the Bench attributes: args, hq, hkv, ps, flush, results, case(), caches()."""

    def refresh_inputs(self, case, params, d, with_prov=True):
        """RefreshArgs keyword arguments (but q) for every verifier row of `case`: random
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
            kw["prov"] = ProvisionalTokens(
                torch.randn(npv, self.hkv, d, device=DEV, dtype=self.args.dtype),
                torch.randn(npv, self.hkv, d, device=DEV, dtype=self.args.dtype),
                torch.tensor(prov_cidx, **i32), pv.to(DEV))
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
        a_old = RefreshArgs(q, **kw, with_out=with_out, sel=so, o_cmp=oo, lse=lo)
        a_grouped = RefreshArgs(q, **kw, with_out=with_out, sel=sg, o_cmp=og, lse=lg)
        a_split = RefreshArgs(q, **kw, with_out=with_out, sel=sr, o_cmp=orr, lse=lr)
        fns = {"old": lambda: score_topk(a_old),
               "grouped": lambda: score_topk_grouped(a_grouped, group_size=c, groups=groups,
                                                     num_splits=num_splits, workspace=ws),
               "row_split": lambda: score_topk_grouped(a_split, group_size=1, num_splits=ns1,
                                                       workspace=ws1)}
        info = {"refresh_group_size": c, "refresh_num_splits": num_splits,
                "refresh_groups": len(g_len), "provisional_tokens": int(kw["prov"].cidx.numel()) if "prov" in kw else 0}
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
