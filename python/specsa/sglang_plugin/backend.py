"""The `specsa` SGLang attention backend: extend, decode and TARGET_VERIFY with NSA semantics
(docs/DESIGN.md section 3) on the target; dense attention on a draft runner.

Every forward is reduced to one shape per request: P committed tokens already in the KV pool
(positions 0..P-1, slots from req_to_token) plus T new tokens hanging below them as a tree
(`parents`, -1 = child of the context). Extend and draft-extend are chains, decode is one node,
TARGET_VERIFY is the EAGLE tree read from spec_info's retrieve links. The NSA math is
`specsa.kernels.nsa.masked.masked_nsa` (torch; CPU and an eager CUDA path): a draft node sees
the committed prefix plus its ancestors, and compression blocks that close inside the tree are
path-dependent provisional tokens (`provisional_cmp`). Committed compressed tokens come from
`PagedCompressedKV`, one entry per KV page.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from specsa.config import Compression, ConfigError, NSAConfig, VerifyKnobs
from specsa.kernels.nsa.masked import build_tree_visibility, masked_nsa, provisional_cmp

from .compressed_cache import PagedCompressedKV, shared_on_pool
from .native_weights import layer_native
from .settings import ENV_VERIFY, attn_impl, resolve_nsa_config, verify_knobs


def make_target_backend(runner):
    """The `specsa` backend of a model runner: dense for a draft runner; NSA on the Triton
    kernels (CUDA, graph-capturable) or the torch path (CPU harness) for the target."""
    if runner.is_draft_worker:
        return SpecsaAttnBackend(runner)
    if attn_impl(str(runner.device)) == "torch":
        if verify_knobs() != VerifyKnobs():
            raise ConfigError(f"{ENV_VERIFY} (non-STRICT verification knobs) needs the Triton "
                              f"path: the torch reference path is exact NSA only (set "
                              f"SPECSA_SGLANG_ATTN=triton, with TRITON_INTERPRET=1 on a CPU)")
        return SpecsaAttnBackend(runner)
    nsa = resolve_nsa_config(runner.model_config.hf_config)
    from .triton_backend import SpecsaTritonBackend
    return SpecsaTritonBackend(runner, nsa)


@dataclass(frozen=True)
class ReqGeometry:
    """One request of a forward: P committed tokens + T new ones (rows start..start+T)."""

    pool_idx: int
    prefix: int
    start: int
    count: int
    parents: torch.Tensor   # [T] int64 on CPU, -1 = child of the committed context


def chain_parents(n: int) -> torch.Tensor:
    return torch.arange(-1, n - 1, dtype=torch.int64)


def tree_parents(next_token: list[int], next_sibling: list[int]) -> torch.Tensor:
    """Parents from EAGLE's first-child / next-sibling links (node 0 = root)."""
    n = len(next_token)
    parents = torch.full((n,), -2, dtype=torch.int64)
    parents[0] = -1
    for u in range(n):
        c = next_token[u]
        while c != -1:
            parents[c] = u
            c = next_sibling[c]
    if bool((parents == -2).any()):
        raise ValueError(f"specsa backend: draft tree has unreachable nodes: {parents.tolist()}")
    return parents


def forward_geometry(fb) -> list[ReqGeometry]:
    """Per-request geometry of an extend / decode / verify ForwardBatch."""
    mode = fb.forward_mode
    seq = (fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.cpu()).tolist()
    pools = fb.req_pool_indices.tolist()
    out, start = [], 0
    if mode.is_target_verify():
        si = fb.spec_info
        n = int(si.draft_token_num)
        nxt, sib = si.retrieve_next_token.tolist(), si.retrieve_next_sibling.tolist()
        for b, (r, s) in enumerate(zip(pools, seq)):
            out.append(ReqGeometry(r, int(s), start, n, tree_parents(nxt[b], sib[b])))
            start += n
        return out
    if mode.is_decode():
        for r, s in zip(pools, seq):
            out.append(ReqGeometry(r, int(s) - 1, start, 1, chain_parents(1)))
            start += 1
        return out
    ext = fb.extend_seq_lens_cpu
    if ext is None:
        ext = fb.extend_seq_lens.tolist()
    for r, s, n in zip(pools, seq, ext):
        out.append(ReqGeometry(r, int(s) - int(n), start, int(n), chain_parents(int(n))))
        start += int(n)
    return out


def dense_tree_attention(q, k_ctx, v_ctx, k_new, v_new, parents, scale) -> torch.Tensor:
    """Softmax attention of T tree queries over context + ancestors (fp32). q [T, Hq, D]."""
    from specsa.draft_tree import ancestor_mask

    t, hq, _ = q.shape
    hkv = k_new.shape[1]
    k = torch.cat([k_ctx, k_new]).float().repeat_interleave(hq // hkv, dim=1)
    v = torch.cat([v_ctx, v_new]).float().repeat_interleave(hq // hkv, dim=1)
    vis = torch.cat([torch.ones(t, k_ctx.shape[0], dtype=torch.bool, device=q.device),
                     ancestor_mask(parents.to(q.device))], dim=1)
    logits = torch.einsum("thd,nhd->htn", q.float(), k) * scale
    p = torch.softmax(logits.masked_fill(~vis[None], float("-inf")), dim=-1)
    return torch.einsum("htn,nhd->thd", p, v)


class SpecsaAttnBackend(AttentionBackend):
    """NSA (target) / dense (draft runner) attention over SGLang's paged MHA KV pool."""

    needs_cpu_seq_lens = True

    def __init__(self, runner, nsa: NSAConfig | None = None, dense: bool | None = None):
        super().__init__()
        self.device = runner.device
        self.req_to_token_pool = runner.req_to_token_pool
        self.token_to_kv_pool = runner.token_to_kv_pool
        self.page_size = runner.page_size
        self.dense = runner.is_draft_worker if dense is None else dense
        self.nsa = None if self.dense else (nsa or resolve_nsa_config(runner.model_config.hf_config))
        self.geometry: list[ReqGeometry] = []
        self.cmp = None
        if self.nsa is not None:
            mc = runner.model_config
            pool = self.token_to_kv_pool
            self.cmp = shared_on_pool(pool, "torch_compressed_kv", lambda: PagedCompressedKV(
                num_layers=mc.num_hidden_layers, num_slots=pool.size + self.page_size,
                page_size=self.page_size, params=self.nsa.params,
                num_kv_heads=pool.head_num, head_dim=pool.head_dim,
                v_head_dim=getattr(pool, "v_head_dim", pool.head_dim), device=self.device))
            logging.getLogger("specsa").warning(
                "specsa: target NSA attention on the torch path (page %d); compressed KV "
                "%.1f MiB for a pool of %d tokens", self.page_size, self.cmp.nbytes() / 2**20,
                pool.size)

    # -- metadata ------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        if forward_batch.forward_mode.is_idle():
            self.geometry = []
            return
        self.geometry = forward_geometry(forward_batch)
        if self.cmp is not None and forward_batch.out_cache_loc is not None:
            self.cmp.invalidate(forward_batch.out_cache_loc)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        raise NotImplementedError(
            "specsa backend: the torch NSA path is eager only; CUDA graphs are disabled for it")

    # -- forward -------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def _forward(self, q, k, v, layer, fb, save_kv_cache):
        pool = self.token_to_kv_pool
        loc = fb.out_cache_loc
        if save_kv_cache and k is not None:
            pool.set_kv_buffer(layer, KVWriteLoc(loc), k, v)
        hq, hkv = layer.tp_q_head_num, layer.tp_k_head_num
        q3 = q.view(-1, hq, layer.qk_head_dim)
        k3 = None if k is None else k.view(-1, hkv, layer.qk_head_dim)
        v3 = None if v is None else v.view(-1, hkv, layer.v_head_dim)
        out = q.new_empty(q3.shape[0], hq, layer.v_head_dim)
        k_buf = pool.get_key_buffer(layer.layer_id)
        v_buf = pool.get_value_buffer(layer.layer_id)
        rows = self.req_to_token_pool.req_to_token
        for g in self.geometry:
            row = rows[g.pool_idx]
            ctx = row[:g.prefix].long()
            sl = slice(g.start, g.start + g.count)
            if save_kv_cache or k3 is None:     # read back exactly what later steps will read
                new = loc[sl].long()
                k_new, v_new = k_buf[new], v_buf[new]
            else:
                k_new, v_new = k3[sl], v3[sl]
            k_ctx, v_ctx = k_buf[ctx], v_buf[ctx]
            if self.nsa is None:
                o = dense_tree_attention(q3[sl], k_ctx, v_ctx, k_new, v_new, g.parents,
                                         layer.scaling)
            else:
                o = self._nsa(q3[sl], k_ctx, v_ctx, k_new, v_new, g, row, layer, k_buf, v_buf)
            out[sl] = o.to(out.dtype)
        return out.view(-1, hq * layer.v_head_dim)

    def _nsa(self, q, k_ctx, v_ctx, k_new, v_new, g, row, layer, k_buf, v_buf):
        params = self.nsa.params
        gates, cw = layer_native(layer, params.gated, self.nsa.compress is Compression.LEARNED)
        wk = bk = wv = bv = None
        if cw is not None:
            wk, bk, wv, bv = cw
            self.cmp.weights[layer.layer_id] = cw
        parents = g.parents.to(q.device)
        vis = build_tree_visibility(g.prefix, parents, params)
        ck_c, cv_c = self.cmp.committed(layer.layer_id, row, g.prefix, k_buf, v_buf)
        keep = min(g.prefix, params.block - 1)
        pk = provisional_cmp(k_ctx[g.prefix - keep:], k_new, parents, params, wk, bk,
                             ctx_len=g.prefix)
        pv = provisional_cmp(v_ctx[g.prefix - keep:], v_new, parents, params, wv, bv,
                             ctx_len=g.prefix)
        o, _ = masked_nsa(q, torch.cat([k_ctx, k_new]), torch.cat([v_ctx, v_new]), vis.q_pos,
                          vis.k_pos, vis.kv_visible, torch.cat([ck_c, pk]), torch.cat([cv_c, pv]),
                          vis.c_idx, vis.c_visible, params, layer.scaling,
                          None if gates is None else gates[g.start:g.start + g.count])
        return o


class _DraftStepBackend(AttentionBackend):
    """Step i of a multi-step EAGLE draft decode on CPU (dense): row (b, t) reads the committed
    prefix of request b plus branch t's draft slots of steps 0..i, the layout of SGLang's
    generate_draft_decode_kv_indices (kernels/ops/speculative/cache_locs.py)."""

    def __init__(self, owner: "SpecsaDraftDecodeBackend", step: int):
        super().__init__()
        self.owner, self.step = owner, step

    def init_forward_metadata(self, forward_batch):
        pass

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kwargs):
        o = self.owner
        pool = o.runner.token_to_kv_pool
        if save_kv_cache:
            pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc), k, v)
        hq = layer.tp_q_head_num
        q3 = q.view(-1, hq, layer.qk_head_dim)
        out = q.new_empty(q3.shape[0], hq, layer.v_head_dim)
        k_buf, v_buf = pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
        rows = o.runner.req_to_token_pool.req_to_token
        seq = (fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.cpu()).tolist()
        ps, topk, steps = o.page_size, o.topk, o.num_steps
        one = torch.full((1,), -1, dtype=torch.int64)
        for b, r in enumerate(fb.req_pool_indices.tolist()):
            s = int(seq[b])
            row = rows[r]
            for t in range(topk):
                if ps == 1 or topk == 1:
                    first = s + t * steps
                else:
                    last = s % ps
                    first = s - last + t * ((last + steps + ps - 1) // ps) * ps + last
                slots = torch.cat([row[:s], row[first:first + self.step + 1]]).long()
                i = b * topk + t
                att = dense_tree_attention(q3[i:i + 1], k_buf[slots[:-1]], v_buf[slots[:-1]],
                                           k_buf[slots[-1:]], v_buf[slots[-1:]], one,
                                           layer.scaling)
                out[i] = att[0].to(out.dtype)
        return out.view(-1, hq * layer.v_head_dim)


class SpecsaDraftDecodeBackend:
    """Container with one backend per draft step (SGLang's multi-step draft convention)."""

    needs_cpu_seq_lens = True

    def __init__(self, runner, topk: int, num_steps: int):
        self.runner, self.topk, self.num_steps = runner, topk, num_steps
        self.page_size = runner.page_size
        self.attn_backends = [_DraftStepBackend(self, i) for i in range(num_steps - 1)]

    def init_forward_metadata(self, forward_batch):
        pass

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        raise NotImplementedError("specsa CPU draft backend has no CUDA graphs")
