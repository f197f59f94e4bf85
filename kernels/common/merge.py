"""(o, lse) merge of split-KV partial states (FlashInfer cascade `merge_state` semantics) and
the NSA gated combine, as device helpers: the fused kernel's last split of a (group, KV head)
merges the partials in place, so a split launch needs no merge launch
(kernels/fused/verify.py).

Legend: NSPLIT splits, NB branches (1: union / dense, 2: gated selected + window), NQ queries,
HQ heads, D head dim (BD padded). lse is in log2 units (the kernels accumulate with exp2).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_math import merge_state


@triton.jit
def gated_combine(GATES, OCMP, p_row, m_row, o_d, m_o, b_slc, b_win, D: tl.constexpr):
    # o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win for rows p_row (flat query-head index;
    # gates [*, 3] in (cmp, slc, win) order, sigmoid already applied), in fp32
    p_g = GATES + p_row * 3
    b_gc = tl.load(p_g + 0, mask=m_row, other=0.).to(tl.float32)
    b_gs = tl.load(p_g + 1, mask=m_row, other=0.).to(tl.float32)
    b_gw = tl.load(p_g + 2, mask=m_row, other=0.).to(tl.float32)
    b_oc = tl.load(OCMP + p_row[:, None] * D + o_d[None, :], mask=m_o, other=0.).to(tl.float32)
    return b_gc[:, None] * b_oc + b_gs[:, None] * b_slc + b_gw[:, None] * b_win


@triton.jit
def merge_partials(OPART, LPART, p_row, m_row, o_d, m_d, br, NQ, NSPLIT, HQ: tl.constexpr,
                   D: tl.constexpr, NB: tl.constexpr):
    # the normalised output of branch br for flat query-head rows p_row, from the NSPLIT
    # partials. ".cg" loads skip L1: the fused kernel's last split reads partials that other
    # SMs wrote during the same launch (L1 is not coherent across SMs)
    m = tl.full([p_row.shape[0]], float("-inf"), tl.float32)
    l = tl.zeros([p_row.shape[0]], tl.float32)
    acc = tl.zeros([p_row.shape[0], o_d.shape[0]], tl.float32)
    for s in range(NSPLIT):
        base = (s * NB + br) * NQ * HQ + p_row
        b_l = tl.load(LPART + base, mask=m_row, other=float("-inf"), cache_modifier=".cg")
        b_o = tl.load(OPART + base[:, None] * D + o_d[None, :], mask=m_row[:, None] & m_d[None, :],
                      other=0.0, cache_modifier=".cg")
        m, l, acc = merge_state(m, l, acc, b_l, b_o)
    return acc / tl.where(l > 0, l, 1.0)[:, None]
