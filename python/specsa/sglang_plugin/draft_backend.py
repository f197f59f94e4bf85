"""A cheap draft on CUDA: the draft model attends to a sink plus a recent window of its KV cache
(StreamingLLM-style) through the fused NSA kernel, instead of reading the whole long context
densely with SGLang's Triton backend.

Why: at 64K the dense draft attention costs several ms per speculative step (draft extend over
the accepted tokens + every draft decode step, each reading all 64K keys of every draft layer),
more than the target's sparse verification. The target verifies every draft token, so what the
draft attends to changes only acceptance, never the output.

What a draft query sees: block 0 of the context (`sink` tokens), the last `window` committed
positions, and its own chain of new tokens (causal). This is `nsa_verify_fwd` with a fixed
selection (one block: the sink) and union combine; no compressed cache, no refresh.

- `DraftWindowMetadata`: device metadata (VerifyGeometry) for R rows that each hang T chain nodes
  below a prefix of P committed positions, in static buffers per (rows, T): filled from device
  tensors only (no host sync), so SGLang's draft CUDA graphs replay it.
- `SpecsaDraftExtendBackend` (a TritonAttnBackend, so SGLang captures its draft-extend graph):
  DRAFT_EXTEND_V2 (the draft over the verified tokens: T = num_draft_tokens chain rows per
  request) through the window kernel; the prompt's prefill (EXTEND) stays SGLang's dense
  Triton extend. On the CPU harness (tests under the Triton interpreter) the same mixin sits
  on the dense torch backend (`cpu_draft_extend_backend`).
- `SpecsaDraftDecodeBackend`: SGLang's multi-step draft decode (one backend per step). Step i's
  row (request b, branch t) is a one-node decode at position P_b + i whose earlier positions are
  the committed prefix and branch t's own draft tokens, read through a per-branch block table
  (SGLang lays out branch t's draft slots after the prefix: cache_locs.py's layout).
"""
from __future__ import annotations

import logging

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from specsa.kernels.common.launch import num_sms
from specsa.kernels.fused import VerifyArgs, VerifyGeometry, nsa_verify_fwd, split_workspace
from specsa.schedule import default_num_splits

from .kv_staging import direct_store_ok, stage_step_rows
from .settings import DraftWindow
from .step_metadata import block_table_from


class DraftWindowMetadata:
    """Static window-attention geometry of `rows` requests x `t` chain nodes (see module doc)."""

    def __init__(self, rows: int, t: int, width: int, hq: int, hkv: int, head_dim: int,
                 win: DraftWindow, device):
        self.rows, self.t, self.win = rows, t, win
        self.params = win.params()
        n = rows * t
        i32 = dict(dtype=torch.int32, device=device)
        node = torch.arange(t, device=device, dtype=torch.int32)
        self.node = node.repeat(rows)                                     # [N] depth
        anc = (torch.ones(t, dtype=torch.int64, device=device) << (node.long() + 1)) - 1
        work = -(-(win.window + win.sink) // 64)
        nsplit = default_num_splits(n * hkv, work, num_sms(device))
        ar = torch.arange(n, **i32)
        self.geo = VerifyGeometry(
            req_P=torch.zeros(rows, **i32), req_off=torch.arange(rows, **i32) * t,
            req_T=torch.full((rows,), t, **i32), block_table=torch.zeros(rows, width, **i32),
            q_pos=torch.zeros(n, **i32), q_anc=anc.repeat(rows), order=ar, sel_src=ar.clone(),
            g_req=torch.arange(rows, **i32).repeat_interleave(t), g_start=ar.clone(),
            g_len=torch.ones(n, **i32), g_winlo=torch.zeros(n, **i32), C=1, t_max=t,
            num_splits=nsplit, direct=True)
        self.sel = torch.zeros(n, hkv, 1, **i32)                          # block 0: the sink
        self.workspace = None if nsplit == 1 else split_workspace(
            nsplit, 1, n, hq, head_dim, n * hkv, device)

    def fill(self, prefix: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
        """prefix [rows] committed positions before each row's chain; block_table [rows, W]."""
        g = self.geo
        g.req_P.copy_(prefix)
        pos = prefix.to(torch.int32).repeat_interleave(self.t) + self.node
        g.q_pos.copy_(pos)
        g.g_winlo.copy_((pos - self.win.window + 1).clamp_(min=0))
        if block_table is not None:
            g.block_table.copy_(block_table)

    def attend(self, q, k_new, v_new, k_cache, v_cache, scale: float, out) -> torch.Tensor:
        return nsa_verify_fwd(VerifyArgs(q, k_new, v_new, k_cache, v_cache, self.geo, self.params,
                                         scale, sel=self.sel, out=out, workspace=self.workspace))


def branch_tables(bt: torch.Tensor, prefix: torch.Tensor, topk: int, steps: int,
                  page_size: int) -> torch.Tensor:
    """[B * topk, W] block tables of the draft branches: logical page j of branch t is the
    request's page j below the prefix's last (partial) page and page j + t * span from it on,
    where span is the pages SGLang gives each branch (cache_locs.py: `steps` slots per branch at
    page size 1, ceil((P % ps + steps) / ps) pages per branch otherwise; topk 1: no shift)."""
    if topk == 1:
        return bt
    b, w = bt.shape
    j = torch.arange(w, device=bt.device)[None, None, :]
    t = torch.arange(topk, device=bt.device)[None, :, None]
    p = prefix.long()[:, None, None]
    if page_size == 1:
        base, span = p, steps
    else:
        last = p % page_size
        base = (p - last) // page_size
        span = (last + steps + page_size - 1) // page_size
    idx = (j + (j >= base) * t * span).clamp_(max=w - 1).reshape(b, topk * w)
    return bt.gather(1, idx).reshape(b * topk, w)


class _WindowMetadataCache:
    """DraftWindowMetadata per key, allocated on first use (outside graph capture)."""

    def __init__(self, runner, win: DraftWindow):
        mc = runner.model_config
        pool = runner.token_to_kv_pool
        self.hkv, self.head_dim = pool.head_num, pool.head_dim
        self.hq = mc.num_attention_heads // max(1, int(getattr(runner, "tp_size", 1) or 1))
        self.page_size = runner.page_size
        self.width = -(-runner.req_to_token_pool.req_to_token.shape[1] // self.page_size)
        self.req_to_token = runner.req_to_token_pool.req_to_token
        self.pool, self.win, self.device = pool, win, runner.device
        self.direct_store = direct_store_ok(pool)
        self._metas: dict = {}
        logging.getLogger("specsa").warning(
            "specsa: draft attention = sink %d + window %d through the fused kernel (page %d); "
            "draft K/V store %s", win.sink, win.window, self.page_size,
            "fused with staging" if self.direct_store else "through the pool")

    def get(self, key, rows: int, t: int) -> DraftWindowMetadata:
        if key not in self._metas:
            self._metas[key] = DraftWindowMetadata(rows, t, self.width, self.hq, self.hkv,
                                                   self.head_dim, self.win, self.device)
        return self._metas[key]

    def table(self, pool_idx: torch.Tensor) -> torch.Tensor:
        """[B, width] page tables of the requests (device op)."""
        rows = self.req_to_token.index_select(0, pool_idx.long())
        return block_table_from(rows, self.page_size, self.width)

    def caches(self, layer):
        k = self.pool.get_key_buffer(layer.layer_id)
        v = self.pool.get_value_buffer(layer.layer_id)
        ps = self.page_size
        return k.view(-1, ps, *k.shape[1:]), v.view(-1, ps, *v.shape[1:])


def _attend(metas: _WindowMetadataCache, meta: DraftWindowMetadata, q, k, v, layer, fb,
            save_kv_cache):
    kc, vc = metas.caches(layer)
    q3, k3, v3 = stage_step_rows(metas.pool, metas.direct_store, layer, q, k, v, fb,
                                 save_kv_cache)
    n = meta.rows * meta.t
    if q3.shape[0] != n:
        raise RuntimeError(f"specsa draft backend: forward has {q3.shape[0]} query rows, the "
                           f"metadata {n}")
    out = q3.new_empty(n, q3.shape[1], layer.v_head_dim)
    meta.attend(q3, k3, v3, kc, vc, float(layer.scaling), out)
    return out.reshape(-1, q3.shape[1] * layer.v_head_dim)


class _WindowExtend:
    """Mixin: DRAFT_EXTEND_V2 through the window kernel, every other forward (the prompt's
    draft prefill) through the base backend."""

    def _setup_window(self, runner, win: DraftWindow, num_draft_tokens: int) -> None:
        self.metas = _WindowMetadataCache(runner, win)
        self.t = num_draft_tokens
        self.window_meta: DraftWindowMetadata | None = None

    def _rows_per_request(self, fb, bs: int) -> int:
        """T of this forward. SGLang's adaptive mode (SPECSA_PLAN) builds this backend once per
        draft length, but captures every state's draft-extend graph at the server's widest T
        (it replays a graph only when the widths match, else runs eager): so T comes from the
        forward (its spec_info, else its rows), not from the state the backend was built for."""
        t = int(getattr(fb.spec_info, "num_tokens_per_req", 0) or 0)
        if t <= 0:
            rows = int(fb.out_cache_loc.shape[0]) if fb.out_cache_loc is not None else 0
            t = rows // bs if bs and rows % bs == 0 and rows else self.t
        return t

    def _build_metadata(self, fb) -> None:
        bs = int(fb.batch_size)
        t = self._rows_per_request(fb, bs)
        meta = self.metas.get(("extend", bs, t), bs, t)
        # DRAFT_EXTEND_V2's seq_lens already count the T rows it writes (graph padding rows
        # carry a fill value: clamp so that they read nothing)
        prefix = (fb.seq_lens[:bs] - t).clamp(min=0)
        meta.fill(prefix, self.metas.table(fb.req_pool_indices[:bs]))
        self.window_meta = meta

    def init_forward_metadata(self, fb):
        if fb.forward_mode.is_draft_extend_v2():
            self._build_metadata(fb)
            return
        self.window_meta = None
        super().init_forward_metadata(fb)

    def init_forward_metadata_out_graph(self, fb, in_capture: bool = False):
        if fb.forward_mode.is_draft_extend_v2():
            self._build_metadata(fb)
            return
        self.window_meta = None
        super().init_forward_metadata_out_graph(fb, in_capture)

    def init_forward_metadata_in_graph(self, fb):
        if self.window_meta is None:
            super().init_forward_metadata_in_graph(fb)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self.window_meta is None or not forward_batch.forward_mode.is_draft_extend_v2():
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        return _attend(self.metas, self.window_meta, q, k, v, layer, forward_batch,
                       save_kv_cache)


class SpecsaDraftExtendBackend(_WindowExtend, TritonAttnBackend):
    """CUDA: a TritonAttnBackend (SGLang captures draft-extend graphs only for backends it
    knows) whose DRAFT_EXTEND_V2 forwards run the window kernel."""

    def __init__(self, runner, win: DraftWindow, num_draft_tokens: int):
        TritonAttnBackend.__init__(self, runner)
        self._setup_window(runner, win, num_draft_tokens)


def cpu_draft_extend_backend(runner, win: DraftWindow, num_draft_tokens: int):
    """CPU harness (tests, Triton interpreter): the window kernel for DRAFT_EXTEND_V2 over the
    dense torch backend for the prompt's prefill."""
    from .backend import SpecsaAttnBackend

    class CpuDraftExtendBackend(_WindowExtend, SpecsaAttnBackend):
        def __init__(self):
            SpecsaAttnBackend.__init__(self, runner, dense=True)
            self._setup_window(runner, win, num_draft_tokens)
    return CpuDraftExtendBackend()


class _DraftStep(AttentionBackend):
    """Step i of the multi-step draft decode: forward_decode only."""

    def __init__(self, owner: "SpecsaDraftDecodeBackend", step: int):
        super().__init__()
        self.owner, self.step = owner, step

    def init_forward_metadata(self, fb):
        pass

    def init_forward_metadata_out_graph(self, fb, in_capture: bool = False):
        pass

    def init_forward_metadata_in_graph(self, fb):
        pass

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        o = self.owner
        return _attend(o.metas, o.step_metas[self.step], q, k, v, layer, forward_batch,
                       save_kv_cache)


class SpecsaDraftDecodeBackend:
    """SGLang's multi-step draft-decode container (attn_backends[i] serves step i)."""

    needs_cpu_seq_lens = False

    def __init__(self, runner, topk: int, num_steps: int, win: DraftWindow):
        self.topk, self.num_steps = topk, num_steps
        self.metas = _WindowMetadataCache(runner, win)
        self.attn_backends = [_DraftStep(self, i) for i in range(num_steps - 1)]
        self.step_metas: list[DraftWindowMetadata] = []

    def _build_metadata(self, fb) -> None:
        bs = int(fb.batch_size)
        rows = bs * self.topk
        p = self.metas
        prefix = fb.seq_lens[:bs]
        bt = branch_tables(p.table(fb.req_pool_indices[:bs]), prefix, self.topk,
                           self.num_steps, p.page_size)
        pre = prefix.to(torch.int32).repeat_interleave(self.topk)
        self.step_metas = []
        for i in range(self.num_steps - 1):
            meta = p.get(("decode", bs, i), rows, 1)
            # step i's query sits at P + i; branch positions P..P+i-1 are its earlier drafts
            meta.fill(pre + i, bt if i == 0 else None)
            if i:
                meta.geo.block_table.copy_(self.step_metas[0].geo.block_table)
            self.step_metas.append(meta)

    def init_forward_metadata(self, fb):
        self._build_metadata(fb)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        pass            # metadata is allocated per batch size on first use

    def init_forward_metadata_out_graph(self, fb, in_capture: bool = False):
        self._build_metadata(fb)

    def init_forward_metadata_in_graph(self, fb):
        pass
