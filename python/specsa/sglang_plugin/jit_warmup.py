"""Compile at start-up the Triton kernels that a tree step would otherwise compile mid-serving.

Why: with topk > 1, SGLang moves KV rows on every step (the prefix tail page copied into each
draft branch at page size > 1, the accepted path compacted to the front after verification:
`MHATokenToKVPool.move_kv_cache`). Its kernel takes `next_power_of_2(N)` as a constexpr and N
as a specialised int, so each new (bucket, N == 1 / N % 16 == 0 / other) pair compiles on the
host inside a step: measured on an H100 (8B shape, 32K, batch 8, tree 3,2,6, cold Triton cache)
as eight compiles of 70-720 ms in the first 13 steps, which tripled the measured ms/token
(jit_log.py found them). Moving slot 0 onto itself (SGLang's padding slot, never read) once per
key compiles every variant before the first request; later starts load them from Triton's
cache.
"""
from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger("specsa")


def move_kernel_counts(limit: int) -> list[int]:
    """One row count N per Triton specialisation of SGLang's KV-move kernel for N <= limit:
    (next power of two of N, N == 1 / N % 16 == 0 / other), the smallest N of each."""
    seen, out = set(), []
    for n in range(1, max(0, limit) + 1):
        key = (1 << (n - 1).bit_length(), "one" if n == 1 else "d16" if n % 16 == 0 else "any")
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out


def warm_kv_move(pool, limit: int | None = None) -> tuple[int, float]:
    """Run `pool.move_kv_cache` on slot 0 once per kernel specialisation (module doc).
    Returns (launches, seconds); (0, 0.0) for a pool without SGLang's tiled move."""
    cfg = getattr(pool, "_kv_copy_config", None)
    if cfg is None or not hasattr(pool, "move_kv_cache") or getattr(pool, "use_hnd", False) \
            or getattr(pool, "use_native_move_kv_cache", False):
        return 0, 0.0
    cap = int(cfg.get("num_locs_upper", 256))         # larger N is chunked to <= cap
    counts = move_kernel_counts(min(cap, limit or cap))
    dev = pool.k_buffer[0].device if hasattr(pool, "k_buffer") else pool.device
    zero = torch.zeros(max(counts, default=0), dtype=torch.int64, device=dev)
    t0 = time.perf_counter()
    for n in counts:
        pool.move_kv_cache(zero[:n], zero[:n])
    if zero.is_cuda:
        torch.cuda.synchronize(zero.device)
    return len(counts), time.perf_counter() - t0


def warm_tree_step_kernels(worker) -> None:
    """The SpecSA worker's start-up hook: trees (topk > 1) on CUDA only."""
    sa = worker.server_args
    if int(getattr(sa, "speculative_eagle_topk", None) or 1) <= 1 \
            or not str(getattr(sa, "device", "cuda")).startswith("cuda"):
        return
    # the accepted path moves in the target's pool, the branch tail pages in the draft's; a
    # draft of another head shape has another tile size (another variant set)
    pools = [worker.target_worker.model_runner.token_to_kv_pool]
    draft = getattr(getattr(worker, "_draft_worker", None), "draft_runner", None)
    if draft is not None and draft.token_to_kv_pool is not pools[0]:
        pools.append(draft.token_to_kv_pool)
    n = s = 0
    for pool in pools:
        k, t = warm_kv_move(pool)
        n, s = n + k, s + t
    if n:
        logger.warning("specsa: compiled SGLang's KV-move kernel for %d row-count variants "
                       "before serving (%.1f s; trees move KV rows every step)", n, s)
