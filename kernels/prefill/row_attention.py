"""Selected + window attention with the NSA combine, one row per program (prefill chunks).

Legend (FLA): i_ program ids / scalars, o_ offsets, m_ masks, p_ pointers, b_ on-chip blocks.
Constexprs: HQ / HKV heads, G = HQ // HKV (BG tile >= 16, padded heads masked), D head dim
(BD tile), LS selection block l' (BLS tile), W window, BW window tile, PS page size, TOPN n,
GATED combine.

One program = one query row x one KV head: online softmax over the tokens of the row's selected
blocks (positions <= t), then over the window max(0, t-w+1)..t. Union combine: one softmax, the
selected tokens that fall inside the window are skipped there (each token once). Gated: two
softmaxes, o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win. Self-contained so that prefill never
falls back to the reference; the decode/verify kernels (kernels/fused/) cover the other shapes.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common.merge import gated_combine
from ..common.tl_math import NEG_BIG, load_q_heads
from ..common.tl_math import dot_f32 as _dot


@triton.jit
def _attend(b_q, k_cache, v_cache, p_bt, o_pos, m_tok, i_h, o_d, m_d, b_m, b_l, b_acc, scale,
            HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, F32: tl.constexpr):
    # one online-softmax step over tokens o_pos [BT] (m_tok masks them) -> (m, l, acc)
    b_pg = tl.load(p_bt + o_pos // PS, mask=m_tok, other=0).to(tl.int64)
    o_row = ((b_pg * PS + o_pos % PS) * HKV + i_h) * D                              # [BT]
    m_x = m_tok[:, None] & m_d[None, :]
    b_k = tl.load(k_cache + o_row[:, None] + o_d[None, :], mask=m_x, other=0.)     # [BT, BD]
    b_v = tl.load(v_cache + o_row[:, None] + o_d[None, :], mask=m_x, other=0.)     # [BT, BD]
    b_s = tl.where(m_tok[None, :], _dot(b_q, tl.trans(b_k), F32) * scale, float("-inf"))  # [BG, BT]
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp(b_s - b_mn[:, None])
    b_a = tl.exp(b_m - b_mn)
    b_acc = b_acc * b_a[:, None] + _dot(b_p.to(b_v.dtype), b_v, F32)               # [BG, BD]
    return b_mn, b_l * b_a + tl.sum(b_p, 1), b_acc


@triton.jit
def sel_win_attention_kernel(
    q, k_cache, v_cache, block_table, q_req, q_pos, sel, o_cmp, gates, out, scale, stride_bt,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, LS: tl.constexpr, BLS: tl.constexpr, W: tl.constexpr, BW: tl.constexpr,
    PS: tl.constexpr, TOPN: tl.constexpr, GATED: tl.constexpr, F32: tl.constexpr,
):
    i_q, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_req = tl.load(q_req + i_q).to(tl.int64)
    i_t = tl.load(q_pos + i_q)
    i_w0 = tl.maximum(i_t - W + 1, 0)
    p_bt = block_table + i_req * stride_bt
    b_q, o_hq, m_g, o_d, m_d = load_q_heads(q, i_q, i_h, HQ, G, BG, D, BD)
    b_m = tl.full([BG], NEG_BIG, tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, BD], tl.float32)
    o_ls = tl.arange(0, BLS)
    for i_n in range(TOPN):
        i_blk = tl.load(sel + (i_q * HKV + i_h) * TOPN + i_n)
        if i_blk >= 0:
            o_pos = i_blk * LS + o_ls                                               # [BLS]
            m_tok = (o_ls < LS) & (o_pos <= i_t)
            if not GATED:
                m_tok = m_tok & (o_pos < i_w0)     # window tokens are counted in the window loop
            b_m, b_l, b_acc = _attend(b_q, k_cache, v_cache, p_bt, o_pos, m_tok, i_h, o_d, m_d,
                                      b_m, b_l, b_acc, scale, HKV, D, PS, F32)
    if GATED:
        b_slc = b_acc / tl.where(b_l > 0, b_l, 1.)[:, None]
        b_m = tl.full([BG], NEG_BIG, tl.float32)
        b_l = tl.zeros([BG], tl.float32)
        b_acc = tl.zeros([BG, BD], tl.float32)
    o_w = tl.arange(0, BW)
    for i_p in range(i_w0, i_t + 1, BW):
        o_wp = i_p + o_w                                                            # [BW]
        b_m, b_l, b_acc = _attend(b_q, k_cache, v_cache, p_bt, o_wp, o_wp <= i_t, i_h, o_d, m_d,
                                  b_m, b_l, b_acc, scale, HKV, D, PS, F32)
    b_o = b_acc / b_l[:, None]                    # the window always holds the query itself
    m_qd = m_g[:, None] & m_d[None, :]
    if GATED:
        b_o = gated_combine(gates, o_cmp, o_hq, m_g, o_d, m_qd, b_slc, b_o, D)
    tl.store(out + o_hq[:, None] * D + o_d[None, :], b_o.to(out.dtype.element_ty), mask=m_qd)
