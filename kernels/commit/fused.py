"""Fused commit: accepted-path KV compaction + its provisional compressed tokens, one launch.

Legend (FLA): i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ on-chip blocks.
Constexprs: HKV KV heads, D head dim (BD tile), A accepted-path capacity (columns of
path_rows), PS page size, CPP compressed tokens per page, L block l, DS stride d.

Grid (B, A + C, Hkv): program column n < A copies accepted node n of request b to position
seq_lens[b] + n; column n >= A stores provisional compressed token path_cmp[b, n - A]. Padded
entries (-1) exit at once, so the grid is fixed by buffer capacities (CUDA-graph safe, no
host sync). Pure copies: the committed compressed tokens are bit-identical to what the
verify step attended to (the "reuse" of docs/DESIGN.md section 3).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.params import NSAParams
from ..compression.blocks import cmp_slot_dev


@triton.jit
def fused_commit_kernel(
    k_cache, v_cache, ck_cache, cv_cache, block_table, seq_lens, k_tail, v_tail, path_rows,
    prov_k, prov_v, prov_cidx, path_cmp, stride_bt, C,
    HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, A: tl.constexpr,
    PS: tl.constexpr, CPP: tl.constexpr, L: tl.constexpr, DS: tl.constexpr,
):
    i_b, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_bt = block_table + i_b.to(tl.int64) * stride_bt
    if i_n < A:
        i_r = tl.load(path_rows + i_b * A + i_n).to(tl.int64)
        if i_r >= 0:
            i_pos = tl.load(seq_lens + i_b) + i_n
            i_pg = tl.load(p_bt + i_pos // PS).to(tl.int64)
            o_src = (i_r * HKV + i_h) * D + o_d                                   # [BD]
            o_dst = ((i_pg * PS + i_pos % PS) * HKV + i_h) * D + o_d              # [BD]
            b_k = tl.load(k_tail + o_src, mask=m_d)
            b_v = tl.load(v_tail + o_src, mask=m_d)
            tl.store(k_cache + o_dst, b_k.to(k_cache.dtype.element_ty), mask=m_d)
            tl.store(v_cache + o_dst, b_v.to(v_cache.dtype.element_ty), mask=m_d)
    else:
        i_r = tl.load(path_cmp + i_b * C + (i_n - A)).to(tl.int64)
        if i_r >= 0:
            i_c = tl.load(prov_cidx + i_r)
            i_lp, i_s = cmp_slot_dev(i_c, PS, L, DS)
            i_pg = tl.load(p_bt + i_lp).to(tl.int64)
            o_src = (i_r * HKV + i_h) * D + o_d                                   # [BD]
            o_dst = ((i_pg * CPP + i_s) * HKV + i_h) * D + o_d                    # [BD]
            b_k = tl.load(prov_k + o_src, mask=m_d)
            b_v = tl.load(prov_v + o_src, mask=m_d)
            tl.store(ck_cache + o_dst, b_k.to(ck_cache.dtype.element_ty), mask=m_d)
            tl.store(cv_cache + o_dst, b_v.to(cv_cache.dtype.element_ty), mask=m_d)


def fused_commit(k_cache: torch.Tensor, v_cache: torch.Tensor, ck_cache: torch.Tensor,
                 cv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 k_tail: torch.Tensor, v_tail: torch.Tensor, path_rows: torch.Tensor,
                 prov_k: torch.Tensor, prov_v: torch.Tensor, prov_cidx: torch.Tensor,
                 path_cmp: torch.Tensor, params: NSAParams) -> None:
    """Commit accepted paths: KV to pages + provisional compressed tokens to the compressed cache.

    Args:
        k_cache, v_cache (torch.Tensor): shape [num_pages, PS, Hkv, D]; # mutable. Pages for
            positions up to seq_lens[b] + a_b - 1 must already be in block_table.
        ck_cache, cv_cache (torch.Tensor): shape [num_pages, CPP, Hkv, D]; # mutable.
        block_table (torch.Tensor): shape [B, max_pages] int32/int64.
        seq_lens (torch.Tensor): shape [B] int, committed length P_b before this commit.
        k_tail, v_tail (torch.Tensor): shape [Nt, Hkv, D], the verify step's draft K/V.
        path_rows (torch.Tensor): shape [B, A] int, tail rows of the accepted path, root first,
            padded with -1 after the last accepted node (position P_b + j for column j).
        prov_k, prov_v (torch.Tensor): shape [Np, Hkv, D], the verify step's provisional
            compressed tokens (`compress_gather` output). Np may be 0 with C = 0.
        prov_cidx (torch.Tensor): shape [Np] int, compressed index i of each provisional row.
        path_cmp (torch.Tensor): shape [B, C] int, provisional rows closed on the accepted path
            (-1 padded anywhere).
        params (NSAParams): block, stride (compressed-cache placement).

    Example: P=30, l=32, d=16, accepted nodes at tail rows [4, 9, 11] -> positions 30, 31, 32;
    the node at 31 closed compressed token 0, computed in verification as prov row 2 ->
    path_cmp row [2, -1]: ck_cache[block_table[b, 31 // PS], slot of token 0] = prov_k[2].
    """
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("ck_cache", ck_cache),
                    ("cv_cache", cv_cache), ("k_tail", k_tail), ("v_tail", v_tail),
                    ("prov_k", prov_k), ("prov_v", prov_v), ("path_rows", path_rows),
                    ("path_cmp", path_cmp), ("prov_cidx", prov_cidx), ("seq_lens", seq_lens)):
        if not x.is_contiguous():
            raise ValueError(f"fused_commit: {name} must be contiguous")
    _, ps, hkv, dim = k_cache.shape
    cpp = params.cmp_per_page(ps)
    nb = block_table.shape[0]
    if v_cache.shape != k_cache.shape or ck_cache.shape[1:] != (cpp, hkv, dim) or cv_cache.shape != ck_cache.shape:
        raise ValueError(f"fused_commit: caches must be [pages, {ps}, {hkv}, {dim}] and "
                         f"[pages, CPP={cpp}, {hkv}, {dim}], got {tuple(k_cache.shape)}, {tuple(ck_cache.shape)}")
    if k_tail.shape[1:] != (hkv, dim) or v_tail.shape != k_tail.shape:
        raise ValueError(f"fused_commit: k_tail/v_tail must be [Nt, {hkv}, {dim}], got {tuple(k_tail.shape)}")
    if prov_k.shape[1:] != (hkv, dim) or prov_v.shape != prov_k.shape or prov_cidx.shape != prov_k.shape[:1]:
        raise ValueError(f"fused_commit: prov_k/prov_v [Np, {hkv}, {dim}] and prov_cidx [Np] expected, got "
                         f"{tuple(prov_k.shape)}, {tuple(prov_cidx.shape)}")
    if path_rows.dim() != 2 or path_rows.shape[0] != nb or path_cmp.dim() != 2 or path_cmp.shape[0] != nb:
        raise ValueError(f"fused_commit: path_rows [B={nb}, A] and path_cmp [B, C] expected, got "
                         f"{tuple(path_rows.shape)}, {tuple(path_cmp.shape)}")
    if seq_lens.shape != (nb,) or block_table.stride(1) != 1:
        raise ValueError(f"fused_commit: seq_lens must be [B={nb}], block_table row-contiguous")
    a, c = path_rows.shape[1], path_cmp.shape[1]
    if nb == 0 or a + c == 0:
        return
    fused_commit_kernel[(nb, a + c, hkv)](
        k_cache=k_cache, v_cache=v_cache, ck_cache=ck_cache, cv_cache=cv_cache,
        block_table=block_table, seq_lens=seq_lens, k_tail=k_tail, v_tail=v_tail,
        path_rows=path_rows, prov_k=prov_k, prov_v=prov_v, prov_cidx=prov_cidx,
        path_cmp=path_cmp, stride_bt=block_table.stride(0), C=max(c, 1),
        HKV=hkv, D=dim, BD=triton.next_power_of_2(dim), A=a, PS=ps, CPP=cpp,
        L=params.block, DS=params.stride)
