"""Launch tuning of the refresh kernel (score_topk_grouped) and the fused verify / decode
kernel: warps x group size x splits x pass-1 tile for the refresh, selected blocks per
iteration x pipeline depth x split multiplier for verify / decode, side by side in one device
call, at 64K context, Hq=32, Hkv=8, D=128, bf16, page 16, CUDA graphs, cold L2, median of
--reps replays. The defaults in the kernels' launchers come from its runs
(benchmark/results/h200/stages_tune.json, stages_attn_tune.json).

    python benchmark/tune_launch.py --out $OUT --name stages_tune      # H200: about 3-4 minutes
    TRITON_INTERPRET=1 python benchmark/tune_launch.py --smoke --out /tmp/s   # CPU plumbing check
    python benchmark/tune_launch.py --plot benchmark/results/h200/stages_tune.json  # PNGs

Refresh variants also report how many (row, KV head) selections equal the per-row kernel's
(bf16: rare near-tie flips). Writes <--name>.json (rewritten after every record).

The stage-drop mode (`_prof` switches inside the kernels) and the map / merge variants it
compared were retired; their measurements are in docs/PERF.md "Retired variants".
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

import kernels as kb                                   # benchmark/kernels.py (same folder)
from timing import bench

from specsa.verifier import NSAVerifier
from specsa.config import Schedule
from specsa.kernels.refresh import RefreshArgs, refresh_workspace, score_topk, score_topk_grouped
from specsa.kernels.refresh.grouped import default_refresh_splits
from specsa.kernels.fused import VerifyArgs, decode_geometry, fused_decode, split_workspace
from specsa.schedule import default_num_splits

DEV = kb.DEV


class LaunchTuning:
    def __init__(self, args):
        self.args = args
        self.b = kb.Bench(args)
        self.b.bw = kb.copy_bandwidth(DEV)
        self.out = Path(args.out)
        self.res = {"meta": {**kb.meta(args), "copy_bandwidth_Bps": self.b.bw}, "refresh": [],
                    "verify": [], "decode": [], "errors": []}
        self.t0 = time.time()

    def save(self):
        (self.out / f"{self.args.name}.json").write_text(json.dumps(self.res, indent=1, default=str))

    def time(self, fn):
        return bench(fn, self.b.flush, reps=self.args.reps)["median_us"]

    def guarded(self, what, fn, *a):
        if time.time() - self.t0 > self.args.budget_s:
            self.res["errors"].append({"what": what, "skipped": "time budget"})
            return
        try:
            fn(*a)
        except Exception:
            tb = traceback.format_exc()
            print("FAILED", what, tb, flush=True)
            self.res["errors"].append({"what": what, "traceback": tb[-2500:]})
        self.save()

    # ------------------------------------------------------------------ refresh ----------
    def refresh(self, ctx, t, batch, d=128):
        params = self.args.nsa.params
        case = self.b.case(ctx, t, t == 1, batch, 0.5, d, params, seed=3 + t + batch)
        kw = self.b.refresh_inputs(case, params, d)
        q = case["q"]
        nq, hq, _ = q.shape
        hkv = self.b.hkv
        nsm = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 0
        sel_blocks = -(-max(case["prefix_lens"]) // params.select) + 1
        ref = torch.empty(nq, hkv, params.topn, dtype=torch.int32, device=DEV)
        score_topk(RefreshArgs(q, **kw, with_out=False, sel=ref))
        rec = {"ctx": ctx, "T": t, "batch": batch, "d": d, "rows": nq, "variants": {}}

        c0 = max(1, 64 // (hq // hkv))
        runs = {}   # warps x group size x split multiplier, and a larger pass-1 tile
        for nw in (4, 8):
            for c in (1, 16, 32):
                for mult in (1, 2):
                    runs[f"w{nw}_C{c}_x{mult}"] = {"num_warps": nw, "group_size": c,
                                                   "split_mult": mult}
        runs["w4_C16_ts128"] = {"num_warps": 4, "group_size": 16, "stats_tile": 128}
        for name, knobs in runs.items():
            knobs = dict(knobs)
            c = knobs.pop("group_size", c0)
            mult = knobs.pop("split_mult", 1)
            groups = kb.refresh_group_cuts(case, c)
            ns = default_refresh_splits(groups[2].numel() * hkv, sel_blocks, params, nsm)
            ns = max(1, int(ns * mult))
            ws = refresh_workspace(nq, hq, hkv, d, params, ns, False, DEV) if ns > 1 else None
            sel = torch.full_like(ref, -7)
            a = RefreshArgs(q, **kw, with_out=False, sel=sel)
            fn = (lambda a=a, c=c, groups=groups, ns=ns, ws=ws, knobs=knobs:
                  score_topk_grouped(a, group_size=c, groups=groups, num_splits=ns, workspace=ws,
                                     **knobs))
            try:
                fn()
                v = {"group_size": c, "num_splits": ns, **knobs, "median_us": self.time(fn)}
                v["sel_rows_equal"] = f"{int((sel == ref).all(-1).sum())}/{nq * hkv}"
            except Exception as e:
                v = {"error": repr(e)[:400]}
                self.res["errors"].append({"what": f"refresh {name}", "traceback": traceback.format_exc()[-2500:]})
            rec["variants"][name] = v
            print(f"refresh T={t} B={batch} {name}: {v}", flush=True)
        a_row = RefreshArgs(q, **kw, with_out=False, sel=ref)
        per_row = lambda: score_topk(a_row)
        rec["variants"]["per_row"] = {"median_us": self.time(per_row)}
        self.res["refresh"].append(rec)

    # ------------------------------------------------------------------ verify -----------
    def verify(self, ctx, t, batch, d=128):
        params = self.args.nsa.params
        case = self.b.case(ctx, t, False, batch, 0.5, d, params, seed=ctx + t + batch)
        fb = kb.floor_bytes(case["sel"], case["prefix_lens"], case["sizes"], params, self.b.hq, self.b.hkv, d)
        rec = {"ctx": ctx, "T": t, "batch": batch, "d": d, "floor_attn_us": fb["attn_bytes"] / self.b.bw * 1e6,
               "variants": {}}
        o = torch.empty_like(case["q"])
        ref = None
        # tile x pipeline depth x split multiplier (4 warps)
        runs = {f"nbi{n}_w4_s{s}_x{m}": {"blocks_per_iter": n, "num_warps": 4, "num_stages": s, "mult": m}
                for n in (1, 2) for s in (2, 3) for m in (1, 2, 4)}
        for name, knobs in runs.items():
            knobs = dict(knobs)
            mult = knobs.pop("mult", 1)
            ver = NSAVerifier(self.args.nsa, self.b.hq, self.b.hkv, d, device=DEV, **knobs)
            meta = ver.prepare(case["parents"], case["prefix_lens"], case["block_table"],
                               schedule=Schedule.EXACT_MERGED)
            if mult != 1:
                meta = ver.prepare(case["parents"], case["prefix_lens"], case["block_table"],
                                   schedule=Schedule.EXACT_MERGED,
                                   num_splits=meta.num_splits * mult)
            knobs["splits"] = meta.num_splits
            fn = lambda ver=ver: ver.run(case["q"], case["k_new"], case["v_new"], case["k_cache"],
                                         case["v_cache"], case["sel"], out=o)
            try:
                o.fill_(float("nan"))
                fn()
                v = {**knobs, "median_us": self.time(fn)}
                if ref is None:
                    ref = o.clone()
                v["max_diff_vs_first"] = float((o.float() - ref.float()).abs().max())
            except Exception as e:
                v = {"error": repr(e)[:400]}
                self.res["errors"].append({"what": f"verify {name}", "traceback": traceback.format_exc()[-2500:]})
            v["over_floor"] = v.get("median_us", 0) / rec["floor_attn_us"]
            rec["variants"][name] = v
            print(f"verify T={t} B={batch} {name}: {v}", flush=True)
        self.res["verify"].append(rec)

    def decode(self, ctx, batch, d=128):
        params = self.args.nsa.params
        case = self.b.case(ctx, 1, True, batch, 0.5, d, params, seed=7)
        fb = kb.floor_bytes(case["sel"], case["prefix_lens"], case["sizes"], params, self.b.hq, self.b.hkv, d)
        nsm = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 0
        ns0 = default_num_splits(batch * self.b.hkv, params.topn + params.window // 64, nsm)
        rec = {"ctx": ctx, "batch": batch, "d": d, "floor_attn_us": fb["attn_bytes"] / self.b.bw * 1e6,
               "default_splits": ns0, "variants": {}}
        o = torch.empty_like(case["q"])
        runs = {f"nbi{n}_w4_s{s}_x{m}": {"blocks_per_iter": n, "num_warps": 4, "num_stages": s, "mult": m}
                for n in (1, 2) for s in (2, 3) for m in (0.5, 1, 2)}
        for name, knobs in runs.items():
            knobs = dict(knobs)
            ns = max(1, int(ns0 * knobs.pop("mult", 1)))
            geo = decode_geometry(case["prefix_lens"], case["block_table"], params, ns)
            ws = None if ns == 1 else split_workspace(ns, 1, o.shape[0], o.shape[1], d,
                                                      geo.num_groups * case["k_cache"].shape[2], DEV)
            a = VerifyArgs(case["q"], case["k_new"], case["v_new"], case["k_cache"], case["v_cache"],
                           geo, params, d ** -0.5, sel=case["sel"], out=o, workspace=ws)
            fn = lambda a=a, knobs=knobs: fused_decode(a, **knobs)
            try:
                fn()
                v = {**knobs, "splits": ns, "median_us": self.time(fn)}
            except Exception as e:
                v = {"error": repr(e)[:400]}
                self.res["errors"].append({"what": f"decode {name}", "traceback": traceback.format_exc()[-2500:]})
            v["over_floor"] = v.get("median_us", 0) / rec["floor_attn_us"]
            rec["variants"][name] = v
            print(f"decode B={batch} {name}: {v}", flush=True)
        self.res["decode"].append(rec)


def plot(res: dict, out: Path, stem: str) -> None:
    """<stem>_refresh.png (refresh variants per shape) and <stem>_attn.png (verify / decode
    variants), horizontal bars of median us; a failed plot never loses the JSON."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for part, recs in (("refresh", res.get("refresh", [])),
                       ("attn", res.get("verify", []) + res.get("decode", []))):
        if not recs:
            continue
        fig, axes = plt.subplots(1, len(recs), figsize=(4.2 * len(recs), 0.24 * max(
            len(r["variants"]) for r in recs) + 1.5), squeeze=False)
        for ax, r in zip(axes[0], recs):
            names = [n for n, v in r["variants"].items() if "median_us" in v]
            ax.barh(names, [r["variants"][n]["median_us"] for n in names],
                    color="C0")
            if r.get("floor_attn_us"):
                ax.axvline(r["floor_attn_us"], ls="--", c="k", lw=1)
            what = f"T={r['T']} " if "T" in r else "decode "
            ax.set_title(f"{part} {what}B={r['batch']}", fontsize=9)
            ax.set_xlabel("median us (dashed: floor)", fontsize=7)
            ax.tick_params(labelsize=6)
        fig.tight_layout()
        fig.savefig(out / f"{stem}_{part}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmark/results/h200")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--only", default="refresh,decode,verify")
    ap.add_argument("--plot", default="", help="only render the PNGs of an existing JSON")
    ap.add_argument("--name", default="tune_launch", help="output file stem (<out>/<name>.json)")
    a = ap.parse_args()
    if a.plot:
        src = Path(a.plot)
        plot(json.loads(src.read_text()), src.parent, src.stem)
        return
    args = argparse.Namespace(out=a.out, reps=a.reps, group_size=None, page_size=16, smoke=a.smoke,
                              budget_s=a.budget_s, name=a.name,
                              dtype=torch.bfloat16 if DEV == "cuda" else torch.float32)
    if a.smoke:
        args.hq, args.hkv = 8, 2
        args.nsa = kb.NSAConfig(block=8, stride=4, select=16, topn=4, window=32)
    else:
        args.hq, args.hkv = 32, 8
        args.nsa = kb.NSAConfig()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    st = LaunchTuning(args)
    st.res["meta"]["command"] = "benchmark/tune_launch.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "smoke") + (" --smoke" if a.smoke else "")
    only = set(a.only.split(","))
    ctx = 400 if a.smoke else 65536
    shapes = [(16, 1)] if a.smoke else [(64, 16), (64, 1), (16, 1), (16, 16)]
    if "refresh" in only:
        for t, b in shapes + ([] if a.smoke else [(1, 16)]):
            st.guarded(f"refresh T{t} B{b}", st.refresh, ctx, t, b)
    if "decode" in only:
        for b in ((2,) if a.smoke else (16, 1)):
            st.guarded(f"decode B{b}", st.decode, ctx, b)
    if "verify" in only:
        for t, b in shapes:
            st.guarded(f"verify T{t} B{b}", st.verify, ctx, t, b)
    st.res["meta"]["wall_s"] = time.time() - st.t0
    st.save()
    plot(st.res, st.out, a.name)
    print("done", st.res["meta"]["wall_s"], "errors", len(st.res["errors"]), flush=True)


if __name__ == "__main__":
    main()
