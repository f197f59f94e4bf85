"""Tile helpers of the grouped refresh kernel (score_topk_grouped.py): group rows, compressed-key
tiles, softmax statistics, Eq. 9 block scores of one tile of selection blocks and the running
top-n merge. Names and constexprs as in score_topk_grouped.py.

Per pass-2 tile (BS selection blocks, TB = BS*RP token slots, RR = CP*GP rows):
  p = exp2(s - lse) [RR, TB] (the only MUFU work), then Eq. 9 as a matrix product:
  MAP_MMA (measured ~2x slower than MAP_REDUCE on the H200: the three splits and the MMA
      operand layouts take 255 registers; kept as a tested alternative): block scores [RR, BS] = p @ W_own + p @ W_wrap, W [TB, BS] the exact
      small-integer overlap weights (own block and the spill into the next block; W_wrap moves
      the spill of the tile's last block into column 0, added to the next tile), p split into
      three bf16 parts (p = p1 + p2 + p3 exactly for fp32 p: 3 x 8 significant bits), so the
      tensor cores compute it with fp32 accumulation and no precision loss beyond summation
      order; then the G-head sum on the [RR, BS] product (RP times smaller than p).
  MAP_REDUCE (default): head sum of p, then the [CP, BS, RP] view
      weighted by the own / spill weights, spill shifted by a gather (the previous design).
  Merge into the running top-BS list of packed keys per query (sorted descending):
  MERGE_BITONIC (GPU default): sort the tile's BS keys ascending, elementwise max with the
      running list (a bitonic sequence holding the top BS of both), one bitonic merge: about
      half the compare-exchanges of sorting the 2*BS union.
  MERGE_SORT: bitonic sort of the 2*BS union (the previous GPU path); MERGE_RANK: rank
      counting (fast in the CPU interpreter, spills registers on the GPU at 64 rows).
PROF (profiling only, results wrong): bit 1 skips the merge, 2 the Eq. 9 map, 4 the pass-2 tile
loop, 8 pass 1 -- benchmark/stages.py times the differences.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common.tl_math import dot_f32 as _dot, overlap as _overlap
from .blocks import cmp_slot_dev, num_cmp_dev

MAP_REDUCE = tl.constexpr(0)
MAP_MMA = tl.constexpr(1)
MERGE_RANK = tl.constexpr(0)
MERGE_SORT = tl.constexpr(1)
MERGE_BITONIC = tl.constexpr(2)


@triton.jit
def _load_cmp(cache, p_bt, o_c, m_c, i_h, o_d, m_d,
              HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, CPP: tl.constexpr,
              L: tl.constexpr, DS: tl.constexpr):
    # compressed tokens o_c [N] of one request, KV head i_h -> [N, BD] (zeros where masked)
    i_lp, i_s = cmp_slot_dev(o_c, PS, L, DS)
    b_pg = tl.load(p_bt + i_lp, mask=m_c, other=0).to(tl.int64)
    o_row = ((b_pg * CPP + i_s) * HKV + i_h) * D
    return tl.load(cache + o_row[:, None] + o_d[None, :], mask=m_c[:, None] & m_d[None, :], other=0.)


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
def _split_range(nblk, i_s, NSPLIT: tl.constexpr, BS: tl.constexpr):
    ch = tl.cdiv(tl.cdiv(nblk, NSPLIT), BS) * BS
    jlo = tl.minimum(i_s * ch, nblk)
    return jlo, tl.minimum(jlo + ch, nblk)


@triton.jit
def _split3(b_p):
    # fp32 [M, N] -> three bf16 parts summing exactly to it (8 significant bits each)
    b_1 = b_p.to(tl.bfloat16)
    b_r = b_p - b_1.to(tl.float32)
    b_2 = b_r.to(tl.bfloat16)
    b_3 = (b_r - b_2.to(tl.float32)).to(tl.bfloat16)
    return b_1, b_2, b_3


@triton.jit
def _map_weights(R: tl.constexpr, RP: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
                 TB: tl.constexpr):
    """Eq. 9 weights of a tile's token slots (t = block jj * RP + token mm) as [TB, BS] bf16:
    own block min(K, R-mm), next block max(0, mm+K-R); W_wrap holds the last block's spill in
    column 0 (it lands in the next tile's first block). Small integers: exact in bf16."""
    o_t = tl.arange(0, TB)
    jj = o_t // RP
    mm = o_t % RP
    w_own = tl.where(mm < R, tl.minimum(R - mm, K), 0)
    w_spl = tl.where(mm < R, tl.maximum(mm + K - R, 0), 0)
    o_j = tl.arange(0, BS)
    w = tl.where(jj[:, None] == o_j[None, :], w_own[:, None], 0) \
        + tl.where(jj[:, None] + 1 == o_j[None, :], w_spl[:, None], 0)
    w_wrap = tl.where((jj[:, None] == BS - 1) & (o_j[None, :] == 0), w_spl[:, None], 0)
    # via fp32: the CPU interpreter turns int32 -> bf16 into zeros
    return w.to(tl.float32).to(tl.bfloat16), w_wrap.to(tl.float32).to(tl.bfloat16)


@triton.jit
def _map_mma(b_p, w, w_wrap, CP: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr,
             F32: tl.constexpr):
    # [RR, TB] probabilities -> (own + in-tile spill [CP, BS], last block's spill in column 0)
    b_1, b_2, b_3 = _split3(b_p)
    if F32:     # the same products in exact fp32 (the CPU interpreter's bf16 dot is wrong)
        b_o = _dot(b_1, w, F32) + _dot(b_2, w, F32) + _dot(b_3, w, F32)
        b_w = _dot(b_1, w_wrap, F32) + _dot(b_2, w_wrap, F32) + _dot(b_3, w_wrap, F32)
    else:
        b_o = tl.dot(b_1, w)
        b_o = tl.dot(b_2, w, b_o)
        b_o = tl.dot(b_3, w, b_o)
        b_w = tl.dot(b_1, w_wrap)
        b_w = tl.dot(b_2, w_wrap, b_w)
        b_w = tl.dot(b_3, w_wrap, b_w)
    return _head_sum(b_o, CP, GP, BS), _head_sum(b_w, CP, GP, BS)


@triton.jit
def _merge_bitonic(b_run, b_key, o_bs):
    # top BS of (b_run sorted descending) U (tile keys): max with the tile sorted ascending is
    # bitonic and holds exactly the BS largest; one bitonic merge sorts it descending
    b_new = tl.bitonic_merge(tl.maximum(b_run, tl.sort(b_key, 1)), 1, descending=True)
    return tl.where(b_new < 0, -1 - o_bs[None, :], b_new)      # empty slots stay unique


@triton.jit
def _merge_sort(b_run, b_key, o_bs, CP: tl.constexpr, BS: tl.constexpr):
    b_all = tl.sort(tl.reshape(tl.join(b_run, b_key), [CP, 2 * BS]), 1, descending=True)
    b_new, _ = tl.split(tl.permute(tl.reshape(b_all, [CP, 2, BS]), (0, 2, 1)))
    return tl.where(b_new < 0, -1 - o_bs[None, :], b_new)


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
            WITH_OUT: tl.constexpr, F32: tl.constexpr, MAP: tl.constexpr,
            MERGE: tl.constexpr, PROF: tl.constexpr):
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
    TC: tl.constexpr = 16 if RP < 16 else RP
    o_tc = tl.arange(0, TC)
    o_cc = (jlo - 1) * R + o_tc
    m_tc = (o_tc < R) & (jlo > 0) & (o_cc < n_cmax)
    b_kc = _load_cmp(ck_cache, p_bt, o_cc, m_tc, i_h, o_d, m_d, HKV, D, PS, CPP, L, DS)
    b_sc0 = _dot(b_q, tl.trans(b_kc), F32) * qk_scale
    b_pc = tl.where(m_tc[None, :] & (o_cc[None, :] < n_cr[:, None]), tl.exp2(b_sc0 - b_lse[:, None]), 0.)
    w_tc = tl.where(o_tc < R, tl.maximum(o_tc + K - R, 0), 0).to(tl.float32)
    b_carry = tl.sum(_head_sum(b_pc, CP, GP, TC) * w_tc[None, :], 1)              # [CP]
    b_wrap = tl.where(o_bs[None, :] == 0, b_carry[:, None], 0.)                   # [CP, BS]
    if MAP == MAP_MMA:
        w_mat, w_wrap = _map_weights(R, RP, K, BS, TB)
    else:
        o_m = tl.arange(0, RP)
        w_own = tl.where(o_m < R, tl.minimum(R - o_m, K), 0).to(tl.float32)       # [RP]
        w_spill = tl.where(o_m < R, tl.maximum(o_m + K - R, 0), 0).to(tl.float32)
    if HAS_PROV:
        pmin = tl.min(tl.where(b_pst >= 0, b_pst // LS, 1 << 30), 0)
        pmax = tl.max(tl.where(b_pst >= 0, (b_pst + L - 1) // LS, -1), 0)
        b_pp2 = tl.reshape(b_pp, [CP, MPP])
        b_pst2 = tl.reshape(b_pst, [CP, MPP])
    b_run = (-1 - o_bs[None, :] + tl.zeros([CP, BS], tl.int32)).to(tl.int64)     # empty, unique
    if PROF & 4:
        jhi = jlo
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
        if PROF & 2:
            b_sc = tl.zeros([CP, BS], tl.float32) + tl.sum(tl.sum(b_p, 1), 0)
        elif MAP == MAP_MMA:
            b_sc, b_nxt = _map_mma(b_p, w_mat, w_wrap, CP, GP, BS, F32)
            b_sc += b_wrap
            b_wrap = b_nxt
        else:
            b_ps = tl.reshape(_head_sum(b_p, CP, GP, TB), [CP, BS, RP])
            b_own = tl.sum(b_ps * w_own[None, None, :], 2)                        # [CP, BS]
            b_spl = tl.sum(b_ps * w_spill[None, None, :], 2)                      # into j+1
            b_prev = tl.gather(b_spl, (tl.maximum(o_bs - 1, 0)[None, :] + tl.zeros([CP, BS], tl.int32)), 1)
            b_sc = b_own + tl.where(o_bs[None, :] == 0, b_carry[:, None], b_prev)
            b_carry = tl.sum(tl.where(o_bs[None, :] == BS - 1, b_spl, 0.), 1)
        o_j = j0 + o_bs                                                            # [BS]
        if HAS_PROV:
            if (j0 + BS > pmin) & (j0 <= pmax):
                b_sc += tl.sum(b_pp2[:, :, None] * _overlap(b_pst2[:, :, None], o_j[None, None, :],
                                                            L, LS, DS), 1)
        m_cand = m_q[:, None] & (o_j[None, :] <= cur_q[:, None]) & (o_j[None, :] < jhi)
        m_forced = (o_j[None, :] < INIT) | (o_j[None, :] > cur_q[:, None] - LOCAL)
        b_sc = tl.where(m_forced, float("inf"), b_sc)
        # non-negative floats order like their bit patterns; the sign bit is cleared so -0 == 0
        b_bits = (b_sc.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
        b_key = tl.where(m_cand, (b_bits << 24) | (MASK - o_j[None, :]), -1 - BS - o_bs[None, :])
        if PROF & 1:
            b_run = tl.maximum(b_run, b_key)
        elif MERGE == MERGE_BITONIC:
            b_run = _merge_bitonic(b_run, b_key, o_bs)
        elif MERGE == MERGE_SORT:
            b_run = _merge_sort(b_run, b_key, o_bs, CP, BS)
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


