"""End-to-end decode speed inside SGLang at real model shapes, every system side by side in one
run (GPU; dummy weights).

    PYTHONPATH=<sglang bundle> python3 benchmark/sglang_e2e.py --out $OUT \
        [--target llama8b] [--drafts 2l,1b] [--systems dense_ar,standalone_dense,nsa_ar,\
specsa_chain,specsa_tree] [--contexts 16384,32768,65536,131072] [--batches 1,4,16] \
        [--new-tokens 128] [--budget-s 540] [--variant NAME=BASE:ENV=VAL[;ENV=VAL]]
    python benchmark/sglang_e2e.py --plot benchmark/results/h200/sglang_e2e.json   # PNGs, CPU

One SGLang server per (system, draft) with `--load-format dummy` (SGLang seeds each parameter
by its size, so the "2l" draft of the target's width equals the target's first layers, head and
embeddings: the acceptance ceiling of a cheap draft; "1b" is a 1B-class draft shape: the cost
side). Per context L and batch B: B random prompts of L tokens are prefilled together
(max_new_tokens 1; that time is `prefill_s`), then the same B prompts are sent again together
(a radix hit: every request starts decoding at once) with `stream` on and N+1 new tokens.
`ms_per_token` is the median over requests of (last chunk time - first chunk time) / tokens in
between (decode only, like bench_serving's TPOT); `tokens_per_s` is all decoded tokens over the
window from the first first-chunk to the last chunk. Speculative rows add `accept_len`
(SGLang's spec_accept_length), `step_ms` = ms_per_token x accept_len, and `projected_ms_per_token`
at accept lengths 2.0 / 2.5 / 3.0 (= step_ms / a, a step's cost does not depend on acceptance),
and `breakdown`: the median per-phase GPU / host time of the decode steps at that point from
the SpecSA worker's step timer (SPECSA_STEP_TIMING; specsa systems only). Warm-up requests
(compile every kernel) are excluded. Writes <out>/sglang_e2e.json (gpu, commit, command, rows)
after every point, and the server logs.

A variant's env may carry DRAFT_VOCAB=N (not passed to the server): that server drafts over the
first N token ids only (`--speculative-token-map`, sglang_plugin/draft_vocab.py), which cuts the
draft's LM-head reads; on dummy weights its acceptance drops, so read its step_ms and projections.
It may also carry PACKAGE=<checkout or `git archive` snapshot>: that server runs the SpecSA of
that checkout instead of this one (an A/B of two commits on one machine in one run; the row's
`package_commit` says which).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_site import (SHAPES, checkout_commit, draft_config, gpu_name, stage_package,  # noqa: E402
                         write_model)

SYSTEMS = ("dense_ar", "standalone_dense", "nsa_ar", "specsa_chain", "specsa_tree")
SPEC = {"standalone_dense", "specsa_chain", "specsa_tree"}
ACCEPT_PROJECTIONS = (2.0, 2.5, 3.0)


def system_args(system: str, draft_dir: str | None, tree: tuple[int, int, int]) -> list[str]:
    chain = ["--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
             "--speculative-num-draft-tokens", "4"]
    steps, topk, ntok = tree
    if system == "dense_ar":
        return ["--attention-backend", "triton"]
    if system == "nsa_ar":
        return ["--attention-backend", "specsa"]
    if system == "standalone_dense":
        return ["--attention-backend", "triton", "--speculative-algorithm", "STANDALONE",
                "--speculative-draft-model-path", draft_dir, *chain]
    spec = ["--speculative-algo", "specsa", "--speculative-draft-model-path", draft_dir]
    if system == "specsa_chain":
        return spec + chain
    if system == "specsa_tree":
        return spec + ["--speculative-num-steps", str(steps), "--speculative-eagle-topk",
                       str(topk), "--speculative-num-draft-tokens", str(ntok)]
    raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")


def parse_variant(text: str) -> tuple[str, str, dict]:
    """NAME=BASE:ENV=VAL[;ENV=VAL] -> (name, base system, env)."""
    name, rest = text.split("=", 1)
    base, _, envs = rest.partition(":")
    env = dict(kv.split("=", 1) for kv in envs.split(";") if kv)
    if base not in SYSTEMS:
        raise SystemExit(f"--variant {text}: base system {base!r} is not one of {SYSTEMS}")
    return name, base, env


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def jit_in_window(path: Path, t0: float, t1: float) -> dict:
    """Triton compiles of the server between t0 and t1 (jit_log.py): each one stalls a step
    for its compile time, so a measured window should hold none."""
    from specsa.sglang_plugin.jit_log import read_jit_log
    recs = [r for r in read_jit_log(path) if t0 <= r["t"] <= t1]
    return {"count": len(recs), "ms": round(sum(r["ms"] or 0 for r in recs), 1),
            "kernels": dict(Counter(r["kernel"] for r in recs))}


def breakdown(path: Path, bs: int, lo: int, hi: int) -> dict | None:
    """Median per-phase times of the timed steps with batch `bs` and max length in [lo, hi]."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    es = [e for e in data["entries"] if e["bs"] == bs and lo <= e["seq_max"] <= hi]
    if not es:
        return None
    out = {"steps": len(es),
           "step_gpu_ms": _median([e["step_gpu_ms"] for e in es]),
           "step_host_ms": _median([e["step_host_ms"] for e in es]),
           "plan_host_ms": _median([e["plan_host_ms"] for e in es])}
    for kind in ("gpu_ms", "host_ms"):
        out[kind] = {p: _median([e[kind].get(p) for e in es]) for p in data["phases"]}
    lengths = [e.get("steps") for e in es if e.get("steps") is not None]
    if len(set(lengths)) > 1 or any(e.get("predicted_ms") for e in es):
        # a SPECSA_PLAN server: how often each draft length ran, and the orchestrator's
        # predicted step time against the measured one (steps that had a prediction)
        out["steps_per_length"] = {str(k): lengths.count(k) for k in sorted(set(lengths))}
        pred = [(e["predicted_ms"], e["step_gpu_ms"] if e.get("step_gpu_ms") is not None
                 else e["step_host_ms"]) for e in es if e.get("predicted_ms")]   # CPU: host
        if pred:
            out["predicted_step_ms"] = _median([p for p, _ in pred])
            out["measured_step_ms"] = _median([m for _, m in pred])
            out["predicted_over_measured"] = _median([p / m for p, m in pred])
    return out


def all_active_rate(outs: list[dict]) -> tuple[float | None, float]:
    """(tokens/s, seconds) over the interval in which every request of the batch was decoding
    (after the last one's first token, before the first one's last): the throughput at fixed
    concurrency B, free of start and finish stagger. None when the interval is empty."""
    lo = max(o["arrivals"][0][0] for o in outs)
    hi = min(o["arrivals"][-1][0] for o in outs)
    if hi <= lo:
        return None, 0.0

    def done_by(o, t):      # tokens this request had at host time t
        return max((n for s, n in o["arrivals"] if s <= t), default=0)
    toks = sum(done_by(o, hi) - done_by(o, lo) for o in outs)
    return round(toks / (hi - lo), 1), round(hi - lo, 3)


def run_point(srv, L: int, B: int, N: int, seed: int, id_hi: int = 30000) -> dict:
    rngs = [random.Random(seed * 1000003 + L * 131 + b) for b in range(B)]
    prompts = [[r.randrange(2, id_hi) for _ in range(L)] for r in rngs]
    with ThreadPoolExecutor(B) as ex:
        t = time.perf_counter()
        list(ex.map(lambda p: srv.generate(input_ids=p, max_new_tokens=1), prompts))
        prefill_s = time.perf_counter() - t
    def decode(n: int) -> list[dict]:
        if B == 1:
            return [srv.generate_stream(input_ids=prompts[0], max_new_tokens=n + 1)]
        # one request for the batch: all B reach the scheduler together
        return srv.generate_stream_batch(input_ids=prompts, max_new_tokens=n + 1)
    # warm-up at this very batch and context: kernels launched outside CUDA graphs compile
    # per batch size / row count (SGLang's and ours), and a cold compile inside the measured
    # window costs 0.1-0.7 s (jit_log.py); the measured pass below then reuses the cache
    decode(max(8, N // 4))
    t_dec = time.time()
    outs = decode(N)
    per_req, n_total = [], 0
    for o in outs:
        (t0, n0), (t1, n1) = o["arrivals"][0], o["arrivals"][-1]
        if n1 <= n0:
            raise RuntimeError(f"stream returned {len(o['arrivals'])} chunks, no decode window")
        per_req.append(1e3 * (t1 - t0) / (n1 - n0))
        n_total += n1 - n0
    window = max(o["arrivals"][-1][0] for o in outs) - min(o["arrivals"][0][0] for o in outs)
    both = all_active_rate(outs)
    acc = [o["meta_info"].get("spec_accept_length") for o in outs]
    acc = [a for a in acc if a is not None]
    return {"prefill_s": round(prefill_s, 3), "ms_per_token": round(statistics.median(per_req), 3),
            "ms_per_token_max": round(max(per_req), 3),
            "tokens_per_s": round(n_total / window, 1) if window > 0 else None,
            "tokens_per_s_all_active": both[0], "all_active_s": both[1],
            "accept_len": round(sum(acc) / len(acc), 3) if acc else None,
            "cached_tokens": outs[0]["meta_info"].get("cached_tokens"),
            "out_head": outs[0]["output_ids"][:32], "_window": (t_dec, time.time())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--target", default="llama8b", choices=sorted(SHAPES))
    ap.add_argument("--drafts", default="2l")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=BASE:ENV=VAL[;ENV=VAL], an extra system = BASE with env vars")
    ap.add_argument("--contexts", default="16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--tree", default="3,2,6", help="steps,topk,draft tokens of specsa_tree")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--mem-fraction-static", default=None,
                    help="default: SGLang's own choice")
    ap.add_argument("--extra", default="", help="more launch_server arguments")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="stop starting new servers after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-profile", default=None, metavar="SKIP,STEPS",
                    help="torch.profiler tables of STEPS decode steps after SKIP (specsa servers)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="record the host syncs inside SpecSA decode steps (SPECSA_SYNC_DEBUG; "
                         "torch's sync debug mode warns, which slows those steps)")
    ap.add_argument("--plot", default=None, help="only plot this JSON (no GPU)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check this script on the CPU harness with a tiny model (no GPU)")
    a = ap.parse_args()
    if a.plot:
        plot(Path(a.plot))
        return
    if not a.out:
        raise SystemExit("--out (or $OUT) is required")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base_path = os.environ.get("PYTHONPATH", "")     # before this checkout's site joins it
    stage_package()
    from specsa.sglang_plugin.harness import launch_server

    ctxs = [int(x) for x in a.contexts.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    tree = tuple(int(x) for x in a.tree.split(","))
    N = a.new_tokens
    gpu, short = gpu_name()
    if a.cpu_smoke:
        from specsa.model.tiny import build_tiny
        target = str(build_tiny(out / "smoke_target", kind="llama", seed=0))
        drafts = {d: str(build_tiny(out / f"smoke_draft_{d}", kind="llama", seed=0,
                                    num_layers=1)) for d in a.drafts.split(",") if d}
    else:
        target = write_model(f"e2e_{a.target}", SHAPES[a.target])
        drafts = {d: write_model(f"e2e_{a.target}_draft_{d}", draft_config(a.target, d))
                  for d in a.drafts.split(",") if d}
    id_hi = min(30000, json.loads((Path(target) / "config.json").read_text())["vocab_size"])
    runs = [(s, s, {}) for s in a.systems.split(",") if s]
    runs += [parse_variant(v) for v in a.variant]
    common = ["--load-format", "dummy", "--dtype", "bfloat16", "--sampling-backend", "pytorch",
              "--grammar-backend", "none", "--context-length", str(max(ctxs) + N + 512),
              "--page-size", str(a.page_size), "--max-running-requests", str(max(batches)),
              "--cuda-graph-max-bs", str(max(batches)), "--skip-tokenizer-init",
              "--disable-prefill-cuda-graph", *a.extra.split()]
    if a.mem_fraction_static:
        common += ["--mem-fraction-static", a.mem_fraction_static]
    if a.cpu_smoke:      # the CPU harness: fp32, real (tiny) weights, no CUDA graphs
        common = [x for x in common if x not in ("--load-format", "dummy",
                                                  "--disable-prefill-cuda-graph")]
        common[common.index("bfloat16")] = "float32"
        common += ["--max-total-tokens", str(max(batches) * (max(ctxs) + N + 512))]
    res = {"gpu": gpu, "commit": os.environ.get("SPECSA_COMMIT", "unknown"),
           "command": " ".join(sys.argv), "target": a.target, "target_config": SHAPES[a.target],
           "new_tokens": N, "page_size": a.page_size, "rows": [], "servers": {}}
    path = out / "sglang_e2e.json"

    def save():
        path.write_text(json.dumps(res, indent=1))

    t_all = time.time()
    port = 31000
    sweep_prof = None       # the profile the last SPECSA_PLAN=sweep server measured ("@sweep")
    for name, system, env in runs:
        for dname, ddir in (drafts.items() if system in SPEC else [(None, None)]):
            key = name if dname is None else f"{name}/{dname}"
            if time.time() - t_all > a.budget_s:
                res["servers"][key] = {"skipped": "time budget"}
                continue
            port += 1
            timing = out / f"timing_{key.replace('/', '_')}.json"
            env_full = dict(env)
            if any("@sweep" in v for v in env.values()):
                # SPECSA_PLAN=auto,profile=@sweep: the planner reads what this run measured
                if not sweep_prof or sweep_prof.startswith("failed"):
                    res["servers"][key] = {"skipped": f"no sweep profile ({sweep_prof})"}
                    continue
                env_full = {k: v.replace("@sweep", sweep_prof) for k, v in env.items()}
            # a variant may turn the step timer off (SPECSA_STEP_TIMING=): it synchronises at
            # every step end, which costs SGLang's overlap scheduling its overlap
            jit_log = out / f"jit_{key.replace('/', '_')}.jsonl"
            if system in ("nsa_ar",) or system.startswith("specsa"):
                env_full["SPECSA_JIT_LOG"] = str(jit_log)    # compiles while serving
            if system.startswith("specsa") and "SPECSA_STEP_TIMING" not in env:
                env_full["SPECSA_STEP_TIMING"] = str(timing)
                if a.torch_profile:
                    env_full["SPECSA_TORCH_PROFILE"] = \
                        f"{out / ('prof_' + key.replace('/', '_'))},{a.torch_profile}"
            sync_file = out / f"syncs_{key.replace('/', '_')}.json"
            if a.sync_debug and system.startswith("specsa"):
                env_full["SPECSA_SYNC_DEBUG"] = str(sync_file)
            args = common + system_args(system, ddir, tree)
            if "DRAFT_VOCAB" in env_full:
                # a variant's draft vocabulary: --speculative-token-map of the first N ids
                # (on dummy weights this costs acceptance, so the row measures the step's cost)
                import torch
                n_hot = int(env_full.pop("DRAFT_VOCAB"))
                hot_path = out / f"hot_tokens_{n_hot}.pt"
                torch.save(list(range(n_hot)), hot_path)
                args += ["--speculative-token-map", str(hot_path)]
            package = res.get("commit")
            if "PACKAGE" in env_full:
                # another commit's SpecSA for this server: its own staged site, alone on the path
                pkg = Path(env_full.pop("PACKAGE"))
                site = stage_package(pkg, on_path=False)
                env_full["PYTHONPATH"] = os.pathsep.join(x for x in (base_path, str(site)) if x)
                package = checkout_commit(pkg)
            info = res["servers"][key] = {"system": system, "draft": dname, "package": package,
                                          "env": {k: env_full.get(k, v) for k, v in env.items()},
                                          "args": args}
            t0 = time.time()
            try:
                with launch_server(target, port, args, cpu=a.cpu_smoke, env=env_full, timeout=600,
                                   log_path=out / f"log_{key.replace('/', '_')}.txt") as srv:
                    info["start_s"] = round(time.time() - t0, 1)
                    status, si = srv.get("/get_server_info")
                    if status == 200 and isinstance(si, dict):
                        info["max_total_num_tokens"] = si.get("max_total_num_tokens")
                    cap = info.get("max_total_num_tokens") or 1 << 40
                    t1 = time.time()
                    for w in range(2):      # compile every prefill / decode / verify kernel
                        n_warm = min(2000 + 997 * w, max(ctxs) // 2)
                        srv.generate(input_ids=[random.Random(w).randrange(2, id_hi)
                                                for _ in range(n_warm)], max_new_tokens=24)
                    info["warmup_s"] = round(time.time() - t1, 1)
                    for L in ctxs:
                        for B in batches:
                            row = {"system": name, "base_system": system, "draft": dname,
                                   "package_commit": package, "context": L, "batch": B}
                            if B * (L + N + 2 * a.page_size + 64) > cap:
                                row["skipped"] = f"KV pool holds {cap} tokens"
                                res["rows"].append(row)
                                continue
                            try:
                                row.update(run_point(srv, L, B, N, a.seed, id_hi))
                            except Exception as e:  # noqa: BLE001 - record, go on
                                row["error"] = str(e)[-1500:]
                            window = row.pop("_window", None)
                            # compiles inside the measured decode window (should be none)
                            row["jit_compiles"] = jit_in_window(jit_log, *window) \
                                if window and "SPECSA_JIT_LOG" in env_full else None
                            if row.get("accept_len") and row.get("ms_per_token"):
                                row["step_ms"] = round(row["ms_per_token"] * row["accept_len"], 3)
                                row["projected_ms_per_token"] = {
                                    str(x): round(row["step_ms"] / x, 3) for x in ACCEPT_PROJECTIONS}
                            if system.startswith("specsa"):
                                time.sleep(0.6)       # the timer writes at most every 0.5 s,
                                srv.generate(input_ids=[5] * 8, max_new_tokens=4)  # at a step end
                                row["breakdown"] = breakdown(timing, B, L, L + N + 64)
                            res["rows"].append(row)
                            print(json.dumps({k: v for k, v in row.items()
                                              if k not in ("out_head",)}), flush=True)
                            save()
            except Exception as e:  # noqa: BLE001 - a server that fails is a result too
                info["error"] = str(e)[-3000:]
                print(key, "FAILED", info["error"][-1500:], flush=True)
            if "SPECSA_SYNC_DEBUG" in env_full and sync_file.exists():
                syncs = json.loads(sync_file.read_text())       # where decode steps wait
                info["host_syncs"] = {"steps": syncs["steps"], "sites": [
                    {k: s[k] for k in ("where", "count", "message")} for s in syncs["sites"]]}
            if env.get("SPECSA_PLAN", "").startswith("sweep") and timing.exists():
                info["profile"] = sweep_prof = sweep_profile(
                    timing, out, key, ctxs, target, a.target, dname, gpu, env, res["commit"])
            save()
    base = {(r["context"], r["batch"]): r.get("out_head") for r in res["rows"]
            if r["system"] == "nsa_ar" and "out_head" in r}
    for r in res["rows"]:
        ref = base.get((r["context"], r["batch"]))
        if ref and "out_head" in r and r["system"] != "nsa_ar":
            r["same_head_as_nsa_ar"] = r["out_head"] == ref
    res["wall_s"] = round(time.time() - t_all, 1)
    save()
    print(table(res))


def sweep_profile(timing: Path, out: Path, key: str, ctxs: list[int], target_dir: str,
                  target: str, draft: str | None, gpu: str, env: dict, commit: str) -> str:
    """The planner profile measured by a SPECSA_PLAN=sweep server (sglang_profile.py)."""
    from sglang_profile import build_profile

    from specsa.config import VerifyKnobs
    from specsa.orchestrator import Profile, save_profile
    from specsa.sglang_plugin.settings import resolve_nsa_config
    knobs = VerifyKnobs.parse(env["SPECSA_VERIFY"], "SPECSA_VERIFY") \
        if env.get("SPECSA_VERIFY") else VerifyKnobs()
    cfg = resolve_nsa_config(None, env={k: v for k, v in env.items() if k == "SPECSA_NSA"})
    try:
        cfg_json = json.loads((Path(target_dir) / "config.json").read_text())
        prof = build_profile(json.loads(timing.read_text()), ctxs, cfg_json,
                             cfg.to_dict(), gpu, draft or "self", target,
                             {"source": f"sglang_e2e.py server {key}", "commit": commit,
                              "command": " ".join(sys.argv),
                              "refresh_period": knobs.refresh_period})
        path = out / f"profile_{key.replace('/', '_')}.json"
        save_profile(Profile.from_dict(prof), path)
        return str(path)
    except (SystemExit, Exception) as e:  # noqa: BLE001 - report, keep the run going
        return f"failed: {e}"


def table(res: dict) -> str:
    lines = ["| system | draft | context | batch | ms/token | tokens/s | accept | step ms | prefill s "
             "| compiles in window |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "ms_per_token" not in r:
            lines.append(f"| {r['system']} | {r['draft'] or '-'} | {r['context']} | {r['batch']} "
                         f"| {r.get('skipped') or 'error'} | | | | | |")
            continue
        jit = r.get("jit_compiles")
        lines.append(f"| {r['system']} | {r['draft'] or '-'} | {r['context']} | {r['batch']} | "
                     f"{r['ms_per_token']} | {r['tokens_per_s']} | {r.get('accept_len') or '-'} | "
                     f"{r.get('step_ms') or '-'} | {r['prefill_s']} | "
                     f"{'-' if jit is None else jit['count']} |")
    return "\n".join(lines)


def plot(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = json.loads(path.read_text())
    rows = [r for r in res["rows"] if "ms_per_token" in r]
    # PNGs named after the JSON (sglang_e2e_128k.json -> sglang_e2e_128k_ms_per_token.png)
    for metric, fname, ylabel in (("ms_per_token", f"{path.stem}_ms_per_token.png", "ms / token"),
                                  ("tokens_per_s", f"{path.stem}_tokens_per_s.png", "tokens / s")):
        batches = sorted({r["batch"] for r in rows})
        fig, axes = plt.subplots(1, len(batches), figsize=(max(8, 5 * len(batches)), 4.5),
                                 squeeze=False)
        for ax, B in zip(axes[0], batches):
            keys = sorted({(r["system"], r["draft"]) for r in rows if r["batch"] == B},
                          key=str)
            for s, d in keys:
                pts = sorted((r["context"], r[metric]) for r in rows
                             if r["batch"] == B and r["system"] == s and r["draft"] == d)
                ax.plot([p[0] // 1024 for p in pts], [p[1] for p in pts], marker="o",
                        label=s if d is None else f"{s} ({d})")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (K tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"batch {B}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"SGLang end to end, {res['target']} (dummy weights), {res['gpu']}, "
                     f"commit {res['commit']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path.parent / fname, dpi=110)
        plt.close(fig)
    steps = [r for r in rows if r.get("breakdown")]
    if steps:       # where a speculative step's GPU time goes, per system and point
        phases = list(steps[0]["breakdown"]["gpu_ms"])
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(steps)), 4.5))
        labels = [f"{r['system']}\n{r['context'] // 1024}K b{r['batch']}" for r in steps]
        bottom = [0.0] * len(steps)
        for ph in phases:
            vals = [r["breakdown"]["gpu_ms"].get(ph) or 0.0 for r in steps]
            ax.bar(labels, vals, bottom=bottom, label=ph)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("GPU ms per speculative step")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"step breakdown, {res['gpu']}, commit {res['commit']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path.parent / f"{path.stem}_step_breakdown.png", dpi=110)
        plt.close(fig)
    print(table(res))


if __name__ == "__main__":
    main()
