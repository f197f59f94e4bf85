"""Measure the latency table the planner needs and write configs/profiles/<gpu>/<model>.json
(schema: configs/profiles/README.md, loaded by specsa.orchestrator.load_profile).

    python benchmark/profile_planner.py --device cpu                  # tiny model, CPU runtime
    python benchmark/profile_planner.py --model llama3-8b --out-dir $OUT    # H200, < 8 min
    python benchmark/profile_planner.py --model llama3-8b --quick --out-dir $OUT  # smaller grid

CPU (--device cpu): times whole forwards of the standalone runtime (specsa.model.NSADecoder on
a deterministic tiny random checkpoint, torch reference path): verification of chain and
binary-tree blocks, decode steps, and the `self:1` / `ngram` drafters. The CPU path has one
attention implementation, so the profile lists schedule `independent`, refresh period 1 only.

GPU: a kernel-level view, the model-step latency composed from measured pieces (CUDA graphs,
cold L2, median), i.e. what a step would cost without the host (a lower bound for engines
that replay graphs). Profiles measured from whole steps are what the planners read:
benchmark/profile_runtime_steps.py (the standalone runtime) and SPECSA_PLAN=sweep in SGLang
(benchmark/sglang_e2e.py / sglang_profile.py).

    verify_ms = L * (attn(schedule, C, traversal, ctx, T, B) + ceil(L/R)/L * refresh(ctx, T, B)
                     + dense(T*B)) + head(T*B)
    decode_ms = L * (decode_attn(ctx, B) + ceil(L/R)/L * refresh(ctx, 1, B) + dense(B)) + head(B)

attn: `NSAVerifier.prepare/run` (selected + window + combine) on synthetic selections with
adjacent-query overlap --overlap; refresh: `score_topk` (compressed attention + scores + top-n;
reuse layers skip it, union combine); dense: the layer's q/k/v/o and MLP matmuls; head: final
LM head. Self-drafter cost: `self:K` = K layers of a decode-like step per depth level.
The raw components are kept in metadata.components so the composition can be audited.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from specsa.config import NSAConfig, Schedule, Traversal  # noqa: E402
from specsa.orchestrator import Profile, save_profile  # noqa: E402

MODELS = {   # name -> (layers, hidden, intermediate, heads, kv heads, head dim, vocab)
    "llama3-8b": (32, 4096, 14336, 32, 8, 128, 128256),
    "llama3-1b": (16, 2048, 8192, 32, 8, 64, 128256),
    "qwen2.5-7b": (28, 3584, 18944, 28, 4, 128, 152064),
}


def tree_parents(t: int, chain: bool) -> list[int]:
    """Chain, or a binary tree (node u under (u-1)//2)."""
    return list(range(-1, t - 1)) if chain else [-1] + [(u - 1) // 2 for u in range(1, t)]


def _git() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=ROOT).stdout.strip()
        return out if len(out) == 40 else "unknown (no commit)"
    except Exception:  # noqa: BLE001 - metadata only
        return "unknown"


def _meta(args, source: str) -> dict:
    return {"source": source, "command": " ".join(sys.argv), "commit": os.environ.get(
        "SPECSA_COMMIT") or _git(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- CPU: the runtime ------
def cpu_profile(args) -> Profile:
    from specsa.config import CacheConfig
    from specsa.model import BlockInput, load_model
    from specsa.model.tiny import build_tiny
    from specsa.runtime.drafters import NGramDrafter
    from specsa.runtime.drafters.base import DraftRequest
    from specsa.runtime.drafters.model import truncated_view
    from specsa.draft_tree import TreeSpec

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(build_tiny(Path(tmp) / "tiny", kind="llama", seed=0)).eval()
    cfg, ctxs, toks, batches = model.cfg, args.contexts, args.tokens, args.batches
    pages = max(batches) * sum(-(-(c + max(toks) + 1) // 16) for c in ctxs) + 16
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=pages))
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(2, cfg.vocab_size, (n,), generator=gen).tolist()

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return min(ts)      # shared CPU machines: the minimum is the least contended sample

    # Every request holds max(contexts) tokens of its own; a point at context c runs on
    # requests prefilled to exactly c. Points are timed in interleaved rounds (one sample per
    # point per round, min over rounds) so a burst of machine contention hits different points
    # in different rounds instead of all samples of one point.
    points = []   # (record, closure)
    rid = 0
    for ctx in ctxs:
        rids = []
        for _ in range(max(batches)):
            cache.add_request(rid)
            for i in range(0, ctx, 256):
                _, pend = model(cache, [BlockInput(rid, rand(min(256, ctx - i)))], last_only=True)
                cache.commit(rid, pend)
            rids.append(rid)
            rid += 1
        for b in batches:
            one = [BlockInput(r, rand(1)) for r in rids[:b]]
            points.append(({"context": ctx, "batch": b},
                           lambda one=one: model(cache, one, last_only=True)))
            for t in toks:
                for trav, chain in ((Traversal.CHAIN, True), (Traversal.BFS, False)):
                    blocks = [BlockInput(r, rand(t), tree_parents(t, chain)) for r in rids[:b]]
                    points.append(({"context": ctx, "tokens": t, "traversal": trav.value,
                                    "schedule": Schedule.INDEPENDENT.value, "group_size": 1,
                                    "refresh_period": 1, "batch": b},
                                   lambda blocks=blocks: model(cache, blocks)))
    best = [float("inf")] * len(points)
    for rnd in range(args.reps):
        for i, (_, fn) in enumerate(points):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
        print(f"round {rnd + 1}/{args.reps} done", flush=True)
    verify = [{**rec, "ms": ms} for (rec, _), ms in zip(points, best) if "tokens" in rec]
    decode = [{**rec, "ms": ms} for (rec, _), ms in zip(points, best) if "tokens" not in rec]
    rids = list(cache.requests())
    # drafters at the middle context: self:1 per depth level (frontier of 1 vs 8 nodes)
    ctx = ctxs[len(ctxs) // 2]
    for r in rids:
        cache.free_request(r)
    cache.add_request(0)
    _, pend = model(cache, [BlockInput(0, rand(ctx))], last_only=True)
    cache.commit(0, pend)
    view = truncated_view(model, 1)
    one = timed(lambda: view(cache, [BlockInput(0, rand(1))]))
    eight = timed(lambda: view(cache, [BlockInput(0, rand(9), tree_parents(9, False))]))
    ng = NGramDrafter(3, TreeSpec(topk=1, depth=8, tokens=8))
    ctx_toks = tuple(rand(ctx))
    ng_ms = timed(lambda: ng.propose([DraftRequest(0, ctx_toks)]))
    draft = [{"name": "self:1", "step_ms": one, "token_ms": max(0.0, (eight - one) / 8)},
             {"name": "ngram", "step_ms": 0.0, "token_ms": ng_ms / 8}]
    raw = {"verify": [dict(e) for e in verify], "decode": [dict(e) for e in decode]}
    verify, decode = _smooth(verify, decode)
    shape = {"name": args.name or "tiny", "num_layers": cfg.num_layers,
             "hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads,
             "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
             "vocab_size": cfg.vocab_size, "nsa": model.nsa.to_dict()}
    meta = _meta(args, "measured: specsa.model.NSADecoder tiny random checkpoint "
                       "(build_tiny llama seed 0) on CPU, torch reference attention; "
                       f"whole-forward wall time, min over {args.reps} interleaved rounds, then a "
                       "non-negative "
                       "least-squares fit ms = c0 + c1*B + c2*T*B + c3*ctx*B + c4*ctx*T*B per "
                       "traversal (decode: T = 1) to remove shared-machine noise; raw samples "
                       "in metadata.raw")
    meta["raw"] = raw
    meta["cpu"] = platform.processor() or platform.machine()
    return Profile.from_dict({"schema": "specsa.profile/1", "gpu": "cpu", "model": shape,
                              "metadata": meta, "decode": decode, "draft": draft,
                              "verify": verify})


def _nnls_fit(rows: list[dict], tokens) -> list[float]:
    """Fitted ms for rows (features 1, B, T*B, ctx*B, ctx*T*B), coefficients kept >= 0 by
    dropping negative ones and refitting (tiny active-set NNLS)."""
    feats = lambda e: [1.0, e["batch"], tokens(e) * e["batch"], e["context"] * e["batch"] / 1e3,
                       e["context"] * tokens(e) * e["batch"] / 1e3]
    x = torch.tensor([feats(e) for e in rows], dtype=torch.float64)
    y = torch.tensor([e["ms"] for e in rows], dtype=torch.float64)
    active = list(range(x.shape[1]))
    while True:
        coef = torch.linalg.lstsq(x[:, active], y[:, None]).solution.flatten()
        if (coef >= 0).all() or len(active) == 1:
            break
        active = [a for a, c in zip(active, coef.tolist()) if c >= 0]
    fit = x[:, active] @ coef.clamp(min=0)
    return [max(1e-3, float(v)) for v in fit]


def _smooth(verify: list[dict], decode: list[dict]) -> tuple[list[dict], list[dict]]:
    out = []
    for trav in sorted({e["traversal"] for e in verify}):
        rows = [e for e in verify if e["traversal"] == trav]
        out += [{**e, "ms": m} for e, m in zip(rows, _nnls_fit(rows, lambda e: e["tokens"]))]
    dec = [{**e, "ms": m} for e, m in zip(decode, _nnls_fit(decode, lambda e: 1))]
    return out, dec


# ---------------------------------------------------------------- GPU: kernels ----------
class GpuParts:
    """Per-layer component timings on CUDA (bf16), memoised by their arguments."""

    def __init__(self, args, shape):
        from timing import L2Flush, bench
        self.bench, self.flush = bench, L2Flush("cuda")
        self.args = args
        (self.L, self.h, self.i, self.hq, self.hkv, self.d, self.v) = shape
        self.nsa = args.nsa
        self.p = self.nsa.params
        self.ps = 64
        self.dt = torch.bfloat16
        self.components: dict[str, float] = {}
        self._pool = None

    def _t(self, key: str, fn) -> float:
        if key not in self.components:
            self.components[key] = self.bench(fn, self.flush, reps=self.args.reps)["median_us"] / 1e3
        return self.components[key]

    def pool(self, tokens: int, batch: int):
        npg = -(-tokens // self.ps)
        need = npg * batch
        if self._pool is None or self._pool[0].shape[0] < need:
            self._pool = None
            torch.cuda.empty_cache()
            shape = (need, self.ps, self.hkv, self.d)
            cpp = self.p.cmp_per_page(self.ps)
            self._pool = (torch.randn(shape, device="cuda", dtype=self.dt),
                          torch.randn(shape, device="cuda", dtype=self.dt),
                          torch.randn(need, cpp, self.hkv, self.d, device="cuda", dtype=self.dt),
                          torch.randn(need, cpp, self.hkv, self.d, device="cuda", dtype=self.dt))
        perm = torch.randperm(self._pool[0].shape[0], device="cuda")[:need].to(torch.int32)
        return (*self._pool, perm.view(batch, npg).contiguous())

    def dense(self, n: int) -> float:
        """One layer's projections + MLP for n token rows."""
        def make():
            x = torch.randn(n, self.h, device="cuda", dtype=self.dt)
            wqkv = torch.randn((self.hq + 2 * self.hkv) * self.d, self.h, device="cuda", dtype=self.dt)
            wo = torch.randn(self.h, self.hq * self.d, device="cuda", dtype=self.dt)
            wgu = torch.randn(2 * self.i, self.h, device="cuda", dtype=self.dt)
            wd = torch.randn(self.h, self.i, device="cuda", dtype=self.dt)
            o = torch.empty(n, self.hq * self.d, device="cuda", dtype=self.dt)

            def fn():
                qkv = x @ wqkv.T
                y = o @ wo.T
                gu = y @ wgu.T
                a = torch.nn.functional.silu(gu[:, :self.i]) * gu[:, self.i:]
                return a @ wd.T + qkv[:, :1]
            return fn
        return self._t(f"dense/n{n}", make())

    def head(self, n: int) -> float:
        x = torch.randn(n, self.h, device="cuda", dtype=self.dt)
        w = torch.randn(self.v, self.h, device="cuda", dtype=self.dt)
        return self._t(f"head/n{n}", lambda: x @ w.T)

    def refresh(self, ctx: int, t: int, b: int) -> float:
        from specsa.kernels.refresh import RefreshArgs, score_topk
        key = f"refresh/ctx{ctx}/T{t}/B{b}"
        if key in self.components:
            return self.components[key]
        kc, vc, ckc, cvc, bt = self.pool(ctx + t, b)
        par = tree_parents(t, True)
        q = torch.randn(b * t, self.hq, self.d, device="cuda", dtype=self.dt)
        i32 = dict(dtype=torch.int32, device="cuda")   # score_topk compiles for int32 indices
        q_req = torch.arange(b, **i32).repeat_interleave(t)
        q_pos = torch.tensor([ctx + u for u in range(len(par))] * b, **i32)
        cmp_lens = torch.full((b,), self.p.num_cmp(ctx), **i32)
        sel = torch.empty(b * t, self.hkv, self.p.topn, device="cuda", dtype=torch.int32)
        a = RefreshArgs(q, ckc, cvc, bt, q_req, q_pos, cmp_lens, self.p, self.d ** -0.5, self.ps,
                        with_out=self.p.gated, sel=sel)
        fn = lambda: score_topk(a)
        return self._t(key, fn)

    def attn(self, ctx: int, t: int, b: int, sched: Schedule, trav: Traversal, c: int) -> float:
        from kernels import synthetic_sel  # benchmark/kernels.py: shared synthetic selections
        from specsa.verifier import NSAVerifier
        from specsa.draft_tree import traversal_order
        key = f"attn/{sched.value}/{trav.value}/C{c}/ctx{ctx}/T{t}/B{b}"
        if key in self.components:
            return self.components[key]
        kc, vc, _, _, bt = self.pool(ctx + t, b)
        chain = trav is Traversal.CHAIN
        par = tree_parents(t, chain)
        order = traversal_order(par, trav)
        dep = [0] * t
        for u in range(1, t):
            dep[u] = dep[par[u]] + 1
        pos = torch.tensor([ctx + x for x in dep], device="cuda")
        gen = torch.Generator().manual_seed(ctx + t)
        sel = torch.cat([synthetic_sel(pos, order, self.hkv, self.p, self.args.overlap, gen)
                         for _ in range(b)])
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=self.dt)
        nq = b * t
        q, kn, vn, o = mk(nq, self.hq, self.d), mk(nq, self.hkv, self.d), mk(nq, self.hkv, self.d), mk(nq, self.hq, self.d)
        kw = {}
        if self.p.gated:
            kw = dict(o_cmp=mk(nq, self.hq, self.d),
                      gates=torch.rand(nq, self.hq, 3, device="cuda", dtype=self.dt))
        ver = NSAVerifier(self.nsa, self.hq, self.hkv, self.d, device="cuda")
        prec = "approx" if sched is Schedule.SHARED_INDEX else "strict"
        ver.prepare([par] * b, [ctx] * b, bt, schedule=sched, traversal=trav, precision=prec,
                    group_size=c)
        return self._t(key, lambda: ver.run(q, kn, vn, kc, vc, sel, out=o, **kw))

    def decode_attn(self, ctx: int, b: int) -> float:
        from specsa.kernels.fused import VerifyArgs, decode_geometry, fused_decode, split_workspace
        from specsa.schedule import default_num_splits
        key = f"decode_attn/ctx{ctx}/B{b}"
        if key in self.components:
            return self.components[key]
        kc, vc, _, _, bt = self.pool(ctx + 1, b)
        nsm = torch.cuda.get_device_properties(0).multi_processor_count
        ns = default_num_splits(b * self.hkv, self.p.topn + self.p.window // 64, nsm)
        geo = decode_geometry([ctx] * b, bt, self.p, ns)
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=self.dt)
        q, kn, vn, o = mk(b, self.hq, self.d), mk(b, self.hkv, self.d), mk(b, self.hkv, self.d), mk(b, self.hq, self.d)
        sel = torch.cat([torch.arange(self.p.topn, device="cuda", dtype=torch.int32)
                         .clamp(max=ctx // self.p.select).expand(self.hkv, -1)[None]] * b)
        nb = 2 if self.p.gated else 1
        ws = None if ns == 1 else split_workspace(ns, nb, b, self.hq, self.d, b * self.hkv, "cuda")
        kw = {}
        if self.p.gated:
            kw = dict(o_cmp=mk(b, self.hq, self.d), gates=torch.rand(b, self.hq, 3, device="cuda", dtype=self.dt))
        a = VerifyArgs(q, kn, vn, kc, vc, geo, self.p, self.d ** -0.5, sel=sel, out=o, workspace=ws,
                       **kw)
        return self._t(key, lambda: fused_decode(a))


def gpu_profile(args) -> Profile:
    shape = MODELS[args.model]
    L = shape[0]
    parts = GpuParts(args, shape)
    t0 = time.time()
    verify, decode, errors = [], [], []
    periods = args.refresh_periods
    frac = lambda r: math.ceil(L / r) / L
    for b in args.batches:
        for ctx in args.contexts:
            for r in periods:
                ms = L * (parts.decode_attn(ctx, b) + frac(r) * parts.refresh(ctx, 1, b)
                          + parts.dense(b)) + parts.head(b)
                decode.append({"context": ctx, "batch": b, "refresh_period": r, "ms": ms})
    combos = [(Traversal.CHAIN, Schedule.INDEPENDENT, 1)]
    combos += [(tr, Schedule.INDEPENDENT, 1) for tr in (Traversal.BFS,)]
    for tr in (Traversal.CHAIN, Traversal.BFS, Traversal.DFS):
        combos += [(tr, Schedule.EXACT_MERGED, c) for c in args.group_sizes]
        combos += [(tr, Schedule.SHARED_INDEX, c) for c in args.group_sizes]
    for b in args.batches:
        for tr, sched, c in combos:
            if time.time() - t0 > args.budget_s:
                errors.append(f"time budget: skipped {tr.value}/{sched.value}/C{c}/B{b}")
                continue
            try:
                rows = []
                for ctx in args.contexts:
                    for t in args.tokens:
                        base = parts.attn(ctx, t, b, sched, tr, c) + parts.dense(t * b)
                        for r in periods:
                            ms = L * (base + frac(r) * parts.refresh(ctx, t, b)) + parts.head(t * b)
                            rows.append({"context": ctx, "tokens": t, "traversal": tr.value,
                                         "schedule": sched.value, "group_size": c,
                                         "refresh_period": r, "batch": b, "ms": ms})
                verify += rows      # a slice enters only when its grid is complete
                print(f"B={b} {tr.value:5s} {sched.value:12s} C={c:2d}: T={args.tokens[-1]} "
                      f"ctx={args.contexts[-1]} {rows[-len(periods)]['ms']:.2f} ms "
                      f"({time.time() - t0:.0f} s)", flush=True)
            except Exception as e:  # keep the other slices
                errors.append(f"{tr.value}/{sched.value}/C{c}/B{b}: {e!r}"[:400])
                print("FAILED", errors[-1], flush=True)
    dec_mid = parts.decode_attn(args.contexts[len(args.contexts) // 2], 1)
    draft = [{"name": f"self:{k}", "step_ms": k * (dec_mid + parts.refresh(args.contexts[len(args.contexts) // 2], 1, 1)
                                                  + parts.dense(1)) + parts.head(1),
              "token_ms": 0.0} for k in (1, 2, 4)]
    draft.append({"name": "ngram", "step_ms": 0.0, "token_ms": 0.005})
    p = torch.cuda.get_device_properties(0)
    meta = _meta(args, "composed from measured kernel times (CUDA graphs, cold L2, median): "
                       "see benchmark/profile_planner.py docstring")
    meta.update(gpu_sms=p.multi_processor_count, overlap=args.overlap, dtype="bfloat16",
                page_size=parts.ps, errors=errors, wall_s=time.time() - t0,
                components=parts.components,
                notes="self:K draft cost = K decode-like layers + LM head per depth level; "
                      "ngram cost is a nominal 5 us per token (host lookup)")
    L_, h, i, hq, hkv, d, v = shape
    model = {"name": args.name or args.model, "num_layers": L_, "hidden_size": h,
             "num_heads": hq, "num_kv_heads": hkv, "head_dim": d, "vocab_size": v,
             "nsa": args.nsa.to_dict()}
    return Profile.from_dict({"schema": "specsa.profile/1", "gpu": p.name, "model": model,
                              "metadata": meta, "decode": decode, "draft": draft,
                              "verify": verify})


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model", choices=sorted(MODELS), default="llama3-8b",
                    help="GPU: model shape preset (CPU always uses the tiny checkpoint)")
    ap.add_argument("--name", default=None, help="model name in the profile / file name")
    ap.add_argument("--out-dir", default=str(ROOT.parent / "configs" / "profiles"))
    ap.add_argument("--contexts", type=_ints, default=None)
    ap.add_argument("--tokens", type=_ints, default=None, help="verifier tokens T (with root)")
    ap.add_argument("--batches", type=_ints, default=None)
    ap.add_argument("--group-sizes", type=_ints, default=[2, 4, 8, 16])
    ap.add_argument("--refresh-periods", type=_ints, default=[1, 2, 4])
    ap.add_argument("--overlap", type=float, default=0.5,
                    help="GPU: selected-block overlap of adjacent verifier queries")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="GPU: smaller grid (~2 min)")
    ap.add_argument("--budget-s", type=float, default=420.0)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        args.contexts = args.contexts or [64, 256, 1024]
        args.tokens = args.tokens or [2, 3, 5, 9, 17]
        args.batches = args.batches or [1, 4]
        args.reps = args.reps or 9
        prof = cpu_profile(args)
        gpu_dir = "cpu"
    else:
        if not torch.cuda.is_available():
            sys.exit("profile_planner.py: no CUDA device; use --device cpu")
        args.nsa = NSAConfig()
        quick = args.quick
        args.contexts = args.contexts or ([4096, 32768, 131072] if quick else [4096, 16384, 65536, 131072])
        args.tokens = args.tokens or ([2, 5, 17, 64] if quick else [2, 3, 5, 9, 17, 33, 64])
        args.batches = args.batches or ([1] if quick else [1, 8])
        if quick:
            args.group_sizes = [2, 4]
        args.reps = args.reps or 15
        prof = gpu_profile(args)
        gpu_dir = prof.gpu.lower().replace("nvidia ", "").replace(" ", "-")
    path = save_profile(prof, Path(args.out_dir) / gpu_dir / f"{prof.model.name}.json")
    print(f"wrote {path}: {len(prof.verify)} verify, {len(prof.decode)} decode entries", flush=True)


if __name__ == "__main__":
    main()
