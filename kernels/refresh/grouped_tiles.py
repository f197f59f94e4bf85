"""Tile helpers of the grouped refresh kernel (score_topk_grouped.py): group rows, compressed-key
tiles, softmax statistics, Eq. 9 block scores of one tile of selection blocks and the running
top-n merge. Names and constexprs as in score_topk_grouped.py.

Per pass-2 tile (BS selection blocks, TB = BS*RP token slots, RR = CP*GP rows):
  p = exp2(s - lse) [RR, TB] (the only MUFU work); Eq. 9 block scores: head sum of p, then the
  [CP, BS, RP] view weighted by the own / spill weights, spill shifted by a gather.
  Merge into the running top-BS list of packed keys per query (sorted descending):
  MERGE_BITONIC (GPU): sort the tile's BS keys ascending, elementwise max with the running list
      (a bitonic sequence holding the top BS of both), one bitonic merge: about half the
      compare-exchanges of sorting the 2*BS union.
  MERGE_RANK (CPU interpreter): rank counting, same result; fast in the interpreter, but it
      spills registers on the GPU at 64 rows.
Retired variants (an Eq. 9 map on tensor cores, a sort of the 2*BS union) and the stage-drop
profiling switches: docs/PERF.md "Retired variants".
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common.tl_math import dot_f32 as _dot
from ..common.tl_math import overlap as _overlap
from ..compression.blocks import load_cmp_tile as _load_cmp
from ..compression.blocks import num_cmp_dev

MERGE_RANK = tl.constexpr(0)
MERGE_BITONIC = tl.constexpr(2)


@triton.jit
def _group(i_g, order, g_start_p, g_len_p, q_req, q_pos, cmp_lens,
           G: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr, L: tl.constexpr,
           DS: tl.constexpr, LS: tl.constexpr):
    """Rows r = c*GP + gg of group i_g: (g_len, row mask, row query, row head-in-group, row
    committed-token count, query-tile ids / mask / current block, request)."""
    g_start = tl.load(g_start_p + i_g)
    g_len = tl.load(g_len_p + i_g)
    o_r = tl.arange(0, CP * GP)
    c_r = o_r // GP
    gg = o_r % GP
    m_r = (c_r < g_len) & (gg < G)
    i_qr = tl.load(order + g_start + c_r, mask=c_r < g_len, other=0).to(tl.int64)   # [RR]
    i_req = tl.load(q_req + tl.load(order + g_start, mask=g_len > 0, other=0)).to(tl.int64)
    n_cr = tl.minimum(tl.load(cmp_lens + i_req), num_cmp_dev(tl.load(q_pos + i_qr) + 1, L, DS))
    n_cr = tl.where(m_r, n_cr, 0)                                                     # [RR]
    o_cq = tl.arange(0, CP)
    m_q = o_cq < g_len
    i_qq = tl.load(order + g_start + o_cq, mask=m_q, other=0).to(tl.int64)           # [CP]
    cur_q = tl.load(q_pos + i_qq, mask=m_q, other=0) // LS                            # [CP]
    return g_len, m_r, i_qr, gg, n_cr, i_qq, m_q, cur_q, i_req


@triton.jit
def _prov_tile(b_q, prov_k, prov_cidx, prov_vis, order, g_start_p, i_g, g_len, m_r, i_h,
               o_d, m_d, qk_scale, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
               CP: tl.constexpr, MP: tl.constexpr, MPP: tl.constexpr, DS: tl.constexpr,
               F32: tl.constexpr):
    """Provisional tokens of the group: slot f = c*MPP + k is row c's k-th visible token.
    Returns (logits [RR, NPS] log2 units, mask [RR, NPS] (row c sees only its own slots),
    prov row per slot [NPS] (clamped to 0 where empty), slot start position [NPS])."""
    o_f = tl.arange(0, CP * MPP)
    c_f = o_f // MPP
    k_f = o_f % MPP
    g_start = tl.load(g_start_p + i_g)
    m_f = (c_f < g_len) & (k_f < MP)
    i_qf = tl.load(order + g_start + c_f, mask=m_f, other=0).to(tl.int64)
    b_row = tl.load(prov_vis + i_qf * MP + k_f, mask=m_f, other=-1).to(tl.int64)
    m_f = b_row >= 0
    b_row = tl.where(m_f, b_row, 0)
    b_k = tl.load(prov_k + (b_row * HKV + i_h)[:, None] * D + o_d[None, :],
                  mask=m_f[:, None] & m_d[None, :], other=0.)
    b_st = tl.load(prov_cidx + b_row, mask=m_f, other=0) * DS
    b_s = _dot(b_q, tl.trans(b_k), F32) * qk_scale
    c_r = tl.arange(0, CP * GP) // GP
    m_rf = m_r[:, None] & m_f[None, :] & (c_r[:, None] == c_f[None, :])
    return b_s, m_rf, b_row, tl.where(m_f, b_st, -1)


@triton.jit
def _stats(b_q, ck_cache, p_bt, i_h, o_d, m_d, n_cr, lo, hi, qk_scale, b_m, b_l,
           HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, CPP: tl.constexpr,
           L: tl.constexpr, DS: tl.constexpr, TB: tl.constexpr, F32: tl.constexpr):
    """Online (max, sum of exp2) of each row over committed tokens [lo, hi) (row i < n_cr)."""
    o_tb = tl.arange(0, TB)
    for i0 in range(lo, hi, TB):
        o_c = i0 + o_tb
        m_c = o_c < hi
        b_k = _load_cmp(ck_cache, p_bt, o_c, m_c, i_h, o_d, m_d, HKV, D, PS, CPP, L, DS)
        b_s = _dot(b_q, tl.trans(b_k), F32) * qk_scale                             # [RR, TB]
        b_s = tl.where(m_c[None, :] & (o_c[None, :] < n_cr[:, None]), b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_l = b_l * tl.exp2(b_m - b_mn) + tl.sum(tl.exp2(b_s - b_mn[:, None]), 1)
        b_m = b_mn
    return b_m, b_l


@triton.jit
def _head_sum(b_p, CP: tl.constexpr, GP: tl.constexpr, N: tl.constexpr):
    # [CP*GP, N] -> [CP, N]: the G heads of a query share its selection (GQA group sum)
    return tl.sum(tl.reshape(b_p, [CP, GP, N]), 1)


@triton.jit
def _split_range(nblk, i_s, NSPLIT, BS: tl.constexpr):
    ch = tl.cdiv(tl.cdiv(nblk, NSPLIT), BS) * BS
    jlo = tl.minimum(i_s * ch, nblk)
    return jlo, tl.minimum(jlo + ch, nblk)


@triton.jit
def _merge_bitonic(b_run, b_key, o_bs):
    # top BS of (b_run sorted descending) U (tile keys): max with the tile sorted ascending is
    # bitonic and holds exactly the BS largest; one bitonic merge sorts it descending
    b_new = tl.bitonic_merge(tl.maximum(b_run, tl.sort(b_key, 1)), 1, descending=True)
    return tl.where(b_new < 0, -1 - o_bs[None, :], b_new)      # empty slots stay unique


@triton.jit
def _merge_top(b_run, b_key, o_n):
    """Top BN of (running list [CP, BN], sorted descending) U (tile keys [CP, BN]) by rank
    counting, fully parallel (all keys unique: empty slots hold distinct negative keys)."""
    # rank of run[a] = a + #(tile > run[a]); rank of tile[b] = #(run > tile[b]) + #(tile > tile[b])
    r_a = o_n[None, :] + tl.sum((b_key[:, None, :] > b_run[:, :, None]).to(tl.int32), 2)
    r_b = tl.sum((b_run[:, None, :] > b_key[:, :, None]).to(tl.int32), 2) \
        + tl.sum((b_key[:, None, :] > b_key[:, :, None]).to(tl.int32), 2)
    MIN: tl.constexpr = -(1 << 62)
    b_new = tl.maximum(tl.max(tl.where(r_a[:, :, None] == o_n[None, None, :], b_run[:, :, None], MIN), 1),
                       tl.max(tl.where(r_b[:, :, None] == o_n[None, None, :], b_key[:, :, None], MIN), 1))
    return tl.where(b_new < 0, -1 - o_n[None, :], b_new)        # empty slots stay unique


@triton.jit
def _scores(b_q, ck_cache, cv_cache, p_bt, i_h, o_d, m_d, n_cr, cur_q, m_q, b_lse,
            jlo, jhi, qk_scale, b_pp, b_pst, b_acc,
            HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, CPP: tl.constexpr,
            L: tl.constexpr, DS: tl.constexpr, LS: tl.constexpr, R: tl.constexpr,
            RP: tl.constexpr, K: tl.constexpr, CP: tl.constexpr, GP: tl.constexpr,
            BS: tl.constexpr, TB: tl.constexpr, TOPN: tl.constexpr, INIT: tl.constexpr,
            LOCAL: tl.constexpr, MPP: tl.constexpr, HAS_PROV: tl.constexpr,
            WITH_OUT: tl.constexpr, F32: tl.constexpr, MERGE: tl.constexpr):
    """Block scores of blocks [jlo, jhi) for the group's queries, merged into a running top-BS
    list of packed keys per query ([CP, BS] int64, sorted descending, -1 = empty); o_cmp
    accumulated over the committed tokens starting in those blocks."""
    MASK: tl.constexpr = (1 << 24) - 1
    o_tb = tl.arange(0, TB)
    jj = o_tb // RP                                   # block of the tile, per token slot
    mm = o_tb % RP                                    # token inside its block
    o_bs = tl.arange(0, BS)
    # spill of block jlo-1's tokens into block jlo (tokens owned by the previous split)
    n_cmax = tl.max(n_cr, 0)        # never load past the existing tokens (the pool is poisoned)
    TC: tl.constexpr = 16 if RP < 16 else RP  # noqa: FURB136 (a constexpr: keep it plain Python)
    o_tc = tl.arange(0, TC)
    o_cc = (jlo - 1) * R + o_tc
    m_tc = (o_tc < R) & (jlo > 0) & (o_cc < n_cmax)
    b_kc = _load_cmp(ck_cache, p_bt, o_cc, m_tc, i_h, o_d, m_d, HKV, D, PS, CPP, L, DS)
    b_sc0 = _dot(b_q, tl.trans(b_kc), F32) * qk_scale
    b_pc = tl.where(m_tc[None, :] & (o_cc[None, :] < n_cr[:, None]), tl.exp2(b_sc0 - b_lse[:, None]), 0.)
    w_tc = tl.where(o_tc < R, tl.maximum(o_tc + K - R, 0), 0).to(tl.float32)
    b_carry = tl.sum(_head_sum(b_pc, CP, GP, TC) * w_tc[None, :], 1)              # [CP]
    o_m = tl.arange(0, RP)
    w_own = tl.where(o_m < R, tl.minimum(R - o_m, K), 0).to(tl.float32)           # [RP]
    w_spill = tl.where(o_m < R, tl.maximum(o_m + K - R, 0), 0).to(tl.float32)
    if HAS_PROV:
        pmin = tl.min(tl.where(b_pst >= 0, b_pst // LS, 1 << 30), 0)
        pmax = tl.max(tl.where(b_pst >= 0, (b_pst + L - 1) // LS, -1), 0)
        b_pp2 = tl.reshape(b_pp, [CP, MPP])
        b_pst2 = tl.reshape(b_pst, [CP, MPP])
    b_run = (-1 - o_bs[None, :] + tl.zeros([CP, BS], tl.int32)).to(tl.int64)     # empty, unique
    for j0 in range(jlo, jhi, BS):
        o_c = j0 * R + jj * R + mm                                                 # [TB]
        m_c = (mm < R) & (j0 + jj < jhi) & (o_c < n_cmax)
        b_k = _load_cmp(ck_cache, p_bt, o_c, m_c, i_h, o_d, m_d, HKV, D, PS, CPP, L, DS)
        b_s = _dot(b_q, tl.trans(b_k), F32) * qk_scale                             # [RR, TB]
        m_s = m_c[None, :] & (o_c[None, :] < n_cr[:, None])
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.)
        if WITH_OUT:
            b_v = _load_cmp(cv_cache, p_bt, o_c, m_c, i_h, o_d, m_d, HKV, D, PS, CPP, L, DS)
            b_acc += _dot(b_p.to(b_v.dtype), b_v, F32)
        b_ps = tl.reshape(_head_sum(b_p, CP, GP, TB), [CP, BS, RP])
        b_own = tl.sum(b_ps * w_own[None, None, :], 2)                            # [CP, BS]
        b_spl = tl.sum(b_ps * w_spill[None, None, :], 2)                          # into j+1
        b_prev = tl.gather(b_spl, (tl.maximum(o_bs - 1, 0)[None, :] + tl.zeros([CP, BS], tl.int32)), 1)
        b_sc = b_own + tl.where(o_bs[None, :] == 0, b_carry[:, None], b_prev)
        b_carry = tl.sum(tl.where(o_bs[None, :] == BS - 1, b_spl, 0.), 1)
        o_j = j0 + o_bs                                                            # [BS]
        if HAS_PROV:  # noqa: SIM102 (constexpr, dropped at compile time; the inner test is run-time)
            if (j0 + BS > pmin) & (j0 <= pmax):
                b_sc += tl.sum(b_pp2[:, :, None] * _overlap(b_pst2[:, :, None], o_j[None, None, :],
                                                            L, LS, DS), 1)
        m_cand = m_q[:, None] & (o_j[None, :] <= cur_q[:, None]) & (o_j[None, :] < jhi)
        m_forced = (o_j[None, :] < INIT) | (o_j[None, :] > cur_q[:, None] - LOCAL)
        b_sc = tl.where(m_forced, float("inf"), b_sc)
        # non-negative floats order like their bit patterns; the sign bit is cleared so -0 == 0
        b_bits = (b_sc.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
        b_key = tl.where(m_cand, (b_bits << 24) | (MASK - o_j[None, :]), -1 - BS - o_bs[None, :])
        if MERGE == MERGE_BITONIC:
            b_run = _merge_bitonic(b_run, b_key, o_bs)
        else:
            b_run = _merge_top(b_run, b_key, o_bs)
    return b_run, b_acc


@triton.jit
def _pick(b_key, o_n, TOPN: tl.constexpr):
    """Keys [CP, BN] sorted descending -> block indices of the first TOPN valid ones, sorted
    ascending, -1 padded (rank counting; ties only among the 2^30 fillers, broken by slot)."""
    MASK: tl.constexpr = (1 << 24) - 1
    m_v = (o_n[None, :] < TOPN) & (b_key >= 0)
    b_i = tl.where(m_v, MASK - (b_key & MASK), 1 << 30).to(tl.int32)
    lt = (b_i[:, None, :] < b_i[:, :, None]) | ((b_i[:, None, :] == b_i[:, :, None])
                                                & (o_n[None, None, :] < o_n[None, :, None]))
    r = tl.sum(lt.to(tl.int32), 2)                                                    # [CP, BN]
    b_o = tl.max(tl.where(r[:, :, None] == o_n[None, None, :], b_i[:, :, None], -1), 1)
    return tl.where(b_o >= (1 << 30), -1, b_o)


@triton.jit
def _prov_probs(b_sp, m_rp, b_lse):
    # provisional probabilities with the global normalisation, [RR, NPS]
    return tl.where(m_rp, tl.exp2(b_sp - b_lse[:, None]), 0.)


