"""Summary, run metadata and PNG plots of benchmark/kernels.py results."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


DEV = "cuda" if torch.cuda.is_available() else "cpu"


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
