"""NSA decoder: a Llama/Qwen2-family transformer whose attention is NSA.

One forward serves prefill chunks, decode steps and tree verification: each request brings
a block of new tokens with parents inside the block (`BlockInput`). The forward reads the
committed context from the paged cache, writes nothing committed, and returns logits plus a
`PendingKV`; the runtime then calls `cache.commit(rid, pending, accepted_nodes)`. (On the
TRITON path a prefill chunk longer than 64 tokens is written into its reserved page slots
beyond the committed length, which only commit makes visible; see model/nsa_layer.py.)

    model = load_model("ckpt/")                       # specsa.model.load
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=64))
    cache.add_request(0)
    logits, pending = model(cache, [BlockInput(0, prompt_ids)])   # chain prefill
    cache.commit(0, pending)                          # whole chain accepted
    logits, pending = model(cache, [BlockInput(0, [7, 3, 5], parents=[-1, 0, 0])])  # tree
    cache.commit(0, pending, [0, 2])                  # accept root, then its child 2

Precision knobs (`VerifyKnobs`: refresh period, schedule, group size; docs/DESIGN.md section 5)
come per forward (`knobs=`) or from `model.verify_knobs` (every forward that passes none:
prefill, decode, drafts of a self-draft view built afterwards); `model.last_forward` reports
what the last forward applied (`ForwardInfo`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch import nn

from specsa.config import CacheConfig, ConfigError, NSAConfig, Schedule, Traversal, VerifyKnobs
from specsa.kernels.nsa import TreeVisibility, build_tree_visibility

from .nsa_layer import AttnImpl, LayerSelections, NSAAttention, RequestView, resolve_attn_impl
from .triton_forward import (TritonForward, TritonOptions, build_triton_forward,
                             effective_options)
from .block import BlockInput, BlockError, as_list, normalise_parents
from .cache import BlockMeta, PagedKVCache, PendingKV
from .config import ModelConfig
from .placement import WeightPlacement
from .rope import Rotary


@dataclass(frozen=True)
class ForwardInfo:
    """What one forward applied: schedule / group size of its verify rows (None when it had
    none: a long prefill chunk only), the refresh period, and how many layers computed their
    block selection (refreshed) or took the last refresh layer's (reused)."""

    schedule: Schedule | None
    group_size: int | None
    refresh_period: int
    refreshed: int
    reused: int


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, as HF Llama: keeps bf16 checkpoints numerically faithful
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, nsa: NSAConfig, **attn_kw):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = NSAAttention(cfg, nsa, **attn_kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Backbone(nn.Module):
    """Holds the HF-named submodules (model.embed_tokens, model.layers.L..., model.norm)."""

    def __init__(self, cfg: ModelConfig, nsa: NSAConfig, **attn_kw):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, nsa, **attn_kw)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class NSADecoder(WeightPlacement, nn.Module):
    """Parameters are named exactly as in HF checkpoints (plus the native NSA names of
    CONTRACTS.md section 5), so a state dict loads one-to-one."""

    def __init__(self, cfg: ModelConfig, nsa: NSAConfig, *, gate_bias: bool = False,
                 compress_bias: bool = False):
        super().__init__()
        self.cfg, self.nsa, self.params = cfg, nsa, nsa.params
        self.model = Backbone(cfg, nsa, gate_bias=gate_bias, compress_bias=compress_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(cfg.rope, cfg.head_dim)
        self._attn_impl: AttnImpl | None = None      # None: TRITON on CUDA, TORCH on CPU
        self.triton_options = TritonOptions()
        self.hidden_capture: str | tuple[int, ...] | None = None   # set_hidden_capture
        # knobs of forwards that pass none (validated against the class at the edge)
        self.verify_knobs = VerifyKnobs()
        self.last_forward: ForwardInfo | None = None

    def set_hidden_capture(self, capture: str | Sequence[int] | None) -> "NSADecoder":
        """What every forward also returns in `PendingKV.hidden` (all rows), for an EAGLE
        draft head (docs/DESIGN.md section 8): None (nothing, the default); "final": the final
        normed hidden state, the LM head's input (EAGLE); layer indices: the residual stream
        entering each of those layers (= the output of the layer before), concatenated in
        increasing layer order (EAGLE-3's low / mid / high features, SGLang's
        `layers_to_capture`). Logits are unchanged."""
        if capture is None or capture == "final":
            self.hidden_capture = capture
            return self
        layers = tuple(sorted(set(int(i) for i in capture)))
        if not layers or not all(1 <= i < self.cfg.num_layers for i in layers):
            raise ValueError(f"set_hidden_capture: layer inputs {list(capture)} must be in "
                             f"[1, {self.cfg.num_layers - 1}] ({self.cfg.num_layers} layers)")
        self.hidden_capture = layers
        return self

    @property
    def attn_impl(self) -> AttnImpl:
        """The NSA core in use (see `specsa.model.nsa_layer`)."""
        return resolve_attn_impl(self._attn_impl, self.device)

    def set_attn_impl(self, impl: AttnImpl | str | None,
                      options: TritonOptions | None = None) -> "NSADecoder":
        """Choose the NSA core: AttnImpl / "torch" / "triton" / None or "auto" (device default).
        Raises ConfigError (e.g. triton on CPU without TRITON_INTERPRET=1)."""
        resolved = resolve_attn_impl(impl, self.device)
        self._attn_impl = None if impl is None or impl == "auto" else resolved
        if options is not None:
            self.triton_options = options
        return self

    def _placement_weight(self) -> torch.Tensor:
        return self.lm_head.weight      # always there (tied to the embedding or not)

    def new_cache(self, cache: CacheConfig) -> PagedKVCache:
        return PagedKVCache(num_layers=self.cfg.num_layers, num_kv_heads=self.cfg.num_kv_heads,
                            head_dim=self.cfg.head_dim, nsa=self.params, cache=cache,
                            dtype=self.dtype, device=self.device)

    def set_verify_knobs(self, knobs: VerifyKnobs) -> "NSADecoder":
        """Knobs for every forward that passes none (prefill, AR decode, ...). Whether they
        fit a precision class is the caller's check (`orchestrator.planner.knobs_error`)."""
        if not isinstance(knobs, VerifyKnobs):
            raise TypeError(f"set_verify_knobs: VerifyKnobs expected, got {type(knobs).__name__}")
        self.verify_knobs = knobs
        return self

    def prepare_triton(self, cache: PagedKVCache, blocks: Sequence[BlockInput],
                       knobs: VerifyKnobs | None = None,
                       traversal: Traversal | None = None) -> TritonForward:
        """Host geometry of a TRITON-path forward (reusable: `forward(..., prepared=)` then runs
        without host work, e.g. under CUDA-graph capture). Prefill chunks reserve pages."""
        cfg = self.cfg
        knobs = self.verify_knobs if knobs is None else knobs
        return build_triton_forward(cache, self._validated(blocks), self.nsa, cfg.num_heads,
                                   cfg.num_kv_heads, cfg.head_dim, cfg.scale, self.device,
                                   effective_options(self.triton_options, knobs, traversal),
                                   knobs)

    @torch.inference_mode()
    def forward(self, cache: PagedKVCache, blocks: Sequence[BlockInput], *,
                last_only: bool = False, prepared: TritonForward | None = None,
                knobs: VerifyKnobs | None = None, traversal: Traversal | None = None
                ) -> tuple[torch.Tensor, PendingKV]:
        """Run the new blocks of several requests in one batch.

        Args:
            cache: committed context of every request (read only here).
            blocks: one `BlockInput` per request (distinct rids, each already in the cache).
            last_only: return logits only for the last node of each block (prefill / decode).
            knobs: this forward's precision knobs (default `self.verify_knobs`; a given
                `prepared` carries its own).
            traversal: flattening order the schedule groups verify rows in (default
                `self.triton_options.traversal`); matters only for SHARED_INDEX.
        Returns:
            logits: [N, V] float32 (N = total nodes, blocks concatenated in order) or [B, V]
            with last_only; pending: `PendingKV` to pass to `cache.commit`.
        """
        knobs = self.verify_knobs if knobs is None else knobs
        if prepared is None and self.attn_impl is AttnImpl.TRITON:
            prepared = self.prepare_triton(cache, blocks, knobs, traversal)
        if prepared is not None:
            knobs = prepared.knobs
            views, tokens, positions = prepared, prepared.tokens, prepared.positions
            vp = prepared.verify
            sched = None if vp is None else vp.verifier._meta.schedule
            c = None if vp is None else vp.verifier._meta.group_size
        else:
            views, tokens, positions, sched, c = self._request_views(cache, blocks, knobs,
                                                                     traversal)
        sels = LayerSelections(knobs)
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        h = self.model.embed_tokens(tokens)
        ks, vs, cks, cvs = [], [], [], []
        aux, cap = [], self.hidden_capture
        for i, layer in enumerate(self.model.layers):
            if isinstance(cap, tuple) and i in cap:
                aux.append(h)
            a, k, v, ck, cv = layer.self_attn(layer.input_layernorm(h), cos, sin, cache, i, views,
                                              sels)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            ks.append(k)
            vs.append(v)
            cks.append(ck)
            cvs.append(cv)
        self.last_forward = ForwardInfo(schedule=sched, group_size=c,
                                        refresh_period=knobs.refresh_period,
                                        refreshed=sels.refreshed, reused=sels.reused)
        hidden = torch.cat(aux, dim=-1) if aux else None
        if cap == "final":
            h = hidden = self.model.norm(h)     # row-wise: the same values after slicing
        if last_only:
            h = h[prepared.last_rows if prepared is not None else
                  torch.tensor([rv.offset + rv.n - 1 for rv in views], device=h.device)]
        logits = self.lm_head(h if cap == "final" else self.model.norm(h)).float()
        if prepared is not None:
            return logits, PendingKV(k=torch.stack(ks), v=torch.stack(vs), ck=torch.stack(cks),
                                     cv=torch.stack(cvs), blocks=dict(prepared.metas), fused=True,
                                     in_place=prepared.in_place, hidden=hidden)
        metas = {rv.rid: BlockMeta(offset=rv.offset, prefix_len=rv.prefix_len,
                                   parents=tuple(rv.parents.tolist()), cmp_offset=rv.cmp_offset,
                                   close_nodes=tuple(rv.vis.cmp_nodes.tolist()),
                                   cmp_index=tuple(rv.vis.cmp_idx.tolist()))
                 for rv in views}
        pending = PendingKV(k=torch.stack(ks), v=torch.stack(vs), ck=torch.stack(cks),
                            cv=torch.stack(cvs), blocks=metas, hidden=hidden)
        return logits, pending

    def _request_views(self, cache: PagedKVCache, blocks: Sequence[BlockInput],
                       knobs: VerifyKnobs, traversal: Traversal | None
                       ) -> tuple[list[RequestView], torch.Tensor, torch.Tensor, Schedule | None,
                         int | None]:
        """Host-side geometry of the batch: flat tokens, positions, one view per request, and
        the schedule / group size its verify rows run with (the TRITON path's rule: chains
        longer than triton_options.prefill_chain are prefill chunks, never grouped)."""
        from specsa.schedule import as_parents, default_group_size, shared_sources

        dev = self.device
        opts = effective_options(self.triton_options, knobs, traversal)
        blocks = self._validated(blocks)
        verify = [par for _, ids, par in blocks
                  if not (par == tuple(range(-1, len(ids) - 1)) and len(ids) > opts.prefill_chain)]
        sched = c = None
        if verify:
            from specsa.verifier import unsupported_reason

            sched = opts.schedule
            sizes = [len(p) for p in verify]
            c = 1 if sched is Schedule.INDEPENDENT else (
                opts.group_size or default_group_size(self.cfg.num_heads // self.cfg.num_kv_heads,
                                                      sum(sizes)))
            why = (unsupported_reason(sched, knobs.precision, sizes, c, self.params.select)
                   if sched is Schedule.SHARED_INDEX else None)
            if why:    # the TRITON path's verifier refuses the same (NSAVerifier.prepare)
                raise ConfigError(why)
        views, toks, poss = [], [], []
        offset = cmp_offset = 0
        for rid, ids, par in blocks:
            parents = torch.tensor(par, dtype=torch.int64)
            P = cache.length(rid)
            vis = build_tree_visibility(P, parents, self.params)
            kv_slots, cmp_slots = cache.committed_slots(rid)
            src = None
            grouped = not (par == tuple(range(-1, len(ids) - 1)) and len(ids) > opts.prefill_chain)
            if sched is Schedule.SHARED_INDEX and grouped and c > 1:
                src = torch.tensor(shared_sources(as_parents(par), opts.traversal, c),
                                   dtype=torch.int64, device=dev)
            views.append(RequestView(
                rid=rid, offset=offset, n=len(ids), prefix_len=P, parents=parents.to(dev),
                vis=_to_device(vis, dev), kv_slots=kv_slots, cmp_slots=cmp_slots,
                cmp_offset=cmp_offset, sel_src=src))
            toks.extend(ids)
            poss.append(vis.q_pos)
            offset += len(ids)
            cmp_offset += int(vis.cmp_nodes.numel())
        return (views, torch.tensor(toks, dtype=torch.int64, device=dev),
                torch.cat(poss).to(dev), sched, c)

    def _validated(self, blocks: Sequence[BlockInput]
                   ) -> list[tuple[int, list[int], tuple[int, ...]]]:
        """(rid, token ids, parents) per block, with clear errors for malformed input."""
        if not blocks:
            raise BlockError("forward: empty batch")
        out, seen = [], set()
        for b in blocks:
            if b.rid in seen:
                raise BlockError(f"forward: request {b.rid} appears twice in one batch")
            seen.add(b.rid)
            ids = as_list(b.tokens)
            if not ids:
                raise BlockError(f"forward: request {b.rid} has an empty block")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise BlockError(f"forward: request {b.rid}: token id {bad[0]} outside the "
                                 f"vocabulary [0, {self.cfg.vocab_size})")
            out.append((b.rid, ids, normalise_parents(b.rid, len(ids), b.parents)))
        return out


def _to_device(vis: TreeVisibility, dev: torch.device) -> TreeVisibility:
    if dev.type == "cpu":
        return vis
    moved = {f.name: getattr(vis, f.name) for f in fields(vis)}
    return replace(vis, **{k: t.to(dev) for k, t in moved.items() if isinstance(t, torch.Tensor)})
