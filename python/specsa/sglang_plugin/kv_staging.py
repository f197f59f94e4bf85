"""A decode / verify / draft step's new rows inside SGLang: k / v stored in the token pool at
the forward's slots, and q / k / v as contiguous rows for the NSA kernels. Both SpecSA
backends (the target's `triton_backend.py`, the window draft's `draft_backend.py`) stage
their rows here.

SGLang's attention layers hand q, k, v as strided views of the fused QKV projection. Where the
pool allows it (`direct_store_ok`) one launch (`kernels/stage`) does the store and the three
copies; every other pool keeps its own `set_kv_buffer` and the copies run separately.
"""
from __future__ import annotations

import torch
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from specsa.kernels.stage import stage_rows


def direct_store_ok(pool) -> bool:
    """Whether a step may store its K/V in the pool itself (`stage_rows`) instead of through
    `pool.set_kv_buffer`: only SGLang's plain MHA token pool with an unquantized NHD layout
    (one contiguous [slots, Hkv, D] buffer per layer, no store hooks)."""
    try:
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    except ImportError:
        return False
    return (type(pool) is MHATokenToKVPool and not pool.is_quantized_kv_cache
            and pool.store_dtype == pool.dtype and not getattr(pool, "use_hnd", False)
            and getattr(pool, "kv_cache_layout", "nhd") == "nhd"
            and getattr(pool, "v_head_dim", pool.head_dim) == pool.head_dim)


def stage_ok(direct_store: bool, pool, q3, k3, v3, fb, save_kv_cache: bool) -> bool:
    """Whether this forward may use `stage_rows`: a pool that allows it, k / v of the pool's
    dtype, and (with a store) one slot per row (anything else keeps the pool's own store,
    which handles it as before)."""
    if not direct_store or k3.dtype != pool.dtype or v3.dtype != pool.dtype:
        return False
    loc = fb.out_cache_loc
    return not save_kv_cache or (loc is not None and loc.shape == (q3.shape[0],))


def stage_step_rows(pool, direct_store: bool, layer, q, k, v, fb, save_kv_cache: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N, Hq, D], k, v [N, Hkv, D]) contiguous, k / v exactly as the pool stores them (what
    later steps will read), after storing k / v at fb.out_cache_loc when save_kv_cache."""
    q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
    k3 = k.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim)
    v3 = v.reshape(-1, layer.tp_k_head_num, layer.v_head_dim)
    lid = layer.layer_id
    if stage_ok(direct_store, pool, q3, k3, v3, fb, save_kv_cache):
        return stage_rows(q3, k3, v3, fb.out_cache_loc if save_kv_cache else None,
                          pool.get_key_buffer(lid), pool.get_value_buffer(lid))
    if save_kv_cache:
        pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc), k, v)
    dt = pool.get_key_buffer(lid).dtype
    return q3.contiguous(), k3.to(dt).contiguous(), v3.to(dt).contiguous()
