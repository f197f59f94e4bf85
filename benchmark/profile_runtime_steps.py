"""The standalone runtime's latency profile, measured from its own whole steps on a GPU (not
composed from kernel timings), and the planner checked against the steps it prices.

    python benchmark/profile_runtime_steps.py --out $OUT                # H100 / H200, ~4 min
    python benchmark/profile_runtime_steps.py --tiny --out /tmp/p       # CPU smoke (tiny model)

Builds a random-weight `NSADecoder` of a model-shape preset (default the Llama-3.1-8B shape,
bf16, the Triton attention path on CUDA), prefills `max(batches)` requests to every context,
and times whole target forwards (`model(cache, blocks, knobs=..., traversal=...)`: host
planning, all layers, LM head; synchronised, median of --reps after one warm-up) at every
(context, batch, verifier tokens T, traversal, schedule, group size, refresh period) point of
the grid, plus decode steps (T = 1) per refresh period, plus the drafters `oracle` (host only)
and `self:1` (one target layer per depth level). Each point runs in the precision class its
knobs need (REUSE for R > 1, APPROX for SHARED_INDEX). Writes
<out>/<gpu>/runtime/<model>.json (schema specsa.profile/1; copy it to configs/profiles/ to
ship it: the runtime's `--plan auto` looks there first).

Then the check (`runtime_plan_check.json`): the runtime's speculative loop with an
`AdaptiveController` on this profile, the oracle drafter accepting each drafted token with
probability --accept, greedy, in the STRICT and REUSE classes, at the middle context: the
planner's predicted step time against the measured one (`SpecStats.planner_summary`: the
measured step also holds acceptance and commit, which the profile does not price), the
strategies it applied, and whether the tokens equal autoregressive decoding's (STRICT; in bf16
on a GPU a verify forward of T rows and a decode forward of one row may round the dense layers
differently, which on random weights' flat logits can flip a greedy token: the exactness tests
run in fp32. The oracle proposes nothing once the output leaves its AR truth, so acceptance
after a divergence, and under REUSE, which changes the model, is not meaningful here).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_planner import MODELS, _meta, tree_parents  # noqa: E402

from specsa.config import (CacheConfig, NSAConfig, PrecisionClass, SamplingConfig,  # noqa: E402
                           Schedule, Traversal, VerifyKnobs)
from specsa.draft_tree import TreeSpec  # noqa: E402
from specsa.model import BlockInput  # noqa: E402
from specsa.model.config import ModelConfig, RopeConfig  # noqa: E402
from specsa.model.decoder import NSADecoder  # noqa: E402
from specsa.model.tiny import TINY_NSA  # noqa: E402
from specsa.orchestrator import (RUNTIME_SUBDIR, AdaptiveController, Candidates, Profile,  # noqa: E402
                                 gpu_folder, save_profile)
from specsa.runtime.drafters import OracleDrafter  # noqa: E402
from specsa.runtime.drafters.base import DraftRequest  # noqa: E402
from specsa.runtime.drafters.model import truncated_view  # noqa: E402
from specsa.runtime.generate import generate  # noqa: E402
from specsa.runtime.loop import speculative_generate  # noqa: E402


def build_model(preset: str, tiny: bool, device: str) -> NSADecoder:
    """Random weights (seed 0); bf16 on CUDA, fp32 on CPU."""
    if tiny:
        cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64,
                          intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                          head_dim=16)
        nsa = TINY_NSA
    else:
        L, h, i, hq, hkv, d, v = MODELS[preset]
        cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=v, hidden_size=h,
                          intermediate_size=i, num_layers=L, num_heads=hq, num_kv_heads=hkv,
                          head_dim=d, rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0),
                          max_position_embeddings=1 << 20)
        nsa = NSAConfig()
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    # parameters in bf16 on a GPU; RoPE tables stay fp32 (explicit in Rotary)
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = NSADecoder(cfg, nsa)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def knobs_for(sched: Schedule, c: int, r: int) -> VerifyKnobs:
    """The narrowest precision class that allows the schedule and refresh period."""
    approx = sched is Schedule.SHARED_INDEX
    prec = {(False, False): PrecisionClass.STRICT, (False, True): PrecisionClass.REUSE,
            (True, False): PrecisionClass.APPROX, (True, True): PrecisionClass.APPROX_REUSE}
    return VerifyKnobs(precision=prec[(approx, r > 1)], schedule=sched,
                       group_size=1 if sched is Schedule.INDEPENDENT else c, refresh_period=r)


class Timer:
    def __init__(self, device: str, reps: int):
        self.cuda, self.reps = device == "cuda", reps

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        fn()                      # warm-up: Triton compiles, allocator growth
        ts = []
        for _ in range(self.reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)


def prefill(model, cache, rid: int, ids: list[int], chunk: int) -> None:
    for s in range(0, len(ids), chunk):
        _, pend = model(cache, [BlockInput(rid, ids[s:s + chunk])], last_only=True)
        cache.commit(rid, pend)


def measure(args, model, device: str) -> tuple[list, list, list, list]:
    """(verify entries, decode entries, draft entries, errors)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(2, cfg.vocab_size, (n,), generator=gen).tolist()
    B = max(args.batches)
    pages = B * -(-(max(args.contexts) + max(args.tokens) + 16) // args.page_size) + 16
    cache = model.new_cache(CacheConfig(page_size=args.page_size, num_pages=pages))
    timed = Timer(device, args.reps)
    combos = [(tr, s, c) for tr in args.traversals for s in args.schedules
              for c in ([1] if s is Schedule.INDEPENDENT else args.group_sizes)]
    verify, decode, errors = [], [], []
    t0 = time.time()
    for ctx in args.contexts:
        rids = list(range(B))
        for r in rids:
            cache.add_request(r)
            prefill(model, cache, r, rand(ctx), args.chunk)
        timed.sync()
        print(f"ctx {ctx}: prefilled {B} requests ({time.time() - t0:.0f} s)", flush=True)
        for b in args.batches:
            for r in args.refresh_periods:
                kn = knobs_for(Schedule.INDEPENDENT, 1, r)
                one = [BlockInput(x, rand(1)) for x in rids[:b]]
                ms = timed(lambda: model(cache, one, last_only=True, knobs=kn))
                decode.append({"context": ctx, "batch": b, "refresh_period": r, "ms": ms})
            for tr, sched, c in combos:
                if time.time() - t0 > args.budget_s:
                    errors.append(f"time budget: skipped ctx {ctx} B{b} {tr.value}/"
                                  f"{sched.value}/C{c}")
                    continue
                try:
                    rows = []
                    for t in args.tokens:
                        blocks = [BlockInput(x, rand(t), tree_parents(t, tr is Traversal.CHAIN))
                                  for x in rids[:b]]
                        for r in args.refresh_periods:
                            kn = knobs_for(sched, c, r)
                            ms = timed(lambda: model(cache, blocks, knobs=kn, traversal=tr))
                            rows.append({"context": ctx, "tokens": t, "traversal": tr.value,
                                         "schedule": sched.value, "group_size": kn.group_size,
                                         "refresh_period": r, "batch": b, "ms": ms})
                    verify += rows          # a slice enters only when its grid is complete
                    print(f"ctx {ctx} B={b} {tr.value:5s} {sched.value:12s} C={c}: T="
                          f"{args.tokens[-1]} {rows[-len(args.refresh_periods)]['ms']:.2f} ms "
                          f"({time.time() - t0:.0f} s)", flush=True)
                except Exception as e:  # noqa: BLE001 - keep the other slices
                    errors.append(f"ctx {ctx} B{b} {tr.value}/{sched.value}/C{c}: {e!r}"[:400])
                    print("FAILED", errors[-1], flush=True)
        for r in rids:
            cache.free_request(r)
    # every (traversal, schedule, C, R, batch) slice must cover every context: drop partial ones
    ctxs = set(args.contexts)
    key = lambda e: (e["traversal"], e["schedule"], e["group_size"], e["refresh_period"],
                     e["batch"])
    full = {k for k in {key(e) for e in verify}
            if {e["context"] for e in verify if key(e) == k} == ctxs}
    verify = [e for e in verify if key(e) in full]
    # drafters at the middle context: the oracle (host work only) and self:1 (one layer)
    ctx = args.contexts[len(args.contexts) // 2]
    cache.add_request(0)
    prefill(model, cache, 0, rand(ctx), args.chunk)
    view = truncated_view(model, 1)
    one = timed(lambda: view(cache, [BlockInput(0, rand(1))]))
    eight = timed(lambda: view(cache, [BlockInput(0, rand(9), tree_parents(9, False))]))
    orc = OracleDrafter(1.0, TreeSpec(topk=1, depth=4, tokens=4), cfg.vocab_size)
    ctx_toks = rand(ctx)
    orc.set_truth(1, ctx_toks + rand(8))
    orc_ms = timed(lambda: orc.propose([DraftRequest(1, tuple(ctx_toks))]))
    cache.free_request(0)
    draft = [{"name": "oracle", "step_ms": orc_ms / 4, "token_ms": 0.0},
             {"name": "self:1", "step_ms": one, "token_ms": max(0.0, (eight - one) / 8)}]
    return verify, decode, draft, errors


def plan_check(args, model, prof: Profile) -> dict:
    """The runtime's loop under the controller, STRICT and REUSE, predicted vs measured."""
    cfg = model.cfg
    ctx = args.contexts[len(args.contexts) // 2]
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, cfg.vocab_size, (ctx,), generator=gen).tolist()
    n = args.check_tokens
    sampling = SamplingConfig(max_new_tokens=n)
    res, _ = generate(model, [prompt], sampling, page_size=args.page_size,
                      chunk_size=args.chunk)
    truth = res[0].tokens
    out = {"context": ctx, "new_tokens": n, "accept_prob": args.accept, "runs": []}
    for prec in args.check_classes:
        drafter = OracleDrafter(args.accept, TreeSpec(topk=1, depth=4, tokens=4),
                                cfg.vocab_size, seed=0)
        drafter.set_truth(0, prompt + truth)    # request id 0: first request of a fresh cache
        ctl = AdaptiveController(prof, prec, Candidates(drafter="oracle"))
        t0 = time.time()
        got, stats = speculative_generate(model, [prompt], drafter, sampling,
                                          page_size=args.page_size, chunk_size=args.chunk,
                                          controller=ctl)
        d = stats.to_dict()
        run = {"precision": prec, "planner": d.get("planner"), "knob_counts": d["knob_counts"],
               "mean_accept_len": d["mean_accept_len"], "decode_tokens_per_s":
               d["decode_tokens_per_s"], "same_tokens_as_ar": got[0].tokens == truth,
               "first_divergence": next((i for i, (a, b) in enumerate(zip(got[0].tokens, truth))
                                         if a != b), None),
               "wall_s": round(time.time() - t0, 1),
               "steps": [{"predicted_ms": p, "measured_ms": m} for p, m in stats.planned_steps]}
        out["runs"].append(run)
        print(f"plan check {prec}: {run['planner']} same as AR: {run['same_tokens_as_ar']}",
              flush=True)
    return out


def _enum_list(enum, text: str) -> list:
    return [enum(x.strip()) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    ap.add_argument("--tiny", action="store_true",
                    help="a 4-layer tiny model on the CPU torch path (a smoke run of this script)")
    ap.add_argument("--contexts", type=_ints, default=None)
    ap.add_argument("--batches", type=_ints, default=None)
    ap.add_argument("--tokens", type=_ints, default=None, help="verifier tokens T (with root)")
    ap.add_argument("--traversals", default="chain,bfs")
    ap.add_argument("--schedules", default="independent,exact_merged,shared_index")
    ap.add_argument("--group-sizes", type=_ints, default=[4])
    ap.add_argument("--refresh-periods", type=_ints, default=[1, 4])
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (tokens)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=360.0)
    ap.add_argument("--accept", type=float, default=0.8, help="plan check: oracle accept prob")
    ap.add_argument("--check-tokens", type=int, default=None)
    ap.add_argument("--check-classes", default="strict,reuse")
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_runtime_steps.py: no CUDA device (use --tiny for a CPU smoke)")
    small = args.tiny
    args.contexts = args.contexts or ([64, 256] if small else [8192, 32768])
    args.batches = args.batches or ([1, 2] if small else [1, 4])
    args.tokens = args.tokens or ([2, 4] if small else [2, 4, 8, 16])
    args.chunk = args.chunk or (128 if small else 8192)
    args.reps = args.reps or (2 if small else 7)
    args.check_tokens = args.check_tokens or (16 if small else 64)
    args.traversals = _enum_list(Traversal, args.traversals)
    args.schedules = _enum_list(Schedule, args.schedules)
    args.check_classes = [x.strip() for x in args.check_classes.split(",") if x.strip()]
    if small:       # the CPU torch path has one attention implementation
        args.schedules = [Schedule.INDEPENDENT]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, small, device)
    t0 = time.time()
    verify, decode, draft, errors = measure(args, model, device)
    c = model.cfg
    name = "tiny" if small else args.model
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    meta = _meta(args, "measured: whole forwards of the standalone runtime "
                       "(benchmark/profile_runtime_steps.py; specsa.model.NSADecoder, random "
                       f"weights, {'fp32 torch path' if small else 'bf16 Triton path'}, eager), "
                       f"synchronised, median of {args.reps} after a warm-up")
    meta.update(errors=errors, wall_s=round(time.time() - t0, 1), page_size=args.page_size,
                engine="runtime")
    prof = Profile.from_dict({
        "schema": "specsa.profile/1", "gpu": gpu,
        "model": {"name": name, "num_layers": c.num_layers, "hidden_size": c.hidden_size,
                  "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
                  "head_dim": c.head_dim, "vocab_size": c.vocab_size,
                  "nsa": model.nsa.to_dict()},
        "metadata": meta, "decode": decode, "draft": draft, "verify": verify})
    path = save_profile(prof, out / gpu_folder(gpu) / RUNTIME_SUBDIR / f"{name}.json")
    # a flat copy too: the device tool returns files of a shallow tree only
    save_profile(prof, out / f"runtime_profile_{gpu_folder(gpu)}_{name}.json")
    print(f"wrote {path}: {len(prof.verify)} verify, {len(prof.decode)} decode entries "
          f"({time.time() - t0:.0f} s)", flush=True)
    check = plan_check(args, model, prof)
    check.update(gpu=gpu, commit=meta["commit"], command=meta["command"], profile=str(path))
    (out / "runtime_plan_check.json").write_text(json.dumps(check, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
