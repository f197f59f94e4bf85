"""Triton compression: phi over l cached keys/values, written where CONTRACTS.md section 4 says.

(Named blocks.py, not compress.py: a submodule `compress` would shadow the reference function
`specsa.kernels.compression.compress` on package import.)

Legend (FLA): i_ program ids, o_ offset vectors, m_ masks, p_ pointers, b_ on-chip blocks.
Constexprs: HKV KV heads, D head dim (BD its power-of-two tile), L compression block l
(BL its tile), DS stride d, PS page size, CPP compressed tokens per page. NPROG (programs that
stride over one request's new compressed tokens) is a runtime int, not a constexpr: it varies
with the prefill chunk, and every new value would compile the kernel inside a serving step.

Two entry points:
- `compress_paged`: the compressed tokens closed by newly committed tokens of each request
  (num_cmp(old_len) .. num_cmp(new_len)-1), read from the paged KV pool and written into the
  paged compressed cache. Run at commit / after a prefill chunk.
- `compress_gather`: compressed tokens whose l source rows are given explicitly, each either a
  slot of the paged pool or a row of a contiguous draft tail. This computes the provisional,
  path-dependent compressed tokens of tree nodes that close a block.
Both accumulate in fp32 and store in the output's dtype; every length lives on the device, so
the launches take no host sync and can be captured in CUDA graphs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.params import NSAParams


@triton.jit
def num_cmp_dev(length, L: tl.constexpr, DS: tl.constexpr):
    """params.num_cmp on the device: token i exists iff i*d + l <= length."""
    return tl.where(length >= L, (length - L) // DS + 1, 0)


@triton.jit
def cmp_slot_dev(i_c, PS: tl.constexpr, L: tl.constexpr, DS: tl.constexpr):
    """(logical page, slot inside the page) of compressed token i_c: it lives in the KV page
    holding its closing position e = i*d + l - 1, after the tokens closing earlier there."""
    i_lp = (i_c * DS + L - 1) // PS
    lo = tl.maximum(i_lp * PS - (L - 1), 0)
    return i_lp, i_c - (lo + DS - 1) // DS


@triton.jit
def load_cmp_tile(cache, p_bt, o_c, m_c, i_h, o_d, m_d,
                  HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, CPP: tl.constexpr,
                  L: tl.constexpr, DS: tl.constexpr):
    """Compressed tokens o_c [N] of one request (page-table row p_bt), KV head i_h, from the
    paged compressed cache -> [N, BD] (zeros where masked)."""
    i_lp, i_s = cmp_slot_dev(o_c, PS, L, DS)
    b_pg = tl.load(p_bt + i_lp, mask=m_c, other=0).to(tl.int64)
    o_row = ((b_pg * CPP + i_s) * HKV + i_h) * D
    return tl.load(cache + o_row[:, None] + o_d[None, :], mask=m_c[:, None] & m_d[None, :], other=0.)


@triton.jit
def _phi(b_x, b_w, p_bias, o_d, m_d, HAS_BIAS: tl.constexpr):
    # b_x [BL, BD] fp32, b_w [BL] fp32 (zero on padding rows) -> [BD]
    b_o = tl.sum(b_x * b_w[:, None], axis=0)
    if HAS_BIAS:
        b_o += tl.load(p_bias + o_d, mask=m_d, other=0.).to(tl.float32)
    return b_o


@triton.jit(do_not_specialize=["NPROG"])
def compress_paged_kernel(
    k_cache, v_cache, ck_cache, cv_cache, block_table, old_lens, new_lens,
    wk, bk, wv, bv, stride_bt,
    HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, L: tl.constexpr, BL: tl.constexpr,
    DS: tl.constexpr, PS: tl.constexpr, CPP: tl.constexpr, NPROG,
    LEARNED: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    i_b, i_p, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_lo = num_cmp_dev(tl.load(old_lens + i_b), L, DS)
    n_hi = num_cmp_dev(tl.load(new_lens + i_b), L, DS)
    o_l = tl.arange(0, BL)
    m_l = o_l < L
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if LEARNED:
        b_wk = tl.load(wk + i_h * L + o_l, mask=m_l, other=0.).to(tl.float32)   # [BL]
        b_wv = tl.load(wv + i_h * L + o_l, mask=m_l, other=0.).to(tl.float32)   # [BL]
    else:
        b_wk = tl.where(m_l, 1.0 / L, 0.)                                       # [BL]
        b_wv = b_wk
    p_bt = block_table + i_b.to(tl.int64) * stride_bt
    for i_c in range(n_lo + i_p, n_hi, NPROG):
        o_pos = i_c * DS + o_l                                                   # [BL]
        b_pg = tl.load(p_bt + o_pos // PS, mask=m_l, other=0).to(tl.int64)
        o_row = ((b_pg * PS + o_pos % PS) * HKV + i_h) * D                       # [BL]
        m_x = m_l[:, None] & m_d[None, :]
        b_k = tl.load(k_cache + o_row[:, None] + o_d[None, :], mask=m_x, other=0.).to(tl.float32)
        b_v = tl.load(v_cache + o_row[:, None] + o_d[None, :], mask=m_x, other=0.).to(tl.float32)
        b_ck = _phi(b_k, b_wk, bk + i_h * D, o_d, m_d, HAS_BIAS)                 # [BD]
        b_cv = _phi(b_v, b_wv, bv + i_h * D, o_d, m_d, HAS_BIAS)                 # [BD]
        i_lp, i_s = cmp_slot_dev(i_c, PS, L, DS)
        i_pg = tl.load(p_bt + i_lp).to(tl.int64)
        o_out = ((i_pg * CPP + i_s) * HKV + i_h) * D + o_d
        tl.store(ck_cache + o_out, b_ck.to(ck_cache.dtype.element_ty), mask=m_d)
        tl.store(cv_cache + o_out, b_cv.to(cv_cache.dtype.element_ty), mask=m_d)


@triton.jit
def compress_gather_kernel(
    k_cache, v_cache, k_tail, v_tail, idx, out_k, out_v, wk, bk, wv, bv,
    HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, L: tl.constexpr, BL: tl.constexpr,
    LEARNED: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    i_n, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_l = tl.arange(0, BL)
    m_l = o_l < L
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_i = tl.load(idx + i_n * L + o_l, mask=m_l, other=0).to(tl.int64)           # [BL]
    # >= 0: pool slot (page * page_size + offset); < 0: tail row -1 - idx
    m_pool = m_l & (b_i >= 0)
    m_tail = m_l & (b_i < 0)
    o_pool = (tl.where(m_pool, b_i, 0) * HKV + i_h) * D                          # [BL]
    o_tail = (tl.where(m_tail, -1 - b_i, 0) * HKV + i_h) * D                     # [BL]
    m_p = m_pool[:, None] & m_d[None, :]
    m_t = m_tail[:, None] & m_d[None, :]
    b_k = tl.load(k_cache + o_pool[:, None] + o_d[None, :], mask=m_p, other=0.).to(tl.float32) \
        + tl.load(k_tail + o_tail[:, None] + o_d[None, :], mask=m_t, other=0.).to(tl.float32)
    b_v = tl.load(v_cache + o_pool[:, None] + o_d[None, :], mask=m_p, other=0.).to(tl.float32) \
        + tl.load(v_tail + o_tail[:, None] + o_d[None, :], mask=m_t, other=0.).to(tl.float32)
    if LEARNED:
        b_wk = tl.load(wk + i_h * L + o_l, mask=m_l, other=0.).to(tl.float32)
        b_wv = tl.load(wv + i_h * L + o_l, mask=m_l, other=0.).to(tl.float32)
    else:
        b_wk = tl.where(m_l, 1.0 / L, 0.)
        b_wv = b_wk
    b_ck = _phi(b_k, b_wk, bk + i_h * D, o_d, m_d, HAS_BIAS)                     # [BD]
    b_cv = _phi(b_v, b_wv, bv + i_h * D, o_d, m_d, HAS_BIAS)                     # [BD]
    o_out = (i_n * HKV + i_h) * D + o_d
    tl.store(out_k + o_out, b_ck.to(out_k.dtype.element_ty), mask=m_d)
    tl.store(out_v + o_out, b_cv.to(out_v.dtype.element_ty), mask=m_d)


def _weights(cw, hkv: int, dim: int, l: int, device):
    """(wk, bk, wv, bv, LEARNED, HAS_BIAS) kernel arguments from cw = (wk, bk, wv, bv) or None."""
    if cw is None:
        dummy = torch.empty(1, device=device)
        return dummy, dummy, dummy, dummy, False, False
    if len(cw) != 4:
        raise ValueError("cw must be (wk, bk, wv, bv) (biases may be None) or None for MEAN")
    wk, bk, wv, bv = cw
    for name, w in (("wk", wk), ("wv", wv)):
        if tuple(w.shape) != (hkv, l) or not w.is_contiguous():
            raise ValueError(f"compression weight {name} must be contiguous [Hkv={hkv}, l={l}], "
                             f"got {tuple(w.shape)}")
    if (bk is None) != (bv is None):
        raise ValueError("compression biases: give both bk and bv or neither")
    if bk is not None:
        for name, b in (("bk", bk), ("bv", bv)):
            if tuple(b.shape) != (hkv, dim) or not b.is_contiguous():
                raise ValueError(f"compression bias {name} must be contiguous [Hkv={hkv}, D={dim}], "
                                 f"got {tuple(b.shape)}")
        return wk, bk, wv, bv, True, True
    return wk, wk, wv, wv, True, False


def _check_cache(name: str, x: torch.Tensor, dim4: bool = True) -> None:
    if (dim4 and x.dim() != 4) or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [num_pages, slots, Hkv, D] tensor, "
                         f"got {tuple(x.shape)} (contiguous={x.is_contiguous()})")


def compress_paged(k_cache: torch.Tensor, v_cache: torch.Tensor,
                   ck_cache: torch.Tensor, cv_cache: torch.Tensor,
                   block_table: torch.Tensor, old_lens: torch.Tensor, new_lens: torch.Tensor,
                   params: NSAParams, cw=None, num_programs: int = 4) -> None:
    """Write the compressed tokens closed by tokens old_lens[b]..new_lens[b]-1 of each request.

    Args:
        k_cache, v_cache (torch.Tensor): shape [num_pages, PS, Hkv, D], the paged raw KV pool
            (positions < new_lens[b] already written).
        ck_cache, cv_cache (torch.Tensor): shape [num_pages, CPP, Hkv, D], CPP =
            ceil(PS / d); # mutable: token i goes to page block_table[b, e // PS], slot
            i - first_cmp_in_page(e // PS), e = i*d + l - 1.
        block_table (torch.Tensor): shape [B, max_pages] int32/int64, logical -> physical page.
        old_lens, new_lens (torch.Tensor): shape [B] int, committed lengths before / after.
            Tokens num_cmp(old_len) .. num_cmp(new_len)-1 are written (none when equal).
        params (NSAParams): block l, stride d.
        cw (tuple | None): (wk [Hkv, l], bk [Hkv, D] | None, wv, bv | None) learned, or None
            (MEAN).
        num_programs (int): programs per (request, KV head) striding over the new tokens; more
            for long prefill chunks. A host constant, so CUDA-graph safe.

    Example: l=32, d=16, old_len=40, new_len=64 -> num_cmp 1 -> 3: tokens 1 (positions 16..47)
    and 2 (32..63) are written.
    """
    _check_cache("k_cache", k_cache)
    _check_cache("ck_cache", ck_cache)
    if v_cache.shape != k_cache.shape or cv_cache.shape != ck_cache.shape:
        raise ValueError("v_cache / cv_cache must match k_cache / ck_cache in shape")
    _check_cache("v_cache", v_cache)
    _check_cache("cv_cache", cv_cache)
    _, ps, hkv, dim = k_cache.shape
    cpp = params.cmp_per_page(ps)
    if ck_cache.shape[1] != cpp or ck_cache.shape[2:] != k_cache.shape[2:]:
        raise ValueError(f"ck_cache must be [num_pages, CPP={cpp}, Hkv={hkv}, D={dim}], got "
                         f"{tuple(ck_cache.shape)}")
    nb = block_table.shape[0]
    if old_lens.shape != (nb,) or new_lens.shape != (nb,) or block_table.stride(1) != 1:
        raise ValueError(f"old_lens/new_lens must be [B={nb}] and block_table row-contiguous")
    wk, bk, wv, bv, learned, has_bias = _weights(cw, hkv, dim, params.block, k_cache.device)
    if nb == 0:
        return
    grid = (nb, num_programs, hkv)
    compress_paged_kernel[grid](
        k_cache=k_cache, v_cache=v_cache, ck_cache=ck_cache, cv_cache=cv_cache,
        block_table=block_table, old_lens=old_lens, new_lens=new_lens,
        wk=wk, bk=bk, wv=wv, bv=bv, stride_bt=block_table.stride(0),
        HKV=hkv, D=dim, BD=triton.next_power_of_2(dim), L=params.block,
        BL=triton.next_power_of_2(params.block), DS=params.stride, PS=ps, CPP=cpp,
        NPROG=num_programs, LEARNED=learned, HAS_BIAS=has_bias)


def compress_gather(k_cache: torch.Tensor, v_cache: torch.Tensor,
                    k_tail: torch.Tensor, v_tail: torch.Tensor, idx: torch.Tensor,
                    params: NSAParams, cw=None,
                    out_k: torch.Tensor | None = None,
                    out_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed tokens over explicit source rows (provisional tokens of tree nodes).

    Args:
        k_cache, v_cache (torch.Tensor): shape [num_pages, PS, Hkv, D], the paged pool.
        k_tail, v_tail (torch.Tensor): shape [Nt, Hkv, D], contiguous draft keys/values.
        idx (torch.Tensor): shape [Nc, l] int32 (int64 is converted), oldest source first. idx >= 0: pool
            slot page * PS + offset; idx < 0: tail row -1 - idx. (A block closing at tree node
            v mixes committed slots and v's ancestors in the tail.)
        params (NSAParams): block l.
        cw (tuple | None): learned weights (see `compress_paged`) or None (MEAN).
        out_k, out_v (torch.Tensor | None): shape [Nc, Hkv, D]; # mutable; default: new tensors
            of k_tail's dtype.
    Returns:
        (out_k, out_v): shape [Nc, Hkv, D].

    Example: PS=16, l=4, block closing at tree node 1 (parent 0) after P=34 committed tokens:
    idx row = [page(32)*16 + 0, page(33)*16 + 1, -1, -2] (positions 32, 33, node 0, node 1).
    """
    _check_cache("k_cache", k_cache)
    if v_cache.shape != k_cache.shape or not v_cache.is_contiguous():
        raise ValueError("v_cache must match k_cache and be contiguous")
    _, _, hkv, dim = k_cache.shape
    if (k_tail.dim() != 3 or k_tail.shape[1:] != (hkv, dim) or v_tail.shape != k_tail.shape
            or not (k_tail.is_contiguous() and v_tail.is_contiguous())):
        raise ValueError(f"k_tail/v_tail must be contiguous [Nt, Hkv={hkv}, D={dim}], got "
                         f"{tuple(k_tail.shape)}, {tuple(v_tail.shape)}")
    nc = idx.shape[0]
    if idx.dim() != 2 or idx.shape[1] != params.block or not idx.is_contiguous():
        raise ValueError(f"idx must be contiguous [Nc, l={params.block}], got {tuple(idx.shape)}")
    if idx.dtype == torch.int64:
        # Triton 3.6 fails to compile this kernel for sm_90 with an int64 index tensor and
        # 16-byte-aligned pointers (TritonGPURemoveLayoutConversions); slots fit in int32.
        if k_cache.shape[0] * k_cache.shape[1] >= 2 ** 31:
            raise ValueError("compress_gather: pool has >= 2**31 slots; int32 indices overflow")
        idx = idx.to(torch.int32)
    elif idx.dtype != torch.int32:
        raise ValueError(f"idx must be int32 or int64, got {idx.dtype}")
    out_k = torch.empty(nc, hkv, dim, dtype=k_tail.dtype, device=k_tail.device) if out_k is None else out_k
    out_v = torch.empty(nc, hkv, dim, dtype=v_tail.dtype, device=v_tail.device) if out_v is None else out_v
    for name, o in (("out_k", out_k), ("out_v", out_v)):
        if tuple(o.shape) != (nc, hkv, dim) or not o.is_contiguous():
            raise ValueError(f"{name} must be contiguous [Nc={nc}, {hkv}, {dim}], got {tuple(o.shape)}")
    wk, bk, wv, bv, learned, has_bias = _weights(cw, hkv, dim, params.block, k_tail.device)
    if nc == 0:
        return out_k, out_v
    compress_gather_kernel[(nc, hkv)](
        k_cache=k_cache, v_cache=v_cache, k_tail=k_tail, v_tail=v_tail, idx=idx,
        out_k=out_k, out_v=out_v, wk=wk, bk=bk, wv=wv, bv=bv,
        HKV=hkv, D=dim, BD=triton.next_power_of_2(dim), L=params.block,
        BL=triton.next_power_of_2(params.block), LEARNED=learned, HAS_BIAS=has_bias)
    return out_k, out_v
