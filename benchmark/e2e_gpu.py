"""End-to-end model step latency on one GPU: autoregressive NSA decode vs SpecSA verification.

A random-weight decoder with Llama-3-8B attention shapes (Hq=32, Hkv=8, D=128, hidden 4096,
intermediate 14336, vocab 128256, bf16) but few layers, on the TRITON attention path. For each
context length the prompt is prefilled once (chunked, timed); then every variant starts from
that committed state (cache.rollback between variants):
  ar                     one-token decode steps (the greedy continuation = the oracle's truth;
                         refresh: the first --refresh variant);
  <shape>/<schedule>/<refresh>/p
                         speculative steps: oracle drafter (accepts each main-path token with
                         probability p), chain or tree, verified with INDEPENDENT or
                         EXACT_MERGED, greedy acceptance, fused commit. The refresh kernel
                         (TritonOptions.refresh) is grouped (score_topk_grouped on the
                         verifier's groups); EXACT_MERGED is also timed with each --refresh
                         variant (default: grouped and per_row score_topk).
Per variant: median / p10 / p90 step latency (forward + accept + commit, synchronised), drafter
time separately, emitted tokens per step, tokens/s, and (when capture works) the CUDA-graph
replay time of one fixed forward (device time without host overhead). Results are written
incrementally to $OUT/e2e_gpu.json (each variant in its own try/except), plots to $OUT/*.png.

    python benchmark/e2e_gpu.py --out $OUT                          # defaults below
    python benchmark/e2e_gpu.py --contexts 16384 --layers 2 --steps 20 --out /tmp/e2e
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from specsa.config import CacheConfig, Combine, NSAConfig, Schedule, parse_enum
from specsa.model import BlockInput
from specsa.model.triton_forward import Refresh, TritonOptions
from specsa.model.config import ModelConfig, RopeConfig
from specsa.model.decoder import NSADecoder
from specsa.runtime.accept import greedy_accept
from specsa.runtime.drafters import OracleDrafter
from specsa.runtime.drafters.base import DraftRequest
from specsa.draft_tree import TreeSpec


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmark/results/h200"))
    p.add_argument("--contexts", default="16384,32768,65536")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--combine", choices=("union", "gated"), default="union")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk tokens")
    p.add_argument("--steps", type=int, default=48, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--ar-steps", type=int, default=96, help="AR steps (also the oracle truth)")
    p.add_argument("--accept", default="0.6,0.9", help="oracle acceptance probabilities")
    p.add_argument("--shapes", default="chain4,chain8,tree2x4x14,tree4x3x24",
                   help="chainG or treeKxDxN (topk x depth x tokens)")
    p.add_argument("--schedules", default="independent,exact_merged")
    p.add_argument("--refresh", default="grouped,per_row",
                   help="refresh kernels timed for exact_merged (other schedules: the first)")
    p.add_argument("--no-graph", action="store_true", help="skip CUDA-graph replay timing")
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: tiny shapes and NSA params (CPU needs TRITON_INTERPRET=1)")
    return p.parse_args(argv)


def _shape(s: str) -> TreeSpec:
    if s.startswith("chain"):
        return TreeSpec.chain(int(s[5:]))
    k, d, n = (int(x) for x in s[4:].split("x"))
    return TreeSpec(topk=k, depth=d, tokens=n)


def build_model(args) -> NSADecoder:
    combine = Combine.GATED if args.combine == "gated" else Combine.UNION
    if args.tiny:
        cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=args.vocab, hidden_size=64,
                          intermediate_size=128, num_layers=args.layers, num_heads=4,
                          num_kv_heads=2, head_dim=16)
        nsa = NSAConfig(block=8, stride=4, select=16, topn=4, window=32, combine=combine)
    else:
        cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=args.vocab,
                          hidden_size=4096, intermediate_size=14336, num_layers=args.layers,
                          num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                          rope=RopeConfig(theta=500000.0), max_position_embeddings=1 << 20)
        nsa = NSAConfig(combine=combine)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)      # parameters in bf16; RoPE tables stay fp32 (explicit)
    try:
        with torch.device(dev):
            model = NSADecoder(cfg, nsa)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    model.set_attn_impl("triton")
    return model


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _stats(xs: list[float]) -> dict:
    s = sorted(xs)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]
    return {"median_ms": statistics.median(s) * 1e3, "p10_ms": q(0.1) * 1e3,
            "p90_ms": q(0.9) * 1e3, "n": len(s)}


def prefill(model, cache, rids, prompts, chunk) -> float:
    _sync()
    t0 = time.perf_counter()
    for rid, ids in zip(rids, prompts):
        for s in range(0, len(ids), chunk):
            _, pend = model(cache, [BlockInput(rid, ids[s:s + chunk])], last_only=True)
            cache.commit(rid, pend)
    _sync()
    return time.perf_counter() - t0


def run_ar(model, cache, rids, prompts, n_steps, warmup) -> tuple[dict, list[list[int]]]:
    """Greedy AR decode from the prefilled state; returns stats and each request's tokens."""
    P0 = [cache.length(r) for r in rids]
    last = [p[-1] for p in prompts]
    # the prompt's last token is the first root: roll back one so decode feeds it
    for r, p in zip(rids, P0):
        cache.rollback(r, p - 1)
    toks = [[] for _ in rids]
    times = []
    for step in range(n_steps + warmup):
        _sync()
        t0 = time.perf_counter()
        logits, pend = model(cache, [BlockInput(r, [t]) for r, t in zip(rids, last)],
                             last_only=True)
        nxt = logits.argmax(-1).tolist()
        for r in rids:
            cache.commit(r, pend)
        _sync()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        for i, t in enumerate(nxt):
            toks[i].append(t)
        last = nxt
    for r, p in zip(rids, P0):
        cache.rollback(r, p - 1)
    st = _stats(times)
    st["tokens_per_step"] = float(len(rids))
    st["tokens_per_s"] = len(rids) * len(times) / sum(times)
    return st, toks


def run_spec(model, cache, rids, prompts, truth, spec: TreeSpec, p: float, steps, warmup):
    """Speculative steps with an oracle drafter; cycles back to the prefilled state when the
    truth runs out. Root of each step = the last emitted token (KV not cached)."""
    drafter = OracleDrafter(p, spec, model.cfg.vocab_size, seed=1)
    base = [cache.length(r) for r in rids]          # = prompt_len - 1 (root not cached)
    for r, pr, tr in zip(rids, prompts, truth):
        drafter.set_truth(r, pr + tr)
    ctx = [list(pr) for pr in prompts]
    times, dtimes, emitted, accepted = [], [], [], []
    step = 0
    while len(times) < steps:
        if any(len(c) - len(pr) + spec.depth + 1 > len(tr)
               for c, pr, tr in zip(ctx, prompts, truth)):
            for r, b in zip(rids, base):
                cache.rollback(r, b)
            ctx = [list(pr) for pr in prompts]
        t0 = time.perf_counter()
        drafts = drafter.propose([DraftRequest(r, tuple(c)) for r, c in zip(rids, ctx)])
        t1 = time.perf_counter()
        _sync()
        t1s = time.perf_counter()
        blocks = [BlockInput(r, d.tree.tokens, d.tree.parents) for r, d in zip(rids, drafts)]
        logits, pend = model(cache, blocks)
        off, n_emit = 0, 0
        for r, d, c in zip(rids, drafts, ctx):
            rows = logits[off:off + d.tree.size]
            off += d.tree.size
            a = greedy_accept(d.tree, rows)
            cache.commit(r, pend, list(a.nodes))
            c.extend(a.tokens)
            n_emit += len(a.tokens)
            if step >= warmup:
                accepted.append(len(a.nodes) - 1)
        _sync()
        t2 = time.perf_counter()
        if step >= warmup:
            times.append(t2 - t1s)
            dtimes.append(t1 - t0)
            emitted.append(n_emit)
        step += 1
    for r, b in zip(rids, base):
        cache.rollback(r, b)
    st = _stats(times)
    st["draft_median_ms"] = statistics.median(dtimes) * 1e3
    st["tokens_per_step"] = sum(emitted) / len(emitted)
    st["mean_accepted_drafts"] = sum(accepted) / len(accepted)
    st["tokens_per_s"] = sum(emitted) / sum(times)
    st["tree_nodes"] = int(drafts[0].tree.size)
    return st


def graph_time(model, cache, blocks, reps=50) -> dict:
    """CUDA-graph replay of one fixed forward (no commit): device time of a step."""
    prepared = model.prepare_triton(cache, blocks)
    model(cache, blocks, prepared=prepared)           # compile / warm up outside capture
    _sync()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(cache, blocks, prepared=prepared)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        model(cache, blocks, prepared=prepared)
    g.replay()
    _sync()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    eager = []
    for _ in range(10):
        _sync()
        t0 = time.perf_counter()
        model(cache, blocks, prepared=prepared)
        _sync()
        eager.append(time.perf_counter() - t0)
    return {"graph_median_ms": statistics.median(ts) * 1e3,
            "eager_planned_median_ms": statistics.median(eager) * 1e3}


def _meta(args) -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception as e:  # noqa: BLE001 - metadata only
            return f"unavailable ({e})"
    import triton
    return {"command": " ".join([sys.executable] + sys.argv), "args": vars(args),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "commit": sh(["git", "rev-parse", "HEAD"]),
            "dirty_files": sh(["git", "status", "--porcelain"]).count("\n") + 1,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def plot(results: dict, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return
    rows = [r for r in results["variants"] if "tokens_per_s" in r]
    ctxs = sorted({r["context"] for r in rows})
    names = sorted({r["name"] for r in rows}, key=lambda n: (n != "ar", n))
    for key, fname, ylabel in (("tokens_per_s", "e2e_tokens_per_s.png", "tokens / s"),
                               ("median_ms", "e2e_step_ms.png", "median step latency (ms)")):
        fig, ax = plt.subplots(figsize=(10, 6))
        for n in names:
            pts = [(r["context"], r[key]) for r in rows if r["name"] == n]
            if pts:
                pts.sort()
                ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o",
                        lw=2.5 if n == "ar" else 1, label=n)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ctxs, [f"{c // 1024}K" for c in ctxs])
        ax.set_xlabel("context")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{results['meta']['gpu']}: {results['meta']['args']['layers']}-layer "
                     "Llama-3-8B-shaped NSA model, batch "
                     f"{results['meta']['args']['batch']}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "e2e_gpu.json"
    results = {"meta": _meta(args), "prefill": [], "variants": [], "errors": []}

    def save():
        path.write_text(json.dumps(results, indent=1))

    save()
    if not torch.cuda.is_available():
        args.no_graph = True
    model = build_model(args)
    contexts = [int(c) for c in args.contexts.split(",")]
    shapes = args.shapes.split(",")
    scheds = [parse_enum(Schedule, s.strip(), "--schedules") for s in args.schedules.split(",")]
    refreshes = [parse_enum(Refresh, r.strip(), "--refresh") for r in args.refresh.split(",")]
    probs = [float(x) for x in args.accept.split(",")]
    for ctx in contexts:
        cache = None
        try:
            max_tree = max(_shape(s).tokens + 1 for s in shapes)
            per_req = ctx + args.ar_steps + max_tree + 64
            pages = args.batch * -(-per_req // args.page_size) + 8
            cache = model.new_cache(CacheConfig(page_size=args.page_size, num_pages=pages))
            gen = torch.Generator().manual_seed(ctx)
            prompts = [torch.randint(0, args.vocab, (ctx,), generator=gen).tolist()
                       for _ in range(args.batch)]
            rids = list(range(args.batch))
            for r in rids:
                cache.add_request(r)
            t = prefill(model, cache, rids, prompts, args.chunk)
            results["prefill"].append({"context": ctx, "seconds": t,
                                       "tokens_per_s": ctx * args.batch / t})
            print(f"[{ctx}] prefill {t:.2f}s", flush=True)
            save()
            model.set_attn_impl("triton", TritonOptions(refresh=refreshes[0]))
            ar, truth = run_ar(model, cache, rids, prompts, args.ar_steps, args.warmup)
            results["variants"].append({"context": ctx, "name": "ar",
                                        "refresh": refreshes[0].value, **ar})
            print(f"[{ctx}] ar {ar['median_ms']:.2f} ms/step {ar['tokens_per_s']:.1f} tok/s",
                  flush=True)
            if not args.no_graph:
                try:
                    gt = graph_time(model, cache, [BlockInput(r, [p[-1]]) for r, p in
                                                   zip(rids, prompts)])
                    results["variants"][-1].update(gt)
                except Exception as e:  # noqa: BLE001 - keep going, record why
                    results["errors"].append({"context": ctx, "name": "ar/graph",
                                              "error": repr(e)})
            save()
        except Exception as e:  # noqa: BLE001
            results["errors"].append({"context": ctx, "name": "prefill/ar", "error": repr(e),
                                      "trace": traceback.format_exc()})
            save()
            del cache
            torch.cuda.empty_cache()
            continue
        for shape in shapes:
            spec = _shape(shape)
            for sched, refresh in ((s, r) for s in scheds for r in
                                   (refreshes if s is Schedule.EXACT_MERGED else refreshes[:1])):
                model.set_attn_impl("triton", TritonOptions(schedule=sched, refresh=refresh))
                for p in probs:
                    name = f"{shape}/{sched.value}/{refresh.value}/p{p}"
                    try:
                        st = run_spec(model, cache, rids, prompts, truth, spec, p, args.steps,
                                      args.warmup)
                        row = {"context": ctx, "name": name, "shape": shape,
                               "schedule": sched.value,
                               "refresh": refresh.value, "accept_prob": p, **st,
                               "speedup_vs_ar": st["tokens_per_s"] / ar["tokens_per_s"]}
                        if not args.no_graph and p == probs[0]:
                            try:
                                drafts = OracleDrafter(1.0, spec, args.vocab)
                                for r, pr, tr in zip(rids, prompts, truth):
                                    drafts.set_truth(r, pr + tr)
                                ds = drafts.propose([DraftRequest(r, tuple(pr))
                                                     for r, pr in zip(rids, prompts)])
                                row.update(graph_time(model, cache, [
                                    BlockInput(r, d.tree.tokens, d.tree.parents)
                                    for r, d in zip(rids, ds)]))
                            except Exception as e:  # noqa: BLE001
                                results["errors"].append({"context": ctx, "name": name + "/graph",
                                                          "error": repr(e)})
                        results["variants"].append(row)
                        print(f"[{ctx}] {name}: {st['median_ms']:.2f} ms/step, "
                              f"{st['tokens_per_step']:.2f} tok/step, "
                              f"{st['tokens_per_s']:.1f} tok/s "
                              f"({row['speedup_vs_ar']:.2f}x AR)", flush=True)
                    except Exception as e:  # noqa: BLE001
                        results["errors"].append({"context": ctx, "name": name, "error": repr(e),
                                                  "trace": traceback.format_exc()})
                        print(f"[{ctx}] {name}: FAILED {e!r}", flush=True)
                    save()
        del cache
        torch.cuda.empty_cache()
        plot(results, out)
    plot(results, out)
    save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
