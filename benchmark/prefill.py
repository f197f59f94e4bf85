"""NSA prefill on one GPU, one layer at Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128,
bf16, page 16, default NSA l=32 d=16 l'=64 n=16 w=512, union combine unless --gated): batch 1,
the whole prompt in chunks of --chunk tokens (SGLang's chunked prefill), K/V already in the
paged cache (the backend writes it before attention).

    python benchmark/prefill.py --out $OUT                          # GPU, about 2-4 minutes
    python benchmark/prefill.py --out $OUT --chunk 16384 --contexts 32768,65536
    TRITON_INTERPRET=1 python benchmark/prefill.py --smoke --out /tmp/p   # CPU plumbing check

Per context: the new path (`chunked_nsa_prefill`, impl "tiles") over all chunks, its stages
(compression; compressed attention + scores + top-n = the refresh; selected + window = sparse
free blocks + tile kernel, timed with the refresh's selections fixed), the old path (impl
"rows", contexts <= --old-max-ctx), and the dense reference: torch scaled_dot_product_attention
(is_causal, FlashAttention backend, GQA) over the whole prompt at once. Times: median of
triton.testing.do_bench (warm-up excluded, L2 cleared between reps). Checks: new vs old path on
the prompt's last --check-rows rows as one chunk (output rel. RMS error, equal selections), and
a few rows vs the fp32 reference (`naive_nsa_prefill_rows`).

Floors: FLOPs / measured bf16 matmul rate and bytes / measured copy bandwidth, both measured
here. NSA FLOPs = refresh (2 passes of QK over each row's compressed tokens, + PV if gated) +
selected U window (QK + PV over each row's tokens, counted from the selections); NSA bytes =
q + out + K/V + compressed K/V once. Dense FLOPs = 4 * Hq * D * ctx^2 / 2.

Imports the repository by path (no install needed): python/ on sys.path, kernels/ mapped to
`specsa.kernels`. Writes --out/prefill.json (gpu, commit from $SPECSA_COMMIT, command, rows).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _import_repo() -> None:
    """specsa from python/, specsa.kernels from kernels/ (what the package install maps)."""
    sys.path.insert(0, str(REPO / "python"))
    import specsa
    if "specsa.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "specsa.kernels", REPO / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["specsa.kernels"] = mod
        spec.loader.exec_module(mod)
        specsa.kernels = mod


_import_repo()

import torch  # noqa: E402

from specsa.kernels.common.params import NSAParams  # noqa: E402
from specsa.kernels.prefill import chunked_nsa_prefill, naive_nsa_prefill_rows  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- timing / rates ---------
def median_ms(fn, rep_ms: int) -> float:
    if DEV == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=max(25, rep_ms // 8), rep=rep_ms, return_mode="median"))
    fn()
    ts = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def matmul_rate(dtype) -> float:
    """Measured dense bf16 matmul FLOP/s (8192^3 on the GPU)."""
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, device=DEV, dtype=dtype)
    b = torch.randn(n, n, device=DEV, dtype=dtype)
    ms = median_ms(lambda: a @ b, 200)
    return 2 * n ** 3 / (ms * 1e-3)


def copy_rate() -> float:
    """Measured device copy bandwidth, bytes read + written per second."""
    nbytes = (1 << 30) if DEV == "cuda" else (1 << 24)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEV).random_(0, 255)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 200)
    return nbytes / (ms * 1e-3)


# ---------------------------------------------------------------- problem ---------------
class Prompt:
    """One request of ctx tokens in a paged cache (pages shuffled), its queries and gates."""

    def __init__(self, a, ctx: int, p: NSAParams, seed: int):
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.a, self.ctx, self.p = a, ctx, p
        ps, hkv, d = a.page, a.hkv, a.dim
        npg = -(-ctx // ps) + 1
        self.bt = torch.randperm(npg, device=DEV, generator=g).to(torch.int32).view(1, npg)
        self.kc = torch.randn(npg, ps, hkv, d, device=DEV, dtype=a.dtype, generator=g)
        self.vc = torch.randn(npg, ps, hkv, d, device=DEV, dtype=a.dtype, generator=g)
        cpp = p.cmp_per_page(ps)
        self.ckc = torch.zeros(npg, cpp, hkv, d, device=DEV, dtype=a.dtype)
        self.cvc = torch.zeros_like(self.ckc)
        self.q = torch.randn(ctx, a.hq, d, device=DEV, dtype=a.dtype, generator=g)
        self.gates = (torch.rand(ctx, a.hq, 3, device=DEV, generator=g) if p.gated else None)
        self.out = torch.empty_like(self.q)
        self.chunks = []
        for s in range(0, ctx, a.chunk):
            e = min(ctx, s + a.chunk)
            i32 = dict(dtype=torch.int32, device=DEV)
            self.chunks.append(dict(
                s=s, e=e, q_req=torch.zeros(e - s, **i32), q_pos=torch.arange(s, e, **i32),
                pre=torch.tensor([s], **i32), seq=torch.tensor([e], **i32),
                sel=torch.empty(e - s, hkv, p.topn, **i32)))

    def run_chunk(self, c, impl="tiles", stages=15, out=None, sel=None, q=None, **kw):
        s, e = c["s"], c["e"]
        return chunked_nsa_prefill(
            self.q[s:e] if q is None else q, self.kc, self.vc, self.ckc, self.cvc, self.bt,
            c["q_req"], c["q_pos"], c["pre"], c["seq"], self.p, self.a.dim ** -0.5,
            gates=None if self.gates is None else self.gates[s:e],
            out=self.out[s:e] if out is None else out, sel=c["sel"] if sel is None else sel,
            impl=impl, _stages=stages, **kw)

    def run(self, impl="tiles", stages=15, **kw):
        for c in self.chunks:
            self.run_chunk(c, impl, stages, **kw)

    def key_value_seq(self, n: int):
        ps = self.a.page
        pos = torch.arange(n, device=DEV)
        slot = self.bt[0].long()[pos // ps] * ps + pos % ps
        flat = (-1, self.a.hkv, self.a.dim)
        return self.kc.view(flat)[slot].float(), self.vc.view(flat)[slot].float()


def nsa_cost(pr: Prompt) -> dict:
    """FLOPs and bytes of one layer's NSA prefill over the whole prompt (from the selections
    of the last run, so call after pr.run())."""
    a, p = pr.a, pr.p
    d, hq, hkv, g = a.dim, a.hq, a.hkv, a.hq // a.hkv
    t = torch.arange(pr.ctx, device=DEV, dtype=torch.float64)
    ncmp = torch.where(t + 1 >= p.block, torch.floor((t + 1 - p.block) / p.stride) + 1, 0)
    refresh = float(ncmp.sum()) * hq * d * 2 * (3 if p.gated else 2)
    toks = 0.0
    for c in pr.chunks:
        sel = c["sel"].long()                                              # [N, Hkv, n]
        tt = c["q_pos"].long().view(-1, 1, 1)
        lo = sel * p.select
        hi = torch.minimum(lo + p.select, tt + 1)
        if not p.gated:                      # union: selected tokens outside the window
            hi = torch.minimum(hi, tt - p.window + 1)
        sel_tok = torch.where(sel >= 0, (hi - lo).clamp_min(0), 0).sum(-1)  # [N, Hkv]
        win = torch.minimum(tt.view(-1, 1) + 1, torch.full_like(tt.view(-1, 1), p.window))
        toks += float((sel_tok + win).sum()) * g
    attn = toks * d * 4
    el = torch.empty(0, dtype=a.dtype).element_size()
    ncmp_all = p.num_cmp(pr.ctx)
    byts = (2 * pr.ctx * hq * d + 2 * pr.ctx * hkv * d + 2 * ncmp_all * hkv * d) * el
    return dict(flops=refresh + attn, refresh_flops=refresh, attn_flops=attn, bytes=byts,
                mean_tokens_per_row_head=toks / (pr.ctx * hq))


def adjacent_overlap(pr: Prompt) -> float:
    """Mean |sel_t & sel_t+1| / n over adjacent rows and KV heads (last chunk)."""
    sel = pr.chunks[-1]["sel"].long()
    a, b = sel[:-1], sel[1:]
    eq = (a.unsqueeze(-1) == b.unsqueeze(-2)) & (a.unsqueeze(-1) >= 0)
    return float(eq.any(-1).sum(-1).float().mean()) / pr.p.topn


def check(pr: Prompt, rows: int, n_ref: int) -> dict:
    """New vs old path on the prompt's last `rows` rows as one chunk; a few rows vs fp32."""
    a, p = pr.a, pr.p
    e = pr.ctx
    s = max(0, e - rows)
    i32 = dict(dtype=torch.int32, device=DEV)
    c = dict(s=s, e=e, q_req=torch.zeros(e - s, **i32), q_pos=torch.arange(s, e, **i32),
             pre=torch.tensor([s], **i32), seq=torch.tensor([e], **i32))
    res = {}
    outs = {}
    for impl in ("tiles", "rows"):
        out = torch.full((e - s, a.hq, a.dim), float("nan"), device=DEV, dtype=a.dtype)
        sel = torch.full((e - s, a.hkv, p.topn), -7, **i32)
        pr.run_chunk(c, impl, out=out, sel=sel)
        outs[impl] = (out.float(), sel)
    (o_n, s_n), (o_o, s_o) = outs["tiles"], outs["rows"]
    same = (s_n == s_o).all(-1)                                             # [N, Hkv]
    res["rows"] = e - s
    res["sel_equal_frac"] = float(same.float().mean())
    res["out_nan"] = bool(torch.isnan(o_n).any())
    res["rel_rms_vs_old"] = float((o_n - o_o).pow(2).mean().sqrt() / o_o.pow(2).mean().sqrt())
    rr = (same.all(-1)).nonzero().squeeze(1)                                # rows equal all heads
    res["rel_rms_vs_old_same_sel"] = float((o_n[rr] - o_o[rr]).pow(2).mean().sqrt()
                                           / o_o[rr].pow(2).mean().sqrt()) if rr.numel() else None
    pick = sorted({0, (e - s) // 2, e - s - 1})[:n_ref]
    if not pick:
        return res
    ks, vs = pr.key_value_seq(e)
    q_rows = pr.q[s:e][pick].float().cpu()
    o_ref, s_ref = naive_nsa_prefill_rows(q_rows, ks.cpu(), vs.cpu(), [s + i for i in pick], p,
                                          a.dim ** -0.5, None,
                                          None if pr.gates is None else pr.gates[s:e][pick].cpu())
    ok = (s_n[pick].cpu().long() == s_ref).all(-1).all(-1)
    res["ref_rows"] = len(pick)
    res["ref_sel_equal_rows"] = int(ok.sum())
    got = o_n[pick].cpu()
    res["rel_rms_vs_fp32_ref"] = float((got - o_ref).pow(2).mean().sqrt() / o_ref.pow(2).mean().sqrt())
    return res


def tune(pr: Prompt, rep_ms: int) -> list:
    """Knob sweep at one context: refresh group size (refresh stage alone) and the tile /
    sparse kernels' MMA rows (selected + window stage alone); defaults first."""
    rows = []

    def one(rec, **kw):
        try:
            rec["ms"] = median_ms(lambda: pr.run(**kw), rep_ms)
        except Exception as e:  # noqa: BLE001 - a knob that does not compile is a result too
            rec["error"] = repr(e)[-500:]
        rows.append(rec)
    for gs in (32, 16, 64):
        one(dict(stage="refresh", group_size=gs), stages=2, group_size=gs)
    for tr, ir in ((64, 64), (128, 64), (64, 128), (128, 128), (64, 32)):
        one(dict(stage="sel_win", tile_rows=tr, item_rows=ir), stages=12, tile_rows=tr, item_rows=ir)
    pr.run()                                # leave the default selections in place
    return rows


def dense_ms(pr: Prompt, rep_ms: int) -> tuple[float | None, str]:
    """torch SDPA, causal, whole prompt, FlashAttention backend (GQA)."""
    a = pr.a
    ks, vs = pr.key_value_seq(pr.ctx)
    q = pr.q.transpose(0, 1).unsqueeze(0)                                   # [1, Hq, T, D]
    k = ks.to(a.dtype).transpose(0, 1).unsqueeze(0).contiguous()
    v = vs.to(a.dtype).transpose(0, 1).unsqueeze(0).contiguous()
    del ks, vs
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if DEV != "cuda":
        return median_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), rep_ms), "cpu math"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(kk, vv, gqa):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, kk, vv, is_causal=True, enable_gqa=gqa)
    try:
        flash(k, v, True)
        return median_ms(lambda: flash(k, v, True), rep_ms), "flash, enable_gqa"
    except RuntimeError:             # a torch whose flash backend lacks GQA: repeat K/V
        g = a.hq // a.hkv
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return median_ms(lambda: flash(k, v, False), rep_ms), "flash, K/V repeated"


# ---------------------------------------------------------------- main -------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="16384,32768,65536,131072")
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk (SGLang chunked_prefill_size)")
    ap.add_argument("--old-max-ctx", type=int, default=32768, help="time the old path up to this context")
    ap.add_argument("--gated", action="store_true", help="gated combine (native NSA) instead of union")
    ap.add_argument("--rep-ms", type=int, default=600, help="do_bench rep time per measurement")
    ap.add_argument("--check-rows", type=int, default=2048)
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--tune-ctx", type=int, default=65536,
                    help="context of the knob sweep (refresh group size, tile / item rows); 0: none")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    a = ap.parse_args()
    if a.smoke:
        a.hq, a.hkv, a.dim, a.page, a.dtype = 8, 2, 32, 16, torch.float32
        p = NSAParams(block=8, stride=4, select=16, topn=6, window=32, gated=a.gated)
        a.contexts, a.chunk, a.old_max_ctx, a.check_rows, a.rep_ms = "96,160", 64, 160, 48, 1
        a.tune_ctx = 160
    else:
        a.hq, a.hkv, a.dim, a.page, a.dtype = 32, 8, 128, 16, torch.bfloat16
        p = NSAParams(gated=a.gated)
    ctxs = [int(x) for x in a.contexts.split(",") if x]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    t0 = time.time()
    mm, bw = matmul_rate(a.dtype), copy_rate()
    res = dict(gpu=gpu, commit=os.environ.get("SPECSA_COMMIT", "unknown"),
               command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               shape=dict(Hq=a.hq, Hkv=a.hkv, D=a.dim, page=a.page, dtype=str(a.dtype),
                          chunk=a.chunk, batch=1),
               nsa=dict(l=p.block, d=p.stride, l_sel=p.select, n=p.topn, w=p.window,
                        combine="gated" if p.gated else "union"),
               matmul_flops_per_s=mm, copy_bytes_per_s=bw, rows=[], errors=[])

    def save():
        res["wall_s"] = time.time() - t0
        (out_dir / "prefill.json").write_text(json.dumps(res, indent=1))

    for ctx in ctxs:
        row = dict(ctx=ctx, chunks=-(-ctx // a.chunk))
        try:
            pr = Prompt(a, ctx, p, seed=ctx)
            pr.run()                                        # compile + compressed cache + sels
            if DEV == "cuda":
                torch.cuda.synchronize()
            row["nsa_ms"] = median_ms(lambda: pr.run(), a.rep_ms)
            if not a.no_stages:
                row["stage_compress_ms"] = median_ms(lambda: pr.run(stages=1), a.rep_ms)
                row["stage_refresh_ms"] = median_ms(lambda: pr.run(stages=2), a.rep_ms)
                row["stage_sel_win_ms"] = median_ms(lambda: pr.run(stages=12), a.rep_ms)
                row["stage_sparse_only_ms"] = median_ms(lambda: pr.run(stages=4), a.rep_ms)
            cost = nsa_cost(pr)
            row.update(cost)
            row["adjacent_sel_overlap"] = adjacent_overlap(pr)
            row["floor_flops_ms"] = cost["flops"] / mm * 1e3
            row["floor_bytes_ms"] = cost["bytes"] / bw * 1e3
            row["nsa_over_floor"] = row["nsa_ms"] / max(row["floor_flops_ms"], row["floor_bytes_ms"])
            if ctx <= a.old_max_ctx:
                pr.run(impl="rows")
                row["old_ms"] = median_ms(lambda: pr.run(impl="rows"), a.rep_ms)
                row["speedup_vs_old"] = row["old_ms"] / row["nsa_ms"]
            row["dense_ms"], row["dense_impl"] = dense_ms(pr, a.rep_ms)
            row["dense_flops"] = 4 * a.hq * a.dim * ctx * ctx / 2
            row["dense_floor_ms"] = row["dense_flops"] / mm * 1e3
            row["speedup_vs_dense"] = row["dense_ms"] / row["nsa_ms"]
            row["check"] = check(pr, a.check_rows, 3 if ctx <= 65536 else 0)
            if ctx == a.tune_ctx:
                row["tune"] = tune(pr, a.rep_ms)
            del pr
            if DEV == "cuda":
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - keep the other contexts
            tb = traceback.format_exc()
            print(f"ctx {ctx} FAILED\n{tb}", flush=True)
            res["errors"].append(dict(ctx=ctx, traceback=tb[-3000:]))
        res["rows"].append(row)
        save()
        print(json.dumps(row), flush=True)

    print(f"\n{gpu}, {res['commit']}, chunk {a.chunk}, {res['nsa']['combine']}; matmul "
          f"{mm / 1e12:.0f} TFLOP/s, copy {bw / 1e9:.0f} GB/s; ms per layer (whole prompt)")
    hdr = ("ctx", "nsa", "compr", "refresh", "sel+win", "old", "dense", "x dense", "x old",
           "floor", "/floor", "sel==old", "rel err")
    print(" | ".join(f"{h:>8}" for h in hdr))

    def f(x, fmt="{:8.2f}"):
        return fmt.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else f"{'-':>8}"
    for r in res["rows"]:
        ck = r.get("check", {})
        fl = max(r.get("floor_flops_ms", 0), r.get("floor_bytes_ms", 0)) or None
        print(" | ".join([f"{r['ctx']:>8}", f(r.get("nsa_ms")), f(r.get("stage_compress_ms")),
                          f(r.get("stage_refresh_ms")), f(r.get("stage_sel_win_ms")),
                          f(r.get("old_ms")), f(r.get("dense_ms")), f(r.get("speedup_vs_dense")),
                          f(r.get("speedup_vs_old")), f(fl), f(r.get("nsa_over_floor")),
                          f(ck.get("sel_equal_frac"), "{:8.3f}"), f(ck.get("rel_rms_vs_old"), "{:8.1e}")]))
    save()


if __name__ == "__main__":
    main()
