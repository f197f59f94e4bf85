"""Copy the prefix's partial tail page into every draft branch's first page without a host sync
(trees, page size > 1).

Why: with topk > 1 at page size > 1 SGLang gives each draft branch its own pages, whose first
`last_page` slots stand for the prefix's partial tail page; the draft's page reads (ours go
through `branch_tables`, draft_backend.py) need the real tail KV there. SGLang 0.5.17's
`duplicate_prefix_tail_to_draft_branches` picks the slots to copy with a boolean mask, whose
data-dependent size makes the host wait for the GPU on every tree step (so overlap scheduling
cannot prepare step N+1 while step N runs), and hands its KV-move kernel a new row count each
step (a new Triton variant per count: the compiles jit_warmup.py front-loads). Here every
(request, branch, page offset) moves; offsets past the tail move a slot onto itself, a no-op,
so the count is the fixed bs * (topk - 1) * page_size and nothing syncs. The KV afterwards is
the same (unit test against SGLang's function).

Sources (the prefix's tail page) and real targets (branch slots below `last_page`) are disjoint
and the self-moves touch neither, so SGLang chunking a large move into several launches is safe.
"""
from __future__ import annotations

import logging

import torch

# set by the SpecSA worker (worker.py): only SpecSA servers take this path; other algorithms
# served by an SGLang that has the plugin installed keep SGLang's function
ACTIVE = False
_logged = False


def duplicate_prefix_tail(original, token_to_kv_pool, rows: torch.Tensor,
                          prefix_base: torch.Tensor, last_page: torch.Tensor,
                          num_new_pages: torch.Tensor, topk: int, page_size: int) -> None:
    """AROUND hook of eagle_worker_common.duplicate_prefix_tail_to_draft_branches (same
    arguments: rows [bs, W] req_to_token rows, prefix_base / last_page / num_new_pages [bs])."""
    if not ACTIVE or topk <= 1:
        return original(token_to_kv_pool, rows, prefix_base, last_page, num_new_pages, topk,
                        page_size)
    global _logged
    if not _logged:
        _logged = True
        logging.getLogger("specsa").warning(
            "specsa: tree branch tail pages copied without a host sync (topk %d, page %d)",
            topk, page_size)
    bs = rows.shape[0]
    if bs == 0:
        return None
    dev = rows.device
    off = torch.arange(page_size, device=dev, dtype=torch.int64).view(1, 1, page_size)
    branch = torch.arange(1, topk, device=dev, dtype=torch.int64).view(1, topk - 1, 1)
    base = prefix_base.view(bs, 1, 1).to(torch.int64)
    src_pos = (base + off).expand(bs, topk - 1, page_size)
    tgt_pos = base + branch * (num_new_pages.view(bs, 1, 1).to(torch.int64) * page_size) + off
    src = torch.gather(rows, 1, src_pos.reshape(bs, -1))
    tgt = torch.gather(rows, 1, tgt_pos.reshape(bs, -1))
    tail = (off < last_page.view(bs, 1, 1)).expand(bs, topk - 1, page_size).reshape(bs, -1)
    token_to_kv_pool.move_kv_cache(tgt.reshape(-1), torch.where(tail, src, tgt).reshape(-1))
    return None
