"""Chunked NSA prefill on the GPU. No host sync: every launch grid comes from tensor shapes.

Default path ("tiles"), per chunk:
  1. compression: the compressed tokens closed inside the chunk (`compress_paged`);
  2. refresh: compressed attention + Eq. 9 scores + GQA sum + top-n for tiles of `group_size`
     consecutive rows of one request (`score_topk_grouped`: each compressed key is read once
     per tile of C rows x G heads; row t sees only the compressed tokens closed at <= t, its
     own count num_cmp(t + 1), so the chunk's own closes need no provisional tokens);
  3. per pass of at most `pass_rows` rows (bounds the partial buffers):
     a. free selected blocks (not forced) one KV block per program with the rows that selected
        it (sparse.py, Flash Sparse Attention order): normalised partials (o, lse);
     b. tile kernel (tile.py): forced blocks + window + the partials + the combine.
"rows": the previous path (per-row `score_topk`, one program per (row, KV head) for the
selected + window attention), kept as a reference / fallback.

Legend: N chunk rows (any mix of requests, each request's rows contiguous), B requests,
Hq / Hkv heads, D head dim, PS page size, CPP = ceil(PS / d). The chunk's K/V must already be
in the paged cache (the backend writes KV before attention, as SGLang does).
"""
from __future__ import annotations

import torch
import triton

from ..common.launch import pow2
from ..common.params import NSAParams
from ..common.runs import run_starts
from ..compression.blocks import compress_paged
from ..refresh.args import RefreshArgs
from ..refresh.grouped import score_topk_grouped
from ..refresh.per_row import score_topk
from .row_attention import sel_win_attention_kernel
from .sparse import _maxb, free_slots, prefill_sparse, sparse_items
from .tile import prefill_tile

IMPLS = ("tiles", "rows")


def row_tiles(q_req: torch.Tensor, num_req: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiles of at most `size` consecutive rows of one request, on the device without a host
    sync: (order [N] = arange, g_start [NG], g_len [NG]) int32 with NG = ceil(N / size) + B
    (a bound: each request adds at most one partial tile; unused slots have g_len 0). Needs
    each request's rows contiguous in the chunk (checked on CPU tensors; on the GPU rows past
    the bound would be left unwritten rather than trip a device assert).

    Example: q_req [0, 0, 0, 1], size 2 -> tiles (0, 2), (2, 1), (3, 1), then 2 empty slots.
    """
    n = q_req.shape[0]
    dev = q_req.device
    i = torch.arange(n, device=dev, dtype=torch.int64)
    brk = torch.ones(n, dtype=torch.bool, device=dev)
    brk[1:] = q_req[1:] != q_req[:-1]
    run0 = run_starts(brk)
    is_start = (i - run0) % size == 0
    tid = torch.cumsum(is_start.to(torch.int32), 0).to(torch.int64) - 1
    ng = -(-n // size) + num_req
    tid = tid.clamp_max(ng)     # rows past the bound (a request split in the chunk) go nowhere
    g_start = torch.zeros(ng + 1, dtype=torch.int32, device=dev)
    g_start.scatter_(0, torch.where(is_start, tid, ng), i.to(torch.int32))
    g_len = torch.zeros(ng + 1, dtype=torch.int32, device=dev)
    g_len.scatter_add_(0, tid, torch.ones(n, dtype=torch.int32, device=dev))
    return i.to(torch.int32), g_start[:ng], g_len[:ng]


def _check_rows(q_req: torch.Tensor) -> None:
    # rows of one request must be contiguous (the tile bound); checked where it costs no sync
    if q_req.device.type == "cpu" and q_req.numel() > 1:
        runs = int((q_req[1:] != q_req[:-1]).sum()) + 1
        if runs != torch.unique(q_req).numel():
            raise ValueError("chunked_nsa_prefill: each request's rows must be contiguous")


def chunked_nsa_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        ck_cache: torch.Tensor, cv_cache: torch.Tensor,
                        block_table: torch.Tensor, q_req: torch.Tensor, q_pos: torch.Tensor,
                        prefix_lens: torch.Tensor, seq_lens: torch.Tensor, params: NSAParams,
                        scale: float, cw=None, gates: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, sel: torch.Tensor | None = None,
                        compress_programs: int | None = None, impl: str = "tiles",
                        group_size: int | None = None, tile_rows: int = 64, item_rows: int = 64,
                        pass_rows: int | None = None, part_dtype: torch.dtype | None = None,
                        refresh_splits: int | None = None, _stages: int = 15
                        ) -> tuple[torch.Tensor, torch.Tensor]:
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
            (prefix_lens[b] <= t < seq_lens[b]); each request's rows contiguous (any order
            of positions; consecutive positions make the tiles efficient).
        prefix_lens, seq_lens (torch.Tensor): shape [B] int, lengths before / after the chunk.
        params (NSAParams): geometry and combine (params.gated needs gates [N, Hq, 3], sigmoid
            already applied, order (cmp, slc, win)).
        scale (float): softmax scale. cw: learned compression (wk, bk, wv, bv) or None (MEAN).
        out (torch.Tensor | None): shape [N, Hq, D]; # mutable. sel: [N, Hkv, topn] int32.
        compress_programs (int | None): programs per (request, head) for the chunk's
            compression; None: from N (16..128).
        impl (str): "tiles" (default, see the module docstring) or "rows" (the old path).
        group_size (int | None): rows per refresh tile (C; C * pow2(G) MMA rows), 1..64; None:
            128 MMA rows (C = 32 at G = 4: the fastest refresh tile measured on the H200).
        tile_rows (int): MMA rows of the tile kernel (consecutive rows per tile = tile_rows // G).
        item_rows (int): MMA rows of the sparse kernel (entries per item = item_rows // G).
        pass_rows (int | None): rows per sparse + tile pass (partial buffers: pass_rows * Hkv *
            NF * G * D elements); None: about 512 MiB of partials.
        part_dtype (torch.dtype | None): partial o dtype; None: fp32 for fp32 q, else q.dtype.
        refresh_splits (int | None): splits of the refresh kernel (None: its default).
        _stages (int): profiling only: bit 1 compression, 2 refresh (without it the given
            `sel` is used and o_cmp is zero), 4 sparse (index + kernel), 8 tile kernel.
    Returns:
        (out [N, Hq, D] q.dtype, sel [N, Hkv, topn] int32 sorted, -1 padded).
    CUDA graphs: no host sync (grids from N, B and the block-table width).
    """
    n, hq, dim = q.shape
    _, ps, hkv, _ = k_cache.shape
    _check_chunk(q, k_cache, v_cache, gates, params, impl)
    cmp_lens = _compress_chunk(k_cache, v_cache, ck_cache, cv_cache, block_table, prefix_lens,
                               seq_lens, params, cw, compress_programs, n, _stages)
    out = torch.empty_like(q) if out is None else out
    if tuple(out.shape) != (n, hq, dim) or not out.is_contiguous():
        raise ValueError(f"chunked_nsa_prefill: out must be contiguous [N={n}, Hq={hq}, D={dim}]")
    if impl == "rows":
        return _rows_path(q, k_cache, v_cache, ck_cache, cv_cache, block_table, q_req, q_pos,
                          cmp_lens, gates, out, sel, params, scale)
    if sel is None:
        sel = torch.empty(n, hkv, params.topn, dtype=torch.int32, device=q.device)
    if n == 0:
        return out, sel
    _check_rows(q_req)
    g = hq // hkv
    nb = prefix_lens.shape[0]
    if group_size is None:
        group_size = max(1, min(64, 128 // triton.next_power_of_2(g)))
    groups = row_tiles(q_req, nb, group_size)
    o_cmp = None
    if _stages & 2:
        sel, o_cmp, _ = score_topk_grouped(
            RefreshArgs(q, ck_cache, cv_cache, block_table, q_req, q_pos, cmp_lens, params, scale,
                        ps, with_out=params.gated, sel=sel),
            group_size=group_size, groups=groups, num_splits=refresh_splits)
    elif params.gated:
        o_cmp = torch.zeros_like(q)
    _tile_passes(q, k_cache, v_cache, block_table, q_req, q_pos, sel, o_cmp, gates, out, params,
                 scale, nb, max(1, tile_rows // g), max(1, item_rows // g), pass_rows, part_dtype,
                 _stages)
    return out, sel


def _compress_chunk(k_cache, v_cache, ck_cache, cv_cache, block_table, prefix_lens, seq_lens,
                    params: NSAParams, cw, compress_programs: int | None, n: int,
                    _stages: int) -> torch.Tensor:
    # step 1 (the compressed tokens the chunk closes), then every request's committed
    # compressed-token count after the chunk: cmp_lens [B] int32
    if compress_programs is None:
        compress_programs = min(128, max(16, triton.next_power_of_2(max(1, n // (8 * params.stride)))))
    if _stages & 1:
        compress_paged(k_cache, v_cache, ck_cache, cv_cache, block_table, prefix_lens, seq_lens,
                       params, cw=cw, num_programs=compress_programs)
    lens = seq_lens.to(torch.int32)
    cmp_lens = torch.where(lens >= params.block, (lens - params.block) // params.stride + 1, 0)
    return cmp_lens.to(torch.int32)


def _check_chunk(q, k_cache, v_cache, gates, params: NSAParams, impl: str) -> None:
    n, hq, _ = q.shape
    if impl not in IMPLS:
        raise ValueError(f"chunked_nsa_prefill: impl must be one of {IMPLS}, got {impl!r}")
    if params.gated != (gates is not None):
        raise ValueError("chunked_nsa_prefill: gates must be given exactly when params.gated")
    if gates is not None and (tuple(gates.shape) != (n, hq, 3) or not gates.is_contiguous()):
        raise ValueError(f"chunked_nsa_prefill: gates must be contiguous [N={n}, Hq={hq}, 3]")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and q.is_contiguous()):
        raise ValueError("chunked_nsa_prefill: q, k_cache, v_cache must be contiguous")


def _tile_passes(q, k_cache, v_cache, block_table, q_req, q_pos, sel, o_cmp, gates, out,
                 params: NSAParams, scale: float, nb: int, ct: int, cq: int,
                 pass_rows: int | None, part_dtype: torch.dtype | None, _stages: int) -> None:
    # steps 3a / 3b of the module docstring, pass_rows rows at a time (ct rows per tile,
    # cq entries per sparse item) so the partial buffers stay bounded
    n, hq, dim = q.shape
    _, ps, hkv, _ = k_cache.shape
    g = hq // hkv
    slo, nf = free_slots(params)
    pdt = part_dtype or (torch.float32 if q.dtype == torch.float32 else q.dtype)
    per_row = max(1, hkv * nf * g * dim * torch.empty(0, dtype=pdt).element_size())
    if pass_rows is None:
        pass_rows = max(ct, (512 << 20) // per_row)
    pass_rows = max(ct, pass_rows // ct * ct)
    maxb = _maxb(block_table, ps, params)
    part_o = part_lse = None
    if nf > 0 and _stages & 4:
        rows = min(n, pass_rows)
        part_o = torch.empty(rows * hkv * nf * g * dim, dtype=pdt, device=q.device)
        part_lse = torch.empty(rows * hkv * nf * g, dtype=torch.float32, device=q.device)
    for r0 in range(0, n, pass_rows):
        r1 = min(n, r0 + pass_rows)
        qp, qr, qt = q[r0:r1], q_req[r0:r1], q_pos[r0:r1]
        if part_o is not None:
            index = sparse_items(sel[r0:r1], qr, qt, params, nb, maxb, cq)
            prefill_sparse(qp, k_cache, v_cache, block_table, qt, index, params, scale,
                           part_o, part_lse, cq)
        if _stages & 8:
            _, g_start, g_len = row_tiles(qr, nb, ct)
            prefill_tile(qp, k_cache, v_cache, block_table, qr, qt, (g_start, g_len),
                         sel[r0:r1], params, scale, out[r0:r1], ct, part_o=part_o,
                         part_lse=part_lse, o_cmp=None if o_cmp is None else o_cmp[r0:r1],
                         gates=None if gates is None else gates[r0:r1], slots=(slo, nf))


def _rows_path(q, k_cache, v_cache, ck_cache, cv_cache, block_table, q_req, q_pos, cmp_lens,
               gates, out, sel, params: NSAParams, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # impl "rows": per-row refresh (`score_topk`), then one program per (row, KV head)
    sel, o_cmp, _ = score_topk(RefreshArgs(q, ck_cache, cv_cache, block_table, q_req, q_pos,
                                           cmp_lens, params, scale, k_cache.shape[1],
                                           with_out=params.gated, sel=sel))
    if q.shape[0]:
        _rows_attention(q, k_cache, v_cache, block_table, q_req, q_pos, sel, o_cmp, gates,
                        out, params, scale)
    return out, sel


def _rows_attention(q, k_cache, v_cache, block_table, q_req, q_pos, sel, o_cmp, gates, out,
                    params: NSAParams, scale: float) -> None:
    n, hq, dim = q.shape
    hkv, ps = k_cache.shape[2], k_cache.shape[1]
    g = hq // hkv
    sel_win_attention_kernel[(n, hkv)](
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, q_req=q_req,
        q_pos=q_pos, sel=sel, o_cmp=o_cmp if params.gated else q,
        gates=gates if params.gated else q, out=out, scale=scale,
        stride_bt=block_table.stride(0), HQ=hq, HKV=hkv, G=g,
        BG=pow2(g, 16), D=dim, BD=pow2(dim, 16),
        LS=params.select, BLS=pow2(params.select, 16), W=params.window,
        BW=64, PS=ps, TOPN=params.topn, GATED=params.gated,
        F32=q.dtype == torch.float32 or q.device.type == "cpu")
