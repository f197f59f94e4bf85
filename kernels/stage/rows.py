"""Stage a step's new rows in one launch: store k / v in the pool at the forward's slots and
write q, k, v as contiguous rows (see naive.py for the contract). Copies only: k and v must
have the pool's dtype.

Why: q, k, v arrive as strided views of the fused QKV projection. Staging them took four
launches per layer (SGLang's KV store, then a copy each for q, k and v); at batch 1 every one
is a few microseconds of a latency-bound chain of small kernels, 32 layers deep. One launch
does all of it.

Legend (FLA): i_ program ids, o_ offsets, m_ masks, b_ on-chip blocks. Grid (N, Hq): program
(n, h) copies query head h of row n and, for h < Hkv, KV head h of row n (to the contiguous
rows and, with a store, to pool slot loc[n]). Fixed by N and Hq: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.launch import pow2


@triton.jit
def stage_rows_kernel(
    q, k, v, loc, k_pool, v_pool, q_out, k_out, v_out,
    sq_n, sq_h, sk_n, sk_h, sv_n, sv_h,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    STORE: tl.constexpr,
):
    i_n, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q = tl.load(q + i_n * sq_n + i_h * sq_h + o_d, mask=m_d)
    tl.store(q_out + (i_n * HQ + i_h) * D + o_d, b_q, mask=m_d)
    if i_h < HKV:
        b_k = tl.load(k + i_n * sk_n + i_h * sk_h + o_d, mask=m_d)
        b_v = tl.load(v + i_n * sv_n + i_h * sv_h + o_d, mask=m_d)
        o_row = (i_n * HKV + i_h) * D + o_d
        tl.store(k_out + o_row, b_k, mask=m_d)
        tl.store(v_out + o_row, b_v, mask=m_d)
        if STORE:
            i_s = tl.load(loc + i_n).to(tl.int64)
            o_slot = (i_s * HKV + i_h) * D + o_d
            tl.store(k_pool + o_slot, b_k, mask=m_d)
            tl.store(v_pool + o_slot, b_v, mask=m_d)


def stage_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               loc: torch.Tensor | None = None, k_pool: torch.Tensor | None = None,
               v_pool: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Args:
        q (torch.Tensor): [N, Hq, D], rows and heads at any stride, the last dim contiguous.
        k, v (torch.Tensor): [N, Hkv, D], the same; Hkv <= Hq.
        loc (torch.Tensor | None): [N] int pool slots to store k / v at, or None (no store).
        k_pool, v_pool (torch.Tensor | None): [S, Hkv, D] contiguous pool of one layer (any
            view whose rows are slots, e.g. SGLang's token pool); # mutable.
    Returns:
        (q, k, v) contiguous, in their own dtypes (a pool must have k's and v's dtype).
    """
    n, hq, d = q.shape
    hkv = k.shape[1]
    if k.shape != (n, hkv, d) or v.shape != (n, hkv, d) or hkv > hq:
        raise ValueError(f"stage_rows: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}: need q [N, Hq, D], k / v [N, Hkv, D], Hkv <= Hq")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("stage_rows: the head dim of q, k and v must be contiguous")
    store = loc is not None
    if store:
        if k_pool is None or v_pool is None:
            raise ValueError("stage_rows: a store (loc) needs k_pool and v_pool")
        for name, p in (("k_pool", k_pool), ("v_pool", v_pool)):
            if not p.is_contiguous() or p.shape[-2:] != (hkv, d):
                raise ValueError(f"stage_rows: {name} {tuple(p.shape)} must be a contiguous "
                                 f"[S, {hkv}, {d}] pool")
        if loc.shape != (n,):
            raise ValueError(f"stage_rows: loc {tuple(loc.shape)} must be [{n}]")
        if k_pool.dtype != k.dtype or v_pool.dtype != v.dtype:
            # a cast would have to round exactly as the pool's own store does: callers with
            # another pool dtype keep the pool's store
            raise ValueError(f"stage_rows: k / v {k.dtype} / {v.dtype} must have the pool's "
                             f"dtype {k_pool.dtype}")
    q_out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((n, hkv, d), dtype=k.dtype, device=q.device)
    v_out = torch.empty((n, hkv, d), dtype=v.dtype, device=q.device)
    if n == 0:
        return q_out, k_out, v_out
    stage_rows_kernel[(n, hq)](
        q, k, v, loc if store else q, k_pool if store else k_out, v_pool if store else v_out,
        q_out, k_out, v_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), HQ=hq, HKV=hkv, D=d, BD=pow2(d, 16), STORE=store, num_warps=1)
    return q_out, k_out, v_out
