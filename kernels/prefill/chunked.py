"""Chunked NSA prefill on the GPU: compress the chunk's closed blocks, refresh (score_topk),
then selected + window attention with the combine. Three launches, no host sync.

Legend: N chunk rows (any mix of requests), B requests, Hq / Hkv heads, D head dim, PS page
size, CPP = ceil(PS / d). The chunk's K/V must already be in the paged cache (the backend
writes KV before attention, as SGLang does).
"""
from __future__ import annotations

import torch
import triton

from ..common.params import NSAParams
from ..compression.blocks import compress_paged
from ..compression.score_topk import score_topk
from .attention import sel_win_attention_kernel


def chunked_nsa_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        ck_cache: torch.Tensor, cv_cache: torch.Tensor,
                        block_table: torch.Tensor, q_req: torch.Tensor, q_pos: torch.Tensor,
                        prefix_lens: torch.Tensor, seq_lens: torch.Tensor, params: NSAParams,
                        scale: float, cw=None, gates: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, sel: torch.Tensor | None = None,
                        compress_programs: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA output of a prefill chunk.

    Args:
        q (torch.Tensor): shape [N, Hq, D] fp32/fp16/bf16, the chunk's queries.
        k_cache, v_cache (torch.Tensor): shape [num_pages, PS, Hkv, D], holding positions
            0..seq_lens[b]-1 of each request.
        ck_cache, cv_cache (torch.Tensor): shape [num_pages, CPP, Hkv, D]; # mutable: the
            compressed tokens closed inside the chunk (num_cmp(prefix_len)..num_cmp(seq_len)-1)
            are written here first; earlier ones must be present.
        block_table (torch.Tensor): shape [B, max_pages] int.
        q_req, q_pos (torch.Tensor): shape [N] int, request and position t of each row
            (prefix_lens[b] <= t < seq_lens[b]).
        prefix_lens, seq_lens (torch.Tensor): shape [B] int, lengths before / after the chunk.
        params (NSAParams): geometry and combine (params.gated needs gates [N, Hq, 3], sigmoid
            already applied, order (cmp, slc, win)).
        scale (float): softmax scale. cw: learned compression (wk, bk, wv, bv) or None (MEAN).
        out (torch.Tensor | None): shape [N, Hq, D]; # mutable. sel: [N, Hkv, topn] int32.
        compress_programs (int): programs per (request, head) for the chunk's compression.
    Returns:
        (out [N, Hq, D] q.dtype, sel [N, Hkv, topn] int32 sorted, -1 padded).
    """
    n, hq, dim = q.shape
    _, ps, hkv, _ = k_cache.shape
    if params.gated != (gates is not None):
        raise ValueError("chunked_nsa_prefill: gates must be given exactly when params.gated")
    if gates is not None and (tuple(gates.shape) != (n, hq, 3) or not gates.is_contiguous()):
        raise ValueError(f"chunked_nsa_prefill: gates must be contiguous [N={n}, Hq={hq}, 3]")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and q.is_contiguous()):
        raise ValueError("chunked_nsa_prefill: q, k_cache, v_cache must be contiguous")
    compress_paged(k_cache, v_cache, ck_cache, cv_cache, block_table, prefix_lens, seq_lens,
                   params, cw=cw, num_programs=compress_programs)
    lens = seq_lens.to(torch.int32)
    cmp_lens = torch.where(lens >= params.block, (lens - params.block) // params.stride + 1, 0)
    sel, o_cmp, _ = score_topk(q, ck_cache, cv_cache, block_table, q_req, q_pos,
                               cmp_lens.to(torch.int32), params, scale, ps,
                               with_out=params.gated, sel=sel)
    out = torch.empty_like(q) if out is None else out
    if n == 0:
        return out, sel
    g = hq // hkv
    sel_win_attention_kernel[(n, hkv)](
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, q_req=q_req,
        q_pos=q_pos, sel=sel, o_cmp=o_cmp if params.gated else q,
        gates=gates if params.gated else q, out=out, scale=scale,
        stride_bt=block_table.stride(0), HQ=hq, HKV=hkv, G=g,
        BG=max(16, triton.next_power_of_2(g)), D=dim, BD=max(16, triton.next_power_of_2(dim)),
        LS=params.select, BLS=max(16, triton.next_power_of_2(params.select)), W=params.window,
        BW=64, PS=ps, TOPN=params.topn, GATED=params.gated,
        F32=q.dtype == torch.float32 or q.device.type == "cpu")
    return out, sel
