"""Quality of the precision classes on real text (CPU, SmolLM2-135M, training-free NSA).

For each prompt (real prose from `scripts/fetch_text.py` and Python source from the installed
packages) of `--prompt-tokens` tokens, and each configuration (precision class + knob values,
docs/DESIGN.md section 5), against STRICT (exact NSA):

- greedy generation of `--new-tokens` tokens (stop tokens ignored): `prefix_match` (tokens
  before the first difference from STRICT's output), `match_rate` (positions equal);
  REUSE runs autoregressively (speculation is lossless for a REUSE model, tested in
  test/specsa/test_precision_knobs.py), SHARED_INDEX runs speculative decoding with an
  n-gram tree draft (`--draft-tree`), the only place it applies (it groups the queries of
  a verified tree); `strict_spec` (STRICT, the same tree draft) checks exactness on the way;
- teacher-forced held-out text: the `--heldout` tokens that follow the prompt in the same
  document, fed as verified chains of `--chunk` tokens (what a chain draft verification
  groups; the prompt's last logits predict the first one): mean NLL, perplexity, the
  change against STRICT, and `top1_agree` (argmax equal to STRICT's at the same position).

Prefill (chunks of 256, never grouped) depends only on the refresh period, so it runs once
per period and the cache is copied for every use. Times are wall seconds on the CPU torch
path (a shared 2-core machine: indicative only). Writes `--out` (JSON: command, commit,
machine, settings, rows) and a PNG beside it.

    nice -n 10 .venv/bin/python benchmark/quality_cpu.py --out benchmark/results/cpu/quality.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from specsa.config import CacheConfig, PrecisionClass, SamplingConfig, Schedule, VerifyKnobs
from specsa.model import BlockInput, load_model, load_tokenizer
from specsa.runtime.drafters import NGramDrafter
from specsa.runtime.generate import prefill
from specsa.runtime.loop import SpecStats, _step
from specsa.draft_tree import TreeSpec

REPO = Path(__file__).resolve().parents[1]
SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
    "site-packages"
PROMPTS = {  # name -> (kind, file)
    "prose_datamodel": ("prose", REPO / "data/text/pydoc_reference_datamodel.txt"),
    "prose_logging": ("prose", REPO / "data/text/pydoc_howto_logging.txt"),
    "code_tqdm_std": ("code", SITE / "tqdm/std.py"),
    "code_requests_models": ("code", SITE / "requests/models.py"),
}
S, A, R, AR_ = (PrecisionClass.STRICT, PrecisionClass.APPROX, PrecisionClass.REUSE,
                PrecisionClass.APPROX_REUSE)
SI = Schedule.SHARED_INDEX
# name -> (knobs, generation mode)
CONFIGS = {
    "strict": (VerifyKnobs(S), "ar"),
    "strict_spec": (VerifyKnobs(S), "spec"),
    "reuse_r2": (VerifyKnobs(R, refresh_period=2), "ar"),
    "reuse_r4": (VerifyKnobs(R, refresh_period=4), "ar"),
    "approx_c2": (VerifyKnobs(A, schedule=SI, group_size=2), "spec"),
    "approx_c4": (VerifyKnobs(A, schedule=SI, group_size=4), "spec"),
    "approx_reuse_c4_r2": (VerifyKnobs(AR_, schedule=SI, group_size=4, refresh_period=2), "spec"),
}


def _prefilled(model, ids, knobs, pages, chunk):
    """(cache with request 0 holding the prompt, first generated token, last-row logits)."""
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=pages))
    cache.add_request(0)
    out = [[]]
    grab = {}
    real = model.forward

    def forward(*a, **k):
        lg, pend = real(*a, **k)
        grab["logits"] = lg
        return lg, pend
    model.forward = forward
    try:
        prefill(model, cache, [ids], [0], out, SamplingConfig(max_new_tokens=1), None, chunk,
                knobs=VerifyKnobs(knobs.precision, refresh_period=knobs.refresh_period))
    finally:
        del model.forward
    return cache, out[0][0], grab["logits"][-1]


def _generate(model, cache, ids, first, knobs, mode, n, tree):
    """Greedy tokens (first included) and, for speculative runs, the step statistics."""
    out = [first]
    t0 = time.perf_counter()
    stats = None
    if mode == "ar":
        while len(out) < n:
            lg, pend = model(cache, [BlockInput(0, [out[-1]])], last_only=True, knobs=knobs)
            cache.commit(0, pend)
            out.append(int(lg[-1].argmax()))
    else:
        drafter, stats = NGramDrafter(3, tree), SpecStats()
        sampling = SamplingConfig(max_new_tokens=n)
        while len(out) < n:
            _step(model, cache, drafter, [(0, list(ids), out)], sampling, None, None, stats,
                  None, None, knobs)
    return out[:n], time.perf_counter() - t0, stats


def _teacher_forced(model, cache, first_logits, held, knobs, chunk):
    """Logits predicting held[0..], fed as verified chains of `chunk` tokens."""
    rows = [first_logits[None]]
    t0 = time.perf_counter()
    for j in range(0, len(held) - 1, chunk):
        blk = held[j:j + chunk]
        lg, pend = model(cache, [BlockInput(0, blk)], knobs=knobs)
        cache.commit(0, pend)
        rows.append(lg)
    return torch.cat(rows)[:len(held)], time.perf_counter() - t0


def _nll(logits, held):
    lp = torch.log_softmax(logits.float(), dim=-1)
    return -lp[torch.arange(len(held)), torch.tensor(held)]


def run(args) -> dict:
    torch.manual_seed(0)
    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    tree = TreeSpec.parse(args.draft_tree)
    need = args.prompt_tokens + max(args.new_tokens, args.heldout) + tree.tokens + 64
    pages = -(-need // 16) + 4
    rows = []
    configs = [c for c in args.configs.split(",")]
    for name in args.prompts.split(","):
        kind, path = PROMPTS[name]
        ids_all = tok.encode(Path(path).read_text(), add_special_tokens=False)
        if len(ids_all) < args.prompt_tokens + args.heldout:
            raise SystemExit(f"{path}: {len(ids_all)} tokens < prompt + held-out")
        ids = ids_all[:args.prompt_tokens]
        held = ids_all[args.prompt_tokens:args.prompt_tokens + args.heldout]
        base: dict[int, tuple] = {}
        ref = None
        for cname in configs:
            knobs, mode = CONFIGS[cname]
            r = knobs.refresh_period
            if r not in base:
                t0 = time.perf_counter()
                base[r] = (*_prefilled(model, ids, knobs, pages, args.chunk_size),
                           time.perf_counter() - t0)
            cache0, first, last_logits, prefill_s = base[r]
            toks, gen_s, stats = _generate(model, copy.deepcopy(cache0), ids, first, knobs, mode,
                                           args.new_tokens, tree)
            lg, tf_s = _teacher_forced(model, copy.deepcopy(cache0), last_logits, held, knobs,
                                       args.chunk)
            nll = _nll(lg, held)
            row = {"prompt": name, "kind": kind, "config": cname,
                   "precision": knobs.precision.value,
                   "schedule": None if knobs.schedule is None else knobs.schedule.value,
                   "group_size": knobs.group_size, "refresh_period": r, "generation": mode,
                   "prompt_tokens": len(ids), "new_tokens": len(toks), "heldout_tokens": len(held),
                   "tokens": toks, "nll": float(nll.mean()), "ppl": math.exp(float(nll.mean())),
                   "prefill_s": prefill_s, "generate_s": gen_s, "teacher_forced_s": tf_s}
            if stats is not None:
                row.update(verify_steps=stats.verify_steps, mean_accept_len=stats.mean_accept_len)
            if cname == "strict":
                ref = {"tokens": toks, "argmax": lg.argmax(-1), "nll": row["nll"],
                       "ppl": row["ppl"]}
                print(f"[{name}] STRICT continuation: {tok.decode(toks[:40])!r}...",
                      file=sys.stderr)
            if ref is not None:
                first_diff = next((i for i, (a, b) in enumerate(zip(toks, ref["tokens"]))
                                   if a != b), len(toks))
                row.update(prefix_match=first_diff,
                           match_rate=sum(a == b for a, b in zip(toks, ref["tokens"])) / len(toks),
                           identical=toks == ref["tokens"],
                           top1_agree=float((lg.argmax(-1) == ref["argmax"]).float().mean()),
                           nll_delta=row["nll"] - ref["nll"],
                           ppl_change_pct=100.0 * (row["ppl"] / ref["ppl"] - 1.0))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), file=sys.stderr,
                  flush=True)
    return {"rows": rows}


def _plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["config"] != "strict"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    metrics = [("match_rate", "greedy tokens equal to STRICT (fraction of 256)"),
               ("top1_agree", "teacher-forced top-1 agreement with STRICT"),
               ("ppl_change_pct", "held-out perplexity change vs STRICT (%)")]
    w = 0.8 / max(1, len(prompts))
    for ax, (key, title) in zip(axes, metrics):
        for i, p in enumerate(prompts):
            vals = [next((r[key] for r in rows if r["prompt"] == p and r["config"] == c), 0.0)
                    for c in configs]
            ax.bar([x + i * w for x in range(len(configs))], vals, w, label=p)
        ax.set_xticks([x + w * (len(prompts) - 1) / 2 for x in range(len(configs))])
        ax.set_xticklabels(configs, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    s = doc["settings"]
    fig.suptitle(f"SmolLM2-135M, training-free NSA, CPU: precision classes vs STRICT "
                 f"(prompts {s['prompt_tokens']} tokens, {s['new_tokens']} generated, "
                 f"{s['heldout']} held out)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "models/smollm2-135m"))
    ap.add_argument("--prompts", default=",".join(PROMPTS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--prompt-tokens", type=int, default=3072)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=9,
                    help="teacher-forced chain length (root + 8, the draft tree's size)")
    ap.add_argument("--chunk-size", type=int, default=256, help="prefill chunk")
    ap.add_argument("--draft-tree", default="topk=2,depth=4,tokens=8",
                    help="n-gram (ngram:3) tree of the speculative runs")
    ap.add_argument("--out", default=str(REPO / "benchmark/results/cpu/quality.json"))
    args = ap.parse_args()
    if args.configs.split(",")[0] != "strict":
        raise SystemExit("--configs must start with strict (the reference)")
    t0 = time.time()
    # the code that runs is the checkout at start (others may commit during a long run)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    doc = run(args)
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit,
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32",
                       "attn_impl": "torch"},
           "settings": {"model": Path(args.model).name, "nsa": "training-free defaults "
                        "(block 32, stride 16, select 64, topn 16, window 512, union, mean)",
                        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                        "heldout": args.heldout, "chunk": args.chunk,
                        "draft": f"ngram:3 tree {args.draft_tree} (speculative configs)",
                        "prompt_files": {k: str(v[1]).replace(str(REPO) + "/", "")
                                         .replace(str(SITE), "site-packages")
                                         for k, v in PROMPTS.items()
                                         if k in args.prompts.split(",")},
                        "wall_s": time.time() - t0},
           **doc}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    _plot(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
