"""Compressed KV per KV page for the SGLang backend (CONTRACTS.md section 4 layout).

Compressed token i closes at position e = i*d + l - 1 and lives in the KV page holding e, at
index i - first_cmp_in_page(e // page_size). Entries are computed lazily from raw KV, and only
for blocks whose l tokens are all committed, so the radix cache shares them exactly with the
pages it shares. Freed pages are recycled by the allocator: every page that receives KV writes
in a forward is invalidated first (`invalidate`), and a recycled page is always written before
it is read, so no request ever sees another request's compressed tokens.
"""
from __future__ import annotations

import torch

from specsa.kernels.common.params import NSAParams
from specsa.kernels.compression.naive import compress_blocks


class PagedCompressedKV:
    """fp32 compressed K/V for every (layer, page): [num_pages, CPP, Hkv, D] each."""

    def __init__(self, num_layers: int, num_slots: int, page_size: int, params: NSAParams,
                 num_kv_heads: int, head_dim: int, v_head_dim: int, device,
                 weights: dict[int, tuple] | None = None):
        self.params = params
        self.page_size = page_size
        self.cpp = params.cmp_per_page(page_size)
        self.num_pages = num_slots // page_size + 2
        shape = (num_layers, self.num_pages, self.cpp, num_kv_heads)
        self.ck = torch.zeros(*shape, head_dim, dtype=torch.float32, device=device)
        self.cv = torch.zeros(*shape, v_head_dim, dtype=torch.float32, device=device)
        self.valid = torch.zeros(num_layers, self.num_pages, self.cpp, dtype=torch.bool,
                                 device=device)
        # layer -> (wk, bk, wv, bv) for learned compression; absent = MEAN
        self.weights = weights or {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ck, self.cv, self.valid))

    def invalidate(self, slots: torch.Tensor) -> None:
        """Forget every entry of the pages that `slots` (KV writes of this forward) touch."""
        if slots.numel():
            self.valid[:, torch.unique(slots.long() // self.page_size)] = False

    def committed(self, layer: int, row: torch.Tensor, prefix: int, k_buf: torch.Tensor,
                  v_buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed tokens 0..num_cmp(prefix)-1 of one request, whose positions map to KV slots
        through `row` (its req_to_token row). Missing entries are computed and stored."""
        p = self.params
        ncc = p.num_cmp(prefix)
        hkv, dk, dv = self.ck.shape[3], self.ck.shape[4], self.cv.shape[4]
        if ncc == 0:
            dev = self.ck.device
            return (torch.zeros(0, hkv, dk, device=dev), torch.zeros(0, hkv, dv, device=dev))
        dev = row.device
        i = torch.arange(ncc, device=dev)
        close = i * p.stride + p.block - 1
        page = row[close].long() // self.page_size
        lo = (close // self.page_size) * self.page_size - (p.block - 1)
        first = torch.clamp(-((-lo) // p.stride), min=0)                  # ceil(lo / d), >= 0
        idx = i - first
        missing = ~self.valid[layer, page, idx]
        if bool(missing.any()):
            mi = i[missing]
            pos = mi[:, None] * p.stride + torch.arange(p.block, device=dev)[None, :]
            slots = row[pos].long()                                        # [Nm, l]
            wk, bk, wv, bv = self.weights.get(layer, (None, None, None, None))
            self.ck[layer, page[missing], idx[missing]] = compress_blocks(k_buf[slots], wk, bk)
            self.cv[layer, page[missing], idx[missing]] = compress_blocks(v_buf[slots], wv, bv)
            self.valid[layer, page[missing], idx[missing]] = True
        return self.ck[layer, page, idx], self.cv[layer, page, idx]


def shared_on_pool(pool, key: str, make):
    """One object per KV pool and key, made on first use.

    SGLang builds a fresh attention backend for each adaptive runtime state (one per draft
    length, step_policy.py); they all serve the same pool, so they must read and write one
    compressed cache, not one each (that would also double its memory)."""
    cache = pool.__dict__.setdefault("_specsa_shared", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]
