"""Refresh kernel: compressed attention + Eq. 9 block scores + GQA group sum + forced blocks +
top-n, one launch, scores never written to HBM.

Legend (FLA): i_ program ids / scalars, o_ offset vectors, m_ masks, p_ pointers, b_ on-chip
blocks. Constexprs: HQ / HKV heads, G = HQ // HKV, BG its tile (>= 16 for tl.dot; padded heads
are masked), D head dim (BD tile), L block l, DS stride d, LS selection block l', R = l'/d
compressed tokens starting per selection block, PS page size, CPP compressed tokens per page,
TOPN n (BN tile), INIT / LOCAL forced blocks, BS selection blocks per tile, BC = pow2(BS*R)
compressed tokens per tile, MP provisional-list capacity per query (BP tile).

One program = one query row x one KV head (its G query heads share the selection):
  pass 1: online softmax over the committed compressed tokens (paged compressed cache, first
          min(cmp_lens[req], num_cmp(t+1))) and the provisional ones visible to the row ->
          max, sum, o_cmp (optional).
  pass 2: walk the candidate selection blocks BS at a time; for each tile recompute
          p = exp(s - lse) for the committed tokens that *start* in the tile's blocks, sum over
          the G heads, map by overlap weights (Eq. 9; a token starting in the last block of a
          tile spills into the next tile's first block: carried in a register), add the
          provisional tokens' share, force init/local blocks to +inf, and merge the tile into
          a running top-n held in registers by rank counting (ties -> lower block index).
Overlap numerators are multiples of d (d | l, d | l'), so weights are exact small integers and
the fp32 scores match the reference up to summation order; the selection equals it exactly
except for scores within fp32 rounding of each other (never in practice on random data, and
exact ties such as zero scores follow the documented lower-index rule).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.launch import pow2
from ..common.tl_math import NEG_BIG, load_q_heads
from ..common.tl_math import dot_f32 as _dot
from ..common.tl_math import overlap as _overlap
from ..compression.blocks import load_cmp_tile as _load_cmp_tile
from ..compression.blocks import num_cmp_dev
from .args import RefreshArgs, check_refresh_args, prov_pointers, refresh_outputs


@triton.jit
def _gt(v_a, i_a, v_b, i_b):
    # (v_a, i_a) ranks above (v_b, i_b): higher score, ties -> lower block index
    return (v_a > v_b) | ((v_a == v_b) & (i_a < i_b))


@triton.jit
def _cmp_stats(b_q, ck_cache, cv_cache, p_bt, n_c, i_h, o_d, m_d, scale, HKV: tl.constexpr,
               D: tl.constexpr, PS: tl.constexpr, CPP: tl.constexpr, L: tl.constexpr,
               DS: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
               WITH_OUT: tl.constexpr, F32: tl.constexpr):
    # pass 1 over the committed compressed tokens [0, n_c): online (max, sum exp) and, for
    # o_cmp, the unnormalised accumulator (natural-log units: the reference's)
    b_m = tl.full([BG], NEG_BIG, tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, BD], tl.float32)
    o_bc = tl.arange(0, BC)
    for i0 in range(0, n_c, BC):
        o_c = i0 + o_bc
        m_c = o_c < n_c
        b_k = _load_cmp_tile(ck_cache, p_bt, o_c, m_c, i_h, o_d, m_d, HKV, D, PS, CPP, L, DS)
        b_s = _dot(b_q, tl.trans(b_k), F32) * scale                               # [BG, BC]
        b_s = tl.where(m_c[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp(b_s - b_mn[:, None])                                          # [BG, BC]
        b_a = tl.exp(b_m - b_mn)
        b_l = b_l * b_a + tl.sum(b_p, 1)
        if WITH_OUT:
            b_v = _load_cmp_tile(cv_cache, p_bt, o_c, m_c, i_h, o_d, m_d, HKV, D, PS, CPP, L, DS)
            b_pv = _dot(b_p.to(b_v.dtype), b_v, F32)
            b_acc = b_acc * b_a[:, None] + b_pv                                    # [BG, BD]
        b_m = b_mn
    return b_m, b_l, b_acc


@triton.jit
def _prov_stats(b_q, prov_k, prov_v, prov_cidx, prov_vis, i_q, i_h, o_d, m_d, scale, b_m, b_l,
                b_acc, HKV: tl.constexpr, D: tl.constexpr, DS: tl.constexpr, MP: tl.constexpr,
                BP: tl.constexpr, WITH_OUT: tl.constexpr, F32: tl.constexpr):
    # the provisional tokens visible to row i_q join pass 1's softmax; their masked logits
    # [BG, BP], mask and start positions come back for pass 2's scores
    o_p = tl.arange(0, BP)
    b_r = tl.load(prov_vis + i_q * MP + o_p, mask=o_p < MP, other=-1).to(tl.int64)  # [BP]
    m_p = b_r >= 0
    o_pr = (tl.where(m_p, b_r, 0) * HKV + i_h) * D                                 # [BP]
    b_pk = tl.load(prov_k + o_pr[:, None] + o_d[None, :], mask=m_p[:, None] & m_d[None, :], other=0.)
    b_pst = tl.load(prov_cidx + tl.where(m_p, b_r, 0), mask=m_p, other=0) * DS      # [BP] start
    b_sp = _dot(b_q, tl.trans(b_pk), F32) * scale                                 # [BG, BP]
    b_sp = tl.where(m_p[None, :], b_sp, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_sp, 1))
    b_p = tl.exp(b_sp - b_mn[:, None])
    b_a = tl.exp(b_m - b_mn)
    b_l = b_l * b_a + tl.sum(b_p, 1)
    if WITH_OUT:
        b_pv_ = tl.load(prov_v + o_pr[:, None] + o_d[None, :], mask=m_p[:, None] & m_d[None, :], other=0.)
        b_pv = _dot(b_p.to(b_pv_.dtype), b_pv_, F32)
        b_acc = b_acc * b_a[:, None] + b_pv
    return b_mn, b_l, b_acc, b_sp, m_p, b_pst


@triton.jit
def _block_scores(b_q, ck_cache, p_bt, j0, n_c, b_lse, b_carry, m_g, i_h, o_d, m_d, scale,
                  HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, CPP: tl.constexpr,
                  L: tl.constexpr, DS: tl.constexpr, LS: tl.constexpr, R: tl.constexpr,
                  BS: tl.constexpr, BC: tl.constexpr, F32: tl.constexpr):
    # Eq. 9 scores [BS] of selection blocks j0 .. j0+BS-1 from the committed tokens starting in
    # them, plus the spill carried from the previous tile; returns this tile's spill into the
    # next tile's first block (a token starting in the last block reaches past the tile)
    o_bs = tl.arange(0, BS)
    o_bc = tl.arange(0, BC)
    o_j = j0 + o_bs                                                                # [BS]
    o_c = j0 * R + o_bc                                                            # [BC]
    m_c = (o_bc < BS * R) & (o_c < n_c)
    b_k = _load_cmp_tile(ck_cache, p_bt, o_c, m_c, i_h, o_d, m_d, HKV, D, PS, CPP, L, DS)
    b_s = _dot(b_q, tl.trans(b_k), F32) * scale                                   # [BG, BC]
    b_p2 = tl.where(m_g[:, None] & m_c[None, :], tl.exp(b_s - b_lse[:, None]), 0.)
    b_ps = tl.sum(b_p2, 0)                                                        # [BC]
    o_st = o_c * DS                                                                # [BC]
    b_sc = tl.sum(b_ps[:, None] * _overlap(o_st[:, None], o_j[None, :], L, LS, DS), 0)  # [BS]
    b_sc += tl.where(o_bs == 0, b_carry, 0.)
    return b_sc, tl.sum(b_ps * _overlap(o_st, j0 + BS, L, LS, DS), 0)


@triton.jit
def _rank_merge(b_tv, b_ti, b_sc, b_si, o_n):
    # running top-n (b_tv, b_ti) [BN] merged with a tile (b_sc, b_si) [BS]: every element's rank
    # in the union is its new slot, so no sort is needed (ties -> lower block index)
    r_a = tl.sum(_gt(b_tv[None, :], b_ti[None, :], b_tv[:, None], b_ti[:, None]).to(tl.int32), 1) \
        + tl.sum(_gt(b_sc[None, :], b_si[None, :], b_tv[:, None], b_ti[:, None]).to(tl.int32), 1)  # [BN]
    r_b = tl.sum(_gt(b_tv[None, :], b_ti[None, :], b_sc[:, None], b_si[:, None]).to(tl.int32), 1) \
        + tl.sum(_gt(b_sc[None, :], b_si[None, :], b_sc[:, None], b_si[:, None]).to(tl.int32), 1)  # [BS]
    s_a = r_a[:, None] == o_n[None, :]                                             # [BN, BN]
    s_b = r_b[:, None] == o_n[None, :]                                             # [BS, BN]
    b_tv_new = tl.maximum(tl.max(tl.where(s_a, b_tv[:, None], -1.0), 0),
                          tl.max(tl.where(s_b, b_sc[:, None], -1.0), 0))
    b_ti = tl.maximum(tl.max(tl.where(s_a, b_ti[:, None], -1), 0),
                      tl.max(tl.where(s_b, b_si[:, None], -1), 0))
    return b_tv_new, b_ti


@triton.jit
def score_topk_kernel(
    q, ck_cache, cv_cache, block_table, q_req, q_pos, cmp_lens,
    prov_k, prov_v, prov_cidx, prov_vis, sel, o_cmp, lse, scale, stride_bt,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, L: tl.constexpr, DS: tl.constexpr, LS: tl.constexpr,
    R: tl.constexpr, PS: tl.constexpr, CPP: tl.constexpr, TOPN: tl.constexpr, BN: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
    MP: tl.constexpr, BP: tl.constexpr, HAS_PROV: tl.constexpr, WITH_OUT: tl.constexpr,
    F32: tl.constexpr,
):
    i_q, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_req = tl.load(q_req + i_q).to(tl.int64)
    i_t = tl.load(q_pos + i_q)
    n_c = tl.minimum(tl.load(cmp_lens + i_req), num_cmp_dev(i_t + 1, L, DS))
    p_bt = block_table + i_req * stride_bt
    b_q, o_hq, m_g, o_d, m_d = load_q_heads(q, i_q, i_h, HQ, G, BG, D, BD)

    # ---- pass 1: softmax statistics (and o_cmp) over committed + provisional tokens ----
    b_m, b_l, b_acc = _cmp_stats(b_q, ck_cache, cv_cache, p_bt, n_c, i_h, o_d, m_d, scale,
                                 HKV, D, PS, CPP, L, DS, BG, BD, BC, WITH_OUT, F32)
    if HAS_PROV:
        b_m, b_l, b_acc, b_sp, m_p, b_pst = _prov_stats(
            b_q, prov_k, prov_v, prov_cidx, prov_vis, i_q, i_h, o_d, m_d, scale, b_m, b_l, b_acc,
            HKV, D, DS, MP, BP, WITH_OUT, F32)
    m_any = b_l > 0                                                                # [BG]
    b_lse = tl.where(m_any, b_m + tl.log(tl.where(m_any, b_l, 1.)), 0.)           # [BG]
    if WITH_OUT:
        b_o = tl.where(m_any[:, None], b_acc / tl.where(m_any, b_l, 1.)[:, None], 0.)
        tl.store(o_cmp + o_hq[:, None] * D + o_d[None, :], b_o.to(o_cmp.dtype.element_ty),
                 mask=m_g[:, None] & m_d[None, :])
        tl.store(lse + o_hq, tl.where(m_any, b_lse, float("-inf")), mask=m_g)

    # ---- pass 2: block scores tile by tile, running top-n in registers ----
    if HAS_PROV:
        b_pp = tl.where(m_g[:, None] & m_p[None, :], tl.exp(b_sp - b_lse[:, None]), 0.)
        b_pps = tl.sum(b_pp, 0)                                                    # [BP]
    i_cur = i_t // LS
    o_bs = tl.arange(0, BS)
    o_n = tl.arange(0, BN)
    b_tv = tl.full([BN], -1.0, tl.float32)     # running top-n scores (rank order)
    b_ti = tl.full([BN], -1, tl.int32)         # and block indices, -1 = empty
    b_carry = tl.sum(tl.zeros([BS], tl.float32), 0)
    for j0 in range(0, i_cur + 1, BS):
        o_j = j0 + o_bs                                                            # [BS]
        b_sc, b_carry = _block_scores(b_q, ck_cache, p_bt, j0, n_c, b_lse, b_carry, m_g, i_h, o_d,
                                      m_d, scale, HKV, D, PS, CPP, L, DS, LS, R, BS, BC, F32)
        if HAS_PROV:
            b_sc += tl.sum(b_pps[:, None] * _overlap(b_pst[:, None], o_j[None, :], L, LS, DS), 0)
        m_cand = o_j <= i_cur
        m_forced = m_cand & ((o_j < INIT) | (o_j > i_cur - LOCAL))
        b_sc = tl.where(m_cand, tl.where(m_forced, float("inf"), b_sc), -1.0)      # [BS]
        b_tv, b_ti = _rank_merge(b_tv, b_ti, b_sc, tl.where(m_cand, o_j, -1), o_n)
    # the first TOPN slots hold the winners; report them sorted ascending, -1 padded
    m_v = (b_ti >= 0) & (o_n < TOPN)
    r_i = tl.sum((m_v[None, :] & (b_ti[None, :] < b_ti[:, None])).to(tl.int32), 1)  # [BN]
    b_out = tl.max(tl.where(m_v[:, None] & (r_i[:, None] == o_n[None, :]), b_ti[:, None], -1), 0)
    tl.store(sel + (i_q * HKV + i_h) * TOPN + o_n, b_out.to(sel.dtype.element_ty), mask=o_n < TOPN)


def score_topk(a: RefreshArgs, block_sel: int = 16
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Selected blocks (and the compressed-branch output) of every query row, one launch.

    Args:
        a (RefreshArgs): the rows, the compressed cache, provisional tokens and output buffers
            (sel, o_cmp, lse; # mutable).
        block_sel (int): selection blocks per tile (power of two); both passes read
            pow2(block_sel * l'/d) compressed tokens per step.
    Returns:
        (sel [Nq, Hkv, topn] int32 sorted ascending, -1 padded,
         o_cmp [Nq, Hq, D] q.dtype or None (zeros where no compressed token exists),
         lse [Nq, Hq] fp32 natural-log or None (-inf where none exists)).
    CUDA graphs: no host sync; shapes come from tensor sizes only.

    Example: t=40, l'=8, n=4, init=1, local=2 -> candidates 0..5, forced {0, 4, 5}; the best of
    blocks 1..3 fills the last slot (tie -> lower index), e.g. sel row [0, 1, 4, 5].
    """
    q, params = a.q, a.params
    nq, hq, dim = q.shape
    _, cpp, hkv, _ = a.ck_cache.shape
    has_prov = check_refresh_args("score_topk", a)
    with_out = a.wants_out
    g = hq // hkv
    sel, o_cmp, lse = refresh_outputs(a)
    if nq == 0:
        return sel, o_cmp, lse
    dummy = q.new_empty(1)
    r = params.select // params.stride
    score_topk_kernel[(nq, hkv)](
        q=q, ck_cache=a.ck_cache, cv_cache=a.cv_cache, block_table=a.block_table, q_req=a.q_req,
        q_pos=a.q_pos, cmp_lens=a.cmp_lens, **prov_pointers(a, has_prov, dummy),
        sel=sel, o_cmp=o_cmp if with_out else dummy, lse=lse if with_out else dummy,
        scale=a.scale, stride_bt=a.block_table.stride(0),
        HQ=hq, HKV=hkv, G=g, BG=pow2(g, 16), D=dim,
        BD=pow2(dim, 16), L=params.block, DS=params.stride,
        LS=params.select, R=r, PS=a.page_size, CPP=cpp, TOPN=params.topn,
        BN=pow2(params.topn, 16), INIT=params.init_blocks,
        LOCAL=params.local_blocks, BS=block_sel,
        BC=pow2(block_sel * r, 16),
        MP=a.prov.vis.shape[1] if has_prov else 1,
        BP=pow2(a.prov.vis.shape[1], 16) if has_prov else 16,
        HAS_PROV=has_prov, WITH_OUT=with_out, F32=q.dtype == torch.float32 or q.device.type == "cpu")
    return sel, o_cmp, lse
