"""Commit of an accepted draft path, fp32-exact torch reference (copies only, no arithmetic).

Legend: B requests, PS page size, Hkv KV heads, D head dim, Nt draft-tail rows (all tree nodes
of all requests), A accepted-path capacity, Np provisional compressed tokens, C their
per-request capacity, l / d = params.block / stride, CPP = ceil(PS / d).

After verification accepts a root-to-leaf path of a_b nodes for request b (committed length
P_b), the path's K/V go to positions P_b .. P_b + a_b - 1 and the provisional compressed
tokens closed on that path (computed by the verify step from that very path) become committed
compressed tokens (CONTRACTS.md section 4 placement). Nothing is recomputed.
"""
from __future__ import annotations

import torch

from ..common.params import NSAParams


def naive_write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_row: torch.Tensor,
                   start: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k, v [N, Hkv, D] at positions start..start+N-1 of the request whose page table
    row is block_row [max_pages]. k_cache, v_cache: [num_pages, PS, Hkv, D]; # mutable."""
    ps = k_cache.shape[1]
    for j in range(k.shape[0]):
        p = start + j
        pg = int(block_row[p // ps])
        k_cache[pg, p % ps] = k[j].to(k_cache.dtype)
        v_cache[pg, p % ps] = v[j].to(v_cache.dtype)


def naive_read_kv(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """Positions 0..length-1 of one request: [length, Hkv, D] in the cache's dtype."""
    ps = cache.shape[1]
    pos = torch.arange(length)
    pages = block_row.cpu().long()[pos // ps]
    return cache[pages.to(cache.device), (pos % ps).to(cache.device)]


def cmp_location(i: int, page_size: int, params: NSAParams) -> tuple[int, int]:
    """(logical page, slot) of compressed token i: the page holding e = i*d + l - 1."""
    lp = (i * params.stride + params.block - 1) // page_size
    return lp, i - params.first_cmp_in_page(lp, page_size)


def naive_write_cmp(ck_cache: torch.Tensor, cv_cache: torch.Tensor, block_row: torch.Tensor,
                    c_idx: list[int], ck: torch.Tensor, cv: torch.Tensor, page_size: int,
                    params: NSAParams) -> None:
    """Store compressed tokens ck, cv [N, Hkv, D] with indices c_idx into the compressed cache
    [num_pages, CPP, Hkv, D] of one request (KV page size page_size); # mutable."""
    for r, i in enumerate(c_idx):
        lp, s = cmp_location(int(i), page_size, params)
        pg = int(block_row[lp])
        ck_cache[pg, s] = ck[r].to(ck_cache.dtype)
        cv_cache[pg, s] = cv[r].to(cv_cache.dtype)


def naive_read_cmp(ck_cache: torch.Tensor, block_row: torch.Tensor, n: int, page_size: int,
                   params: NSAParams) -> torch.Tensor:
    """Compressed tokens 0..n-1 of one request: [n, Hkv, D] in the cache's dtype."""
    rows = []
    for i in range(n):
        lp, s = cmp_location(i, page_size, params)
        rows.append(ck_cache[int(block_row[lp]), s])
    if not rows:
        return ck_cache.new_zeros(0, *ck_cache.shape[2:])
    return torch.stack(rows)


def naive_commit(k_cache: torch.Tensor, v_cache: torch.Tensor, ck_cache: torch.Tensor,
                 cv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 k_tail: torch.Tensor, v_tail: torch.Tensor, path_rows: torch.Tensor,
                 prov_k: torch.Tensor, prov_v: torch.Tensor, prov_cidx: torch.Tensor,
                 path_cmp: torch.Tensor, params: NSAParams) -> None:
    """Reference of `fused_commit` (same arguments; see kernels/commit/fused.py).

    For each request b: tail rows path_rows[b, j] (j = 0.. until the first -1) go to position
    seq_lens[b] + j; provisional tokens path_cmp[b, c] >= 0 (rows of prov_k/prov_v, compressed
    index prov_cidx[row]) go to their compressed-cache slot. # mutable: the four caches.

    Bytes: reads and writes 2*(a + n_cmp)*Hkv*D elements per request.
    """
    ps = k_cache.shape[1]
    for b in range(block_table.shape[0]):
        rows = [int(r) for r in path_rows[b].tolist()]
        a = rows.index(-1) if -1 in rows else len(rows)
        if a:
            sel = torch.tensor(rows[:a], dtype=torch.int64, device=k_tail.device)
            naive_write_kv(k_cache, v_cache, block_table[b], int(seq_lens[b]), k_tail[sel], v_tail[sel])
        prow = [int(r) for r in path_cmp[b].tolist() if r >= 0]
        if prow:
            sel = torch.tensor(prow, dtype=torch.int64, device=prov_k.device)
            naive_write_cmp(ck_cache, cv_cache, block_table[b], prov_cidx[sel].tolist(),
                            prov_k[sel], prov_v[sel], ps, params)
