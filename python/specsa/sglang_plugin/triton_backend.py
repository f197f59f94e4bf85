"""The `specsa` target backend on the Triton kernels (the CUDA path; CPU only under the Triton
interpreter, for tests): extend through `chunked_nsa_prefill`, decode and TARGET_VERIFY through
the refresh kernel (`score_topk_grouped` on the verifier's groups) and `NSAVerifier.run`
(EXACT_MERGED, or INDEPENDENT for steps of at most 8 queries: schedule.default_schedule),
capturable in SGLang's CUDA graphs.

Compressed KV: [layers, num_pages, CPP, Hkv, D] in the pool dtype, CONTRACTS.md section 4
layout (token i lives in the page of its closing position). It is filled from the committed
pool by `compress_paged`: an extend writes the tokens its chunk closes; every forward first
rewrites the tokens closed by its last `margin` committed positions (margin >= the tokens a
step can commit), which covers what the previous step accepted, and what a finished request
left in pages that the radix cache now shares. Rewrites are idempotent (same inputs, same
kernel), so a shared page never changes value; a recycled page is rewritten before any read,
because only tokens closed below a request's committed length are read.

Tree nodes that close a compression block get provisional tokens (`compress_gather` over their
path), the same arithmetic as the committed ones, so acceptance keeps them bit-identical.
"""
from __future__ import annotations

import logging
import time

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from specsa.config import Compression, NSAConfig
from specsa.kernels.compression import compress_paged
from specsa.kernels.prefill import chunked_nsa_prefill
from specsa.verify_layer import verify_layer

from .backend import forward_geometry
from .compressed_cache import shared_on_pool
from .jit_log import install_from_env as install_jit_log
from .kv_staging import direct_store_ok, stage_step_rows
from .memory import compressed_shape
from .native_weights import layer_native
from .settings import state_draft_tokens, verify_knobs
from .step_metadata import (StepBuffers, StepMetadataBuilder, block_table_from,
                            qlen_only_verify_mask)


class SpecsaTritonBackend(AttentionBackend):
    """NSA target attention on the Triton kernels over SGLang's MHA token pool."""

    # decode / verify metadata reads seq_lens on the device; prefill reads SGLang's host lists
    needs_cpu_seq_lens = False

    def __init__(self, runner, nsa: NSAConfig):
        super().__init__()
        install_jit_log()          # SPECSA_JIT_LOG: compiles during serving (jit_log.py)
        self.device = runner.device
        self.req_to_token_pool = runner.req_to_token_pool
        self.pool = runner.token_to_kv_pool
        self.page_size = ps = runner.page_size
        self.nsa, self.params = nsa, nsa.params
        sa = runner.server_args
        self.draft_tokens = state_draft_tokens(sa)
        self.topk = int(getattr(sa, "speculative_eagle_topk", None) or 1)
        mc = runner.model_config
        # SGLang's overlap (spec v2) path sizes the verify tree mask from it when the batch
        # carries no host seq_lens (eagle_worker_common.build_eagle_verify_input)
        self.max_context_len = mc.context_len
        hkv, d = self.pool.head_num, self.pool.head_dim
        rows = self.pool.get_key_buffer(self.pool.start_layer).shape[0]
        dtype = self.pool.get_key_buffer(self.pool.start_layer).dtype
        shape = compressed_shape(mc.num_hidden_layers, rows, ps, nsa, hkv, d)
        num_pages = shape[1]
        self.ck, self.cv = shared_on_pool(self.pool, "triton_compressed_kv", lambda: (
            torch.zeros(shape, dtype=dtype, device=self.device),
            torch.zeros(shape, dtype=dtype, device=self.device)))
        width = -(-self.req_to_token_pool.req_to_token.shape[1] // ps)
        hq = mc.num_attention_heads // max(1, getattr(sa, "tp_size", 1))
        scale = getattr(mc, "head_dim", d) ** -0.5
        self.knobs = verify_knobs()
        self.metadata = StepMetadataBuilder(nsa, hq, hkv, d, scale, ps, width,
                                            margin=self.draft_tokens + 1, device=self.device,
                                            knobs=self.knobs)
        # REUSE classes: the selection of the last refresh layer of the current step
        self._last_sel: torch.Tensor | None = None
        self._refreshed = [0, 0]          # [layers that refreshed, layers] of the current step
        self._reported = False
        self.step: StepBuffers | None = None
        self.extend = None
        self._direct_store = direct_store_ok(self.pool)
        self.timer = None        # step_timing.StepTimer, set by the worker when timing is on
        # SGLang's verify tree mask: this backend never reads it (tree visibility comes from
        # the draft's parent links), so SGLang writes a QLEN_ONLY T x T mask per request into
        # one fixed buffer instead of allocating and filling a FULL_MASK of bs x context_len x
        # T bools every tree step (step_metadata.qlen_only_verify_mask)
        self._verify_mask = qlen_only_verify_mask(
            self.req_to_token_pool.size, self.draft_tokens, self.device) \
            if getattr(sa, "speculative_algorithm", None) else None
        if self._verify_mask is not None:
            logging.getLogger("specsa").warning(
                "specsa: verify tree mask QLEN_ONLY (%d requests x %d x %d, never read)",
                self.req_to_token_pool.size, self.draft_tokens, self.draft_tokens)
        logging.getLogger("specsa").warning(
            "specsa: target NSA attention on the Triton kernels (%s, page %d, margin %d); "
            "compressed KV %.1f MiB for a pool of %d tokens; verify %s; step K/V store %s",
            self.device, ps, self.metadata.margin,
            2 * self.ck.numel() * self.ck.element_size() / 2**20, num_pages * ps, self.knobs,
            "fused with staging" if self._direct_store else "through the pool")

    # -- metadata ------------------------------------------------------------------------
    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        pass          # buffers are allocated per (mode, batch size) on first use

    @property
    def verify_mask(self):
        return self._verify_mask

    def init_forward_metadata(self, forward_batch):
        self.init_forward_metadata_out_graph(forward_batch)

    def init_forward_metadata_out_graph(self, fb, in_capture: bool = False):
        mode = fb.forward_mode
        self.step = self.extend = None
        if mode.is_idle():
            return
        t0 = time.perf_counter()
        self._report_reuse()
        if mode.is_target_verify() or mode.is_decode():
            self.step = self._build_step(fb, in_capture)
        else:
            self.extend = self._build_extend(fb)
        if self.timer is not None:
            self.timer.add_metadata_host(time.perf_counter() - t0)

    def _report_reuse(self) -> None:
        """Once: how many layers of an eager step ran the refresh (the REUSE saving)."""
        done, total = self._refreshed
        if total and not self._reported:
            self._reported = True
            logging.getLogger("specsa").warning(
                "specsa: a decode/verify step ran the selection refresh in %d of %d layers "
                "(refresh period %d)", done, total, self.knobs.refresh_period)
        self._refreshed = [0, 0]

    def _build_step(self, fb, in_capture: bool) -> StepBuffers:
        """Build a decode / TARGET_VERIFY step's metadata on the device (no host sync)."""
        verify = fb.forward_mode.is_target_verify()
        bs = int(getattr(fb, "batch_size", None) or fb.req_pool_indices.shape[0])
        t = self.draft_tokens if verify else 1
        buf = self.metadata.buffers("verify" if verify else "decode", bs, t)
        # decode: seq_lens counts the token being decoded; verify: the committed prefix only.
        # Trees: parents from EAGLE's links for its rows, chains for the CUDA-graph padding
        # rows beyond them (and for decode, topk 1 and graph capture), all in one launch
        links = None
        si = fb.spec_info
        if verify and self.topk > 1 and not in_capture and si is not None \
                and si.retrieve_next_token is not None:
            links = (si.retrieve_next_token, si.retrieve_next_sibling)
        return self.metadata.fill_step(buf, fb.seq_lens, not verify,
                                       self.req_to_token_pool.req_to_token,
                                       fb.req_pool_indices, links)

    def _build_extend(self, fb) -> dict:
        """An extend's (prefill) metadata from SGLang's host lists."""
        geo = forward_geometry(fb)
        dev, ps = self.device, self.page_size
        pre = [g.prefix for g in geo]
        lens = [g.prefix + g.count for g in geo]
        q_req = [b for b, g in enumerate(geo) for _ in range(g.count)]
        q_pos = [g.prefix + i for g in geo for i in range(g.count)]
        width = max(1, -(-max(lens) // ps))
        pool_idx = torch.tensor([g.pool_idx for g in geo], dtype=torch.int64).to(dev)
        req_rows = self.req_to_token_pool.req_to_token.index_select(0, pool_idx)
        i32 = lambda x: torch.tensor(x, dtype=torch.int32).to(dev)
        return dict(
            bt=block_table_from(req_rows, ps, width),
            q_req=i32(q_req), q_pos=i32(q_pos), prefix=i32(pre), lens=i32(lens),
            lo=i32([max(0, p - self.metadata.margin) for p in pre]))

    # -- forward -------------------------------------------------------------------------
    def _caches(self, layer):
        lid = layer.layer_id
        k_buf = self.pool.get_key_buffer(lid)
        v_buf = self.pool.get_value_buffer(lid)
        ps = self.page_size
        kc = k_buf.view(-1, ps, *k_buf.shape[1:])
        vc = v_buf.view(-1, ps, *v_buf.shape[1:])
        return kc, vc, self.ck[lid - self.pool.start_layer], self.cv[lid - self.pool.start_layer]

    def _native(self, layer):
        """(gates, learned compression weights) of a native NSA checkpoint's layer."""
        return layer_native(layer, self.params.gated, self.nsa.compress is Compression.LEARNED)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self.step is not None:
            return self._forward_step(q, k, v, layer, forward_batch, save_kv_cache)
        return self._forward_prefill(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward_step(q, k, v, layer, forward_batch, save_kv_cache)

    def _forward_prefill(self, q, k, v, layer, fb, save_kv_cache):
        e = self.extend
        n = int(e["q_req"].shape[0])
        # a breakable prefill graph may hand over rows padded to its token bucket: attend the
        # rows of its metadata, leave the padding zero (SGLang never reads it)
        if save_kv_cache:
            loc = fb.out_cache_loc
            self.pool.set_kv_buffer(layer, KVWriteLoc(loc), k[:loc.shape[0]], v[:loc.shape[0]])
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim).contiguous()
        kc, vc, ck, cv = self._caches(layer)
        p = self.params
        gates, cw = self._native(layer)
        compress_paged(kc, vc, ck, cv, e["bt"], e["lo"], e["prefix"], p, cw=cw)
        out = q3.new_zeros(q3.shape[0], layer.tp_q_head_num, layer.v_head_dim)
        chunked_nsa_prefill(q3[:n].contiguous(), kc, vc, ck, cv, e["bt"], e["q_req"], e["q_pos"],
                            e["prefix"], e["lens"], p, layer.scaling, cw=cw,
                            gates=None if gates is None else gates[:n].contiguous(),
                            out=out[:n])
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _forward_step(self, q, k, v, layer, fb, save_kv_cache):
        s = self.step
        q3, kn, vn = stage_step_rows(self.pool, self._direct_store, layer, q, k, v, fb,
                                     save_kv_cache)
        kc, vc, ck, cv = self._caches(layer)
        n = s.num_tokens
        if q3.shape[0] != n:
            raise RuntimeError(f"specsa triton backend: forward has {q3.shape[0]} query rows, "
                               f"the step metadata {n}")
        p = self.params
        gates, cw = self._native(layer)
        dm = s.meta
        # every layer keeps its committed compressed tokens current (a later step may refresh it)
        compress_paged(kc, vc, ck, cv, dm.block_table, dm.upd_lo, dm.prefix, p, cw=cw)
        refresh = self.knobs.refreshes(layer.layer_id - self.pool.start_layer) \
            or self._last_sel is None
        out = q3.new_empty(n, layer.tp_q_head_num, layer.v_head_dim)
        s.verifier.scale = float(layer.scaling)
        out, sel, _, _ = verify_layer(
            q3, kn, vn, kc, vc, ck, cv, s.tensors, p, layer.scaling, self.page_size,
            gates=gates, cw=cw, reuse_sel=None if refresh else self._last_sel, out=out)
        self._last_sel = sel
        self._refreshed[0] += int(refresh or p.gated)
        self._refreshed[1] += 1
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)
