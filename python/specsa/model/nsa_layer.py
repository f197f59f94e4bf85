"""NSA self-attention layer of the decoder (Llama/Qwen2 projections + NSA core), two paths.

Projections, RoPE and the output projection are batched over all tokens of all requests.
The NSA core has two implementations, chosen per model with `AttnImpl` (parsed at the edge:
CLI `--attn-impl`, `NSADecoder.set_attn_impl`):

- TORCH (default on CPU): per request `masked_nsa` over that request's committed context +
  block; the eager reference path (host syncs, not graph-capturable).
- TRITON (default on CUDA; on CPU only under TRITON_INTERPRET=1, for tests): the kernels of
  `specsa.kernels`, batched over requests. Per forward, `build_triton_forward` (model/triton_forward.py) freezes the host
  geometry once (page tables, positions, provisional-token sources, the `NSAVerifier` metadata);
  per layer:
    verify rows (decode steps, draft trees, chains of <= MAX_TREE_NODES tokens): provisional
      compressed tokens of nodes closing a block (`compress_gather`, committed slots + the
      path's tail rows), refresh (`score_topk_grouped` over the NSAVerifier metadata's query
      groups, so each compressed key is read once per group, decode rows being groups of 1;
      or per row with `score_topk`, TritonOptions.refresh: committed compressed tokens from
      the paged compressed cache + the visible provisional ones; o_cmp when gated), then
      selected + window + combine (`NSAVerifier.run`). Nothing is written to the cache.
    prefill rows (chains longer than TritonOptions.prefill_chain <= MAX_TREE_NODES, which only
      prefill produces and which are committed whole): the chunk's K/V is written into its (reserved, not yet committed)
      page slots, then `chunked_nsa_prefill` (compresses the chunk's closed blocks into the
      compressed cache, refresh, selected + window). Commit then only advances the length.
  The commit of verify blocks is `fused_commit` (accepted path's KV + its provisional
  compressed tokens, every layer in one launch, no recompute): see `PagedKVCache.commit`.

Precision knobs (`specsa.config.VerifyKnobs`, docs/DESIGN.md section 5), both paths:
- refresh period R (REUSE classes): layer l refreshes its block selection when l % R == 0; the
  other layers take the selection of the last refresh layer of the same forward
  (`LayerSelections`) and skip the selection work: the Eq. 9 scores and the top-n
  (`masked_nsa(sel=...)`; on the Triton path the refresh kernel, or for prefill chunks
  `chunked_nsa_prefill` without its refresh stage). Under the gated combine a reuse layer
  still computes its own compressed-branch output o_cmp (the refresh kernel runs, its
  selection is dropped). Prefill, decode and verification forwards alike.
- schedule SHARED_INDEX with group size C (APPROX classes): the verify rows of a forward are
  cut into groups of C in the traversal order (`specsa.schedule`); every query of a group
  attends with its representative's (deepest query's) selection. Prefill chunks longer than
  TritonOptions.prefill_chain are never grouped (on either path).
Which combinations a precision class allows is checked at the edge
(`specsa.orchestrator.planner.knobs_error`), not here.

Keys are post-RoPE (they are what the cache stores), scale is 1/sqrt(head_dim) (docs/DESIGN.md section 3).
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from specsa.config import Combine, Compression, ConfigError, NSAConfig, VerifyKnobs, parse_enum
from specsa.kernels.nsa import TreeVisibility, masked_nsa, provisional_cmp
from specsa.verify_layer import verify_layer

from .cache import PagedKVCache
from .config import ModelConfig
from .rope import apply_rotary
from .triton_forward import PrefillPart, TritonForward

class AttnImpl(enum.Enum):
    TORCH = "torch"     # masked_nsa per request (reference, eager)
    TRITON = "triton"   # specsa.kernels: refresh + NSAVerifier / chunked prefill + fused commit


def resolve_attn_impl(value: AttnImpl | str | None, device: torch.device | str) -> AttnImpl:
    """AttnImpl from an enum / its string / None or "auto" (TRITON on CUDA, TORCH on CPU).
    TRITON on a CPU needs the Triton interpreter (TRITON_INTERPRET=1, set before import)."""
    dev = torch.device(device)
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return AttnImpl.TRITON if dev.type == "cuda" else AttnImpl.TORCH
    impl = parse_enum(AttnImpl, value, "attn_impl")
    if impl is AttnImpl.TRITON and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("attn_impl=triton on a CPU model needs the Triton interpreter: set "
                          "TRITON_INTERPRET=1 before importing specsa (or use attn_impl=torch)")
    if impl is AttnImpl.TRITON and dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"attn_impl=triton supports cuda (and cpu under the interpreter), "
                          f"not {dev.type}")
    return impl


@dataclass(frozen=True)
class RequestView:
    """One request inside a batched forward: rows offset..offset+n-1 of the flat token batch,
    its tree visibility (on the model device), the committed-context slots, and where its
    provisional compressed tokens go in the PendingKV."""

    rid: int
    offset: int
    n: int
    prefix_len: int
    parents: torch.Tensor          # [n] int64, on device
    vis: TreeVisibility            # tensors on device
    kv_slots: torch.Tensor         # [P] int64
    cmp_slots: torch.Tensor        # [num_cmp(P)] int64
    cmp_offset: int
    # SHARED_INDEX: row u of the block attends with the selection of row sel_src[u]
    # (its group's representative); None: every row its own
    sel_src: torch.Tensor | None = None


@dataclass(eq=False)
class LayerSelections:
    """Cross-layer index reuse inside one forward (REUSE classes, docs/DESIGN.md section 5).

    Layer l refreshes when `knobs.refreshes(l)` (l % R == 0) or when no earlier layer of this
    forward refreshed for `key`; every other layer takes `last[key]`, the selection of the
    last refresh layer. key: the request id (TORCH path) or the row part, "verify" /
    "prefill" (TRITON path). refreshed / reused count layers (not requests) for reports and
    tests.
    """

    knobs: VerifyKnobs = VerifyKnobs()
    last: dict = field(default_factory=dict)
    refreshed: int = 0
    reused: int = 0
    _layer: int | None = None

    def refresh(self, layer: int, key) -> bool:
        """Whether `layer` computes its own selection for `key` (counted once per layer)."""
        own = self.knobs.refreshes(layer) or key not in self.last
        if self._layer != layer:
            self._layer = layer
            if own:
                self.refreshed += 1
            else:
                self.reused += 1
        return own

    def get(self, key) -> torch.Tensor:
        return self.last[key]

    def put(self, key, sel: torch.Tensor) -> None:
        self.last[key] = sel


class LearnedCompression(nn.Module):
    """phi weights of native NSA (CONTRACTS.md section 5): weight [Hkv, l], bias [Hkv, D]."""

    def __init__(self, num_kv_heads: int, block: int, head_dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_kv_heads, block), 1.0 / block))
        self.bias = nn.Parameter(torch.zeros(num_kv_heads, head_dim)) if bias else None


class NSAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, nsa: NSAConfig, *, gate_bias: bool = False,
                 compress_bias: bool = False):
        super().__init__()
        hq, hkv, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.hq, self.hkv, self.head_dim, self.scale = hq, hkv, d, cfg.scale
        self.nsa, self.params = nsa, nsa.params
        self.q_proj = nn.Linear(h, hq * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(hq * d, h, bias=cfg.o_bias)
        self.gate_proj = (nn.Linear(h, 3 * hq, bias=gate_bias)
                          if nsa.combine is Combine.GATED else None)
        learned = nsa.compress is Compression.LEARNED
        self.compress_k = LearnedCompression(hkv, nsa.block, d, compress_bias) if learned else None
        self.compress_v = LearnedCompression(hkv, nsa.block, d, compress_bias) if learned else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: PagedKVCache, layer: int, views: list[RequestView] | TritonForward,
                sels: LayerSelections | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] (normed layer input) -> (out [N, hidden], k, v [N, Hkv, D] post-RoPE,
        ck, cv [C, Hkv, D] provisional compressed tokens of all requests, in view order).
        `views`: per-request views (TORCH path) or a TritonForward (TRITON path).
        `sels`: the forward's cross-layer selection state (None: every layer refreshes)."""
        if sels is None:
            sels = LayerSelections()
        n = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(n, self.hq, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(n, self.hkv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.hkv, self.head_dim)
        gates = None
        if self.gate_proj is not None:
            # row 3*h + c of gate_proj is gate c (cmp, slc, win) of head h (CONTRACTS.md 5)
            gates = torch.sigmoid(self.gate_proj(x).float()).view(n, self.hq, 3)
        o = torch.empty(n, self.hq, self.head_dim, dtype=x.dtype, device=x.device)
        if isinstance(views, TritonForward):
            ck, cv = self._triton(q.contiguous(), k.contiguous(), v.contiguous(), gates, cache,
                                  layer, views, o, sels)
            return self.o_proj(o.view(n, -1)), k, v, ck, cv
        cks, cvs = [], []
        for rv in views:
            rows = slice(rv.offset, rv.offset + rv.n)
            kc, vc, ckc, cvc = cache.gather(layer, rv.kv_slots, rv.cmp_slots)
            pk, pv = self._provisional(kc, vc, k[rows], v[rows], rv)
            own = sels.refresh(layer, rv.rid)
            _, sel = masked_nsa(q[rows], torch.cat([kc, k[rows]]), torch.cat([vc, v[rows]]),
                                rv.vis.q_pos, rv.vis.k_pos, rv.vis.kv_visible,
                                torch.cat([ckc, pk]), torch.cat([cvc, pv]), rv.vis.c_idx,
                                rv.vis.c_visible, self.params, self.scale,
                                None if gates is None else gates[rows], out=o[rows],
                                sel=None if own else sels.get(rv.rid),
                                sel_src=rv.sel_src if own else None)
            if own:
                sels.put(rv.rid, sel)    # what the rows attended with (shared under SHARED_INDEX)
            cks.append(pk)
            cvs.append(pv)
        return self.o_proj(o.view(n, -1)), k, v, torch.cat(cks), torch.cat(cvs)

    def _cw(self):
        if self.compress_k is None:
            return None
        return (self.compress_k.weight, self.compress_k.bias, self.compress_v.weight,
                self.compress_v.bias)

    def _triton(self, q, k, v, gates, cache: PagedKVCache, layer: int, fwd: TritonForward,
                o: torch.Tensor, sels: LayerSelections) -> tuple[torch.Tensor, torch.Tensor]:
        """TRITON path of one layer (no host syncs): writes o, returns the provisional
        compressed tokens (ck, cv) [Np, Hkv, D] of the verify rows (PendingKV order)."""
        p, cw = self.params, self._cw()
        kc, vc, ckc, cvc = (cache.k_cache(layer), cache.v_cache(layer), cache.ck_cache(layer),
                            cache.cv_cache(layer))
        pk = k.new_empty(0, self.hkv, self.head_dim)
        pv = v.new_empty(0, self.hkv, self.head_dim)
        fp = fwd.prefill
        if fp is not None:
            # prefill chunks are committed whole: their K/V goes into the reserved page slots
            # (beyond the committed length) before attention, as chunked_nsa_prefill needs
            kf, vf = fp.rows.take(k), fp.rows.take(v)
            flat = (-1, self.hkv, self.head_dim)
            kc.view(flat).index_copy_(0, fp.slots, kf.to(kc.dtype))
            vc.view(flat).index_copy_(0, fp.slots, vf.to(vc.dtype))
            gf = None if gates is None else fp.rows.take(gates).contiguous()
            if sels.refresh(layer, "prefill"):
                from specsa.kernels.prefill import chunked_nsa_prefill

                of, sel = chunked_nsa_prefill(
                    fp.rows.take(q), kc, vc, ckc, cvc, fp.block_table, fp.q_req, fp.q_pos,
                    fp.prefix_lens, fp.seq_lens, p, self.scale, cw=cw, gates=gf)
                sels.put("prefill", sel)
            else:
                of = self._prefill_reuse(fp.rows.take(q), kc, vc, ckc, cvc, fp, gf, cw,
                                         sels.get("prefill"), cache.page_size)
            fp.rows.put(o, of)
        vp = fwd.verify
        if vp is not None:
            own = sels.refresh(layer, "verify")
            gv = None if gates is None else vp.rows.take(gates)
            ov, sel, pk, pv = verify_layer(
                vp.rows.take(q), vp.rows.take(k), vp.rows.take(v), kc, vc, ckc, cvc, vp.step,
                p, self.scale, cache.page_size, gates=gv, cw=cw,
                reuse_sel=None if own else sels.get("verify"), keep_provisional=True,
                out=o if vp.rows.idx is None else None)
            if own:
                # each row's own selection; SHARED_INDEX applies its sources inside run()
                sels.put("verify", sel)
            if vp.rows.idx is not None:
                vp.rows.put(o, ov)
        return pk, pv

    def _prefill_reuse(self, q, kc, vc, ckc, cvc, fp: PrefillPart, gates, cw,
                       sel: torch.Tensor, page_size: int) -> torch.Tensor:
        """A prefill chunk attending with a reused selection: `chunked_nsa_prefill` without
        its refresh stage (compression, sparse and tile stages only; stage bits in its
        docstring). Under the gated combine that path takes o_cmp as zero, so g_cmp * o_cmp
        is added from a compressed-branch pass (the refresh kernel's output, its selection
        dropped)."""
        from specsa.kernels import refresh as kr
        from specsa.kernels.prefill import chunked_nsa_prefill
        from specsa.kernels.prefill.chunked import row_tiles

        p = self.params
        of, _ = chunked_nsa_prefill(q, kc, vc, ckc, cvc, fp.block_table, fp.q_req, fp.q_pos,
                                    fp.prefix_lens, fp.seq_lens, p, self.scale, cw=cw,
                                    gates=gates, sel=sel, _stages=15 & ~2)
        if gates is None:
            return of
        lens = fp.seq_lens.to(torch.int32)
        cmp_lens = torch.where(lens >= p.block, (lens - p.block) // p.stride + 1, 0)
        size = 16
        _, o_cmp, _ = kr.score_topk_grouped(
            kr.RefreshArgs(q, ckc, cvc, fp.block_table, fp.q_req, fp.q_pos,
                           cmp_lens.to(torch.int32), p, self.scale, page_size, with_out=True),
            group_size=size, groups=row_tiles(fp.q_req, fp.prefix_lens.shape[0], size))
        return (of.float() + gates[..., 0:1] * o_cmp.float()).to(of.dtype)

    def _provisional(self, kc, vc, kb, vb, rv: RequestView) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed tokens closed inside the block, cast to the cache dtype so that a
        committed copy later reads back exactly what verification attended to."""
        keep = min(rv.prefix_len, self.params.block - 1)
        wk = bk = wv = bv = None
        if self.compress_k is not None:
            wk, bk = self.compress_k.weight, self.compress_k.bias
            wv, bv = self.compress_v.weight, self.compress_v.bias
        pk = provisional_cmp(kc[rv.prefix_len - keep:], kb, rv.parents, self.params, wk, bk,
                             ctx_len=rv.prefix_len)
        pv = provisional_cmp(vc[rv.prefix_len - keep:], vb, rv.parents, self.params, wv, bv,
                             ctx_len=rv.prefix_len)
        return pk.to(kb.dtype), pv.to(vb.dtype)
