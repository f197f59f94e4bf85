"""NSA self-attention layer of the decoder (Llama/Qwen2 projections + NSA core), two paths.

Projections, RoPE and the output projection are batched over all tokens of all requests.
The NSA core has two implementations, chosen per model with `AttnImpl` (parsed at the edge:
CLI `--attn-impl`, `NSADecoder.set_attn_impl`):

- TORCH (default on CPU): per request `masked_nsa` over that request's committed context +
  block; the eager reference path (host syncs, not graph-capturable).
- TRITON (default on CUDA; on CPU only under TRITON_INTERPRET=1, for tests): the kernels of
  `specsa.kernels`, batched over requests. Per forward, `plan_triton_forward` freezes the host
  geometry once (page tables, positions, provisional-token sources, the `NSAVerifier` plan);
  per layer:
    verify rows (decode steps, draft trees, chains of <= MAX_TREE_NODES tokens): provisional
      compressed tokens of nodes closing a block (`compress_gather`, committed slots + the
      path's tail rows), refresh (`score_topk_grouped` over the NSAVerifier plan's query
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
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from specsa.config import (Combine, Compression, ConfigError, NSAConfig,
                           Schedule, Traversal, VerifyKnobs, parse_enum)
from specsa.kernels.common.tree import MAX_TREE_NODES, node_depths
from specsa.kernels.common.upload import to_device
from specsa.kernels.nsa import TreeVisibility, masked_nsa, provisional_cmp
from specsa.verify_layer import StepTensors, verify_layer

from .cache import BlockMeta, PagedKVCache
from .config import ModelConfig
from .rope import apply_rotary

# The verify kernel's tree mask is one int64 bitmask per row; longer chains are prefill chunks.


class AttnImpl(enum.Enum):
    TORCH = "torch"     # masked_nsa per request (reference, eager)
    TRITON = "triton"   # specsa.kernels: refresh + NSAVerifier / chunked prefill + fused commit


class Refresh(enum.Enum):
    """Refresh kernel of the Triton path's verify rows (same selections and o_cmp)."""

    GROUPED = "grouped"   # score_topk_grouped on the verifier plan's groups (keys read once per group)
    PER_ROW = "per_row"   # score_topk, one program per (row, KV head): kept for benchmarks


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
class TritonOptions:
    """Knobs of the Triton path's verification (see `specsa.verifier.NSAVerifier.plan`)."""

    schedule: Schedule = Schedule.EXACT_MERGED
    traversal: Traversal = Traversal.BFS
    group_size: int | None = None
    num_splits: int | None = None
    # chains with more nodes than this are prefill chunks (chunked_nsa_prefill, written in
    # place); at most MAX_TREE_NODES, the verify kernel's limit
    prefill_chain: int = MAX_TREE_NODES
    refresh: Refresh = Refresh.GROUPED

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", parse_enum(Schedule, self.schedule, "schedule"))
        object.__setattr__(self, "refresh", parse_enum(Refresh, self.refresh, "refresh"))
        object.__setattr__(self, "traversal", parse_enum(Traversal, self.traversal, "traversal"))
        if not 1 <= self.prefill_chain <= MAX_TREE_NODES:
            raise ConfigError(f"TritonOptions.prefill_chain must be in 1..{MAX_TREE_NODES} (the verify "
                              f"kernel's tree limit), got {self.prefill_chain}")


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


@dataclass(frozen=True)
class _Rows:
    """A subset of the batch's rows: `idx` [n] int64 on device, or None when it is all of them
    (then no gather / scatter is needed)."""

    idx: torch.Tensor | None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.idx is None else x.index_select(0, self.idx)

    def put(self, out: torch.Tensor, x: torch.Tensor) -> None:
        if self.idx is None:
            out.copy_(x)
        else:
            out.index_copy_(0, self.idx, x)


@dataclass(frozen=True)
class VerifyPart:
    """Verify rows of a Triton forward (requests in batch order, nodes in block order)."""

    rows: _Rows
    block_table: torch.Tensor      # [Bv, max_pages] int32 (committed pages)
    q_req: torch.Tensor            # [Nv] int32
    q_pos: torch.Tensor            # [Nv] int32
    cmp_lens: torch.Tensor         # [Bv] int32 num_cmp(P)
    prov_idx: torch.Tensor | None  # [Np, l] int32 compress_gather sources (None: Np = 0)
    prov_cidx: torch.Tensor | None  # [Np] int32
    prov_vis: torch.Tensor | None  # [Nv, MP] int32, -1 padded
    num_prov: int
    verifier: object               # specsa.verifier.NSAVerifier holding this step's plan
    # grouped refresh: the plan's (order [Nv], g_start [NG], g_len [NG]) int32 cuts and its C;
    # None: per-row score_topk
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    group_size: int = 1

    @property
    def step(self) -> StepTensors:
        """What `specsa.verify_layer.verify_layer` reads."""
        return StepTensors(block_table=self.block_table, q_req=self.q_req, q_pos=self.q_pos,
                           cmp_lens=self.cmp_lens,
                           prov_idx=self.prov_idx if self.num_prov else None,
                           prov_cidx=self.prov_cidx, prov_vis=self.prov_vis, groups=self.groups,
                           group_size=self.group_size, verifier=self.verifier)


@dataclass(frozen=True)
class PrefillPart:
    """Prefill-chunk rows of a Triton forward (written into their page slots first)."""

    rows: _Rows
    block_table: torch.Tensor      # [Bf, max_pages] int32 (pages up to P + n reserved)
    q_req: torch.Tensor            # [Nf] int32
    q_pos: torch.Tensor            # [Nf] int32
    prefix_lens: torch.Tensor      # [Bf] int32
    seq_lens: torch.Tensor         # [Bf] int32
    slots: torch.Tensor            # [Nf] int64 flat raw-KV slot of every row


@dataclass(frozen=True)
class TritonForward:
    """Everything a Triton forward needs from the host, built once per forward (no per-layer
    host work): tokens, positions, last rows, block metas and the two row parts."""

    tokens: torch.Tensor           # [N] int64
    positions: torch.Tensor        # [N] int64
    last_rows: torch.Tensor        # [B] int64, last node of each block
    metas: dict[int, BlockMeta]
    in_place: frozenset[int]       # rids whose block KV the forward writes into its pages
    verify: VerifyPart | None
    prefill: PrefillPart | None
    knobs: VerifyKnobs = VerifyKnobs()


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


def effective_options(options: "TritonOptions", knobs: VerifyKnobs,
                      traversal: Traversal | None = None) -> "TritonOptions":
    """TritonOptions with the knobs' schedule / group size (when set) and the step's traversal
    (when given): what a forward runs with."""
    kw = {}
    if knobs.schedule is not None:
        kw["schedule"] = knobs.schedule
    if knobs.group_size is not None:
        kw["group_size"] = knobs.group_size
    if traversal is not None:
        kw["traversal"] = traversal
    return replace(options, **kw) if kw else options


def _i32(x, dev) -> torch.Tensor:
    return to_device(x, torch.int32, dev)


def _i64(x, dev) -> torch.Tensor:
    return to_device(x, torch.int64, dev)


def _table(cache: PagedKVCache, rids: list[int], dev) -> torch.Tensor:
    tables = [cache.block_table(r) for r in rids]
    width = max(1, max(len(t) for t in tables))
    return _i32([t + [0] * (width - len(t)) for t in tables], dev)


def plan_triton_forward(cache: PagedKVCache, blocks: list[tuple[int, list[int], tuple[int, ...]]],
                        nsa: NSAConfig, num_q_heads: int, num_kv_heads: int, head_dim: int,
                        scale: float, device: torch.device,
                        options: TritonOptions = TritonOptions(),
                        knobs: VerifyKnobs = VerifyKnobs()) -> TritonForward:
    """Host geometry of one Triton forward.

    Args:
        cache: committed context (prefill blocks get their pages reserved here; their length
            only moves at commit).
        blocks: validated (rid, token ids, parents) per request, distinct rids.
        nsa / heads / head_dim / scale: the model's attention geometry.
        options: verification schedule knobs (already combined with `knobs`:
            `effective_options`).
        knobs: precision class (checked by the verifier's plan for SHARED_INDEX) and refresh
            period, carried in the TritonForward for the layers.
    Returns:
        TritonForward. A chain block longer than options.prefill_chain is a prefill chunk
        (written in place); everything else is verified from the draft tail.
    """
    from specsa.verifier import NSAVerifier
    from specsa.provisional import closing_blocks, visible_rows

    p = nsa.params
    ps = cache.page_size
    toks, poss, last, metas, in_place = [], [], [], {}, set()
    v_rids, v_par, v_P, v_rows, v_qpos, v_qreq = [], [], [], [], [], []
    f_rids, f_rows, f_qpos, f_qreq, f_P, f_len, f_slots = [], [], [], [], [], [], []
    prov_idx, prov_cidx, prov_vis_rows = [], [], []
    off = cmp_off = 0
    for rid, ids, par in blocks:
        n, P = len(ids), cache.length(rid)
        depth = node_depths(par)
        pos = [P + d for d in depth]
        chain = par == tuple(range(-1, n - 1))
        if chain and n > options.prefill_chain:
            cache.reserve(rid, P + n)
            pages = cache.block_table(rid)
            f_qreq.extend([len(f_rids)] * n)
            f_rids.append(rid)
            f_rows.extend(range(off, off + n))
            f_qpos.extend(pos)
            f_P.append(P)
            f_len.append(P + n)
            f_slots.extend(pages[t // ps] * ps + t % ps for t in pos)
            in_place.add(rid)
            metas[rid] = BlockMeta(offset=off, prefix_len=P, parents=par, cmp_offset=cmp_off,
                                   close_nodes=(), cmp_index=())
        else:
            pages = cache.block_table(rid)
            voff = len(v_rows)                    # first row of this request in the verify part
            blocks_at = closing_blocks(par, P, p, lambda t, pg=pages: pg[t // ps] * ps + t % ps,
                                       voff)
            close = [v for v, b in enumerate(blocks_at) if b is not None]
            cidx = [blocks_at[v][1] for v in close]
            prov_idx.extend(blocks_at[v][0] for v in close)
            prov_cidx.extend(cidx)
            prov_vis_rows.extend(visible_rows(par, {v: cmp_off + j for j, v in enumerate(close)}))
            v_qreq.extend([len(v_rids)] * n)
            v_rids.append(rid)
            v_par.append(list(par))
            v_P.append(P)
            v_rows.extend(range(off, off + n))
            v_qpos.extend(pos)
            metas[rid] = BlockMeta(offset=off, prefix_len=P, parents=par, cmp_offset=cmp_off,
                                   close_nodes=tuple(close), cmp_index=tuple(cidx))
            cmp_off += len(close)
        toks.extend(ids)
        poss.extend(pos)
        off += n
        last.append(off - 1)
    dev = torch.device(device)
    n_all = off
    verify = prefill = None
    if v_rids:
        rows = _Rows(None if len(v_rows) == n_all else _i64(v_rows, dev))
        bt = _table(cache, v_rids, dev)
        verifier = NSAVerifier(nsa, num_q_heads, num_kv_heads, head_dim, device=dev, scale=scale)
        plan = verifier.plan(v_par, v_P, bt, schedule=options.schedule,
                             traversal=options.traversal, precision=knobs.precision,
                             group_size=options.group_size, num_splits=options.num_splits)
        geo = plan.geometry
        # the refresh reuses the verifier's groups (rows request-major in node order, as the
        # verify rows here); a request of one node (decode) is a group of 1
        grouped = options.refresh is Refresh.GROUPED
        npv = len(prov_idx)
        mp = max(1, max(len(r) for r in prov_vis_rows))
        vis = [r + [-1] * (mp - len(r)) for r in prov_vis_rows]
        verify = VerifyPart(
            rows=rows, block_table=bt, q_req=_i32(v_qreq, dev), q_pos=_i32(v_qpos, dev),
            cmp_lens=_i32([p.num_cmp(P) for P in v_P], dev),
            prov_idx=_i32(prov_idx, dev) if npv else None,
            prov_cidx=_i32(prov_cidx, dev) if npv else None,
            prov_vis=_i32(vis, dev) if npv else None, num_prov=npv, verifier=verifier,
            groups=(geo.order, geo.g_start, geo.g_len) if grouped else None,
            group_size=geo.C if grouped else 1)
    if f_rids:
        rows = _Rows(None if len(f_rows) == n_all else _i64(f_rows, dev))
        prefill = PrefillPart(
            rows=rows, block_table=_table(cache, f_rids, dev), q_req=_i32(f_qreq, dev),
            q_pos=_i32(f_qpos, dev), prefix_lens=_i32(f_P, dev), seq_lens=_i32(f_len, dev),
            slots=_i64(f_slots, dev))
    return TritonForward(tokens=_i64(toks, dev), positions=_i64(poss, dev),
                         last_rows=_i64(last, dev), metas=metas, in_place=frozenset(in_place),
                         verify=verify, prefill=prefill, knobs=knobs)


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
            q, ckc, cvc, fp.block_table, fp.q_req, fp.q_pos, cmp_lens.to(torch.int32), p,
            self.scale, page_size, with_out=True, group_size=size,
            groups=row_tiles(fp.q_req, fp.prefix_lens.shape[0], size))
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
