"""Paged raw KV cache + compressed KV cache stored per KV page (docs/CONTRACTS.md section 4).

Per layer: `k_cache(layer), v_cache(layer)`: [num_pages, page_size, Hkv, D]; token position p
of a request lives at page `block_table[p // page_size]`, offset `p % page_size`.
`ck_cache(layer), cv_cache(layer)`: [num_pages, CPP, Hkv, D], CPP = ceil(page_size / d);
compressed token i (closing at e = i*d + l - 1) lives in the page holding e, at index
i - first_cmp_in_page(e // page_size). A compressed token is written only once all l of its
tokens are committed, so a request of length P always holds exactly num_cmp(P) of them.

All layers live in one tensor [L, num_pages, ...] so that a commit writes every layer with
one indexed copy; the per-layer accessors return views with the contract's layout.

The model's forward writes nothing here: it returns a `PendingKV` and the runtime calls
`commit(rid, pending, accepted_nodes)` (the fused refresh/reuse step of docs/DESIGN.md section 3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specsa.config import CacheConfig
from specsa.kernels.common.params import NSAParams


class CacheError(RuntimeError):
    """Misuse of the cache (unknown request, stale pending KV, bad path)."""


class CacheFullError(CacheError):
    """Not enough free pages; the message gives the sizes involved."""


@dataclass(frozen=True)
class BlockMeta:
    """Where one request's new block sits inside a `PendingKV`.

    offset: first row of the request's nodes in PendingKV.k/v (rows offset..offset+n-1).
    prefix_len: committed length P when the forward ran (positions = P + depth).
    parents: parent of each node within the block (-1 = child of the committed context).
    cmp_offset: first row of the request's provisional compressed tokens in PendingKV.ck/cv.
    close_nodes: node whose position closes each provisional compressed token.
    cmp_index: index i of each provisional compressed token.
    """

    offset: int
    prefix_len: int
    parents: tuple[int, ...]
    cmp_offset: int
    close_nodes: tuple[int, ...]
    cmp_index: tuple[int, ...]

    @property
    def num_nodes(self) -> int:
        return len(self.parents)


@dataclass(frozen=True)
class PendingKV:
    """What a forward computed but did not store: for every layer the new tokens' K, V
    ([L, N, Hkv, D]) and the provisional compressed tokens ([L, C, Hkv, D], one per node that
    closes a compression block), plus per-request `BlockMeta` keyed by request id.
    fused: produced by the TRITON path, committed with the fused commit kernel. in_place: rids
    whose block K/V (and compressed tokens) that forward already wrote into their reserved
    page slots beyond the committed length (TRITON prefill chunks): commit only moves the
    length. hidden: [N, Hc] the hidden states the model was asked to capture
    (`NSADecoder.set_hidden_capture`, for EAGLE draft heads), every row even under
    last_only; None when nothing is captured. The cache never reads it."""

    k: torch.Tensor
    v: torch.Tensor
    ck: torch.Tensor
    cv: torch.Tensor
    blocks: dict[int, BlockMeta] = field(default_factory=dict)
    fused: bool = False
    in_place: frozenset[int] = frozenset()
    hidden: torch.Tensor | None = None


@dataclass
class _RequestPages:
    pages: list[int]
    length: int = 0


class PagedKVCache:
    """Raw + compressed paged KV for `num_layers` layers.

    Example (page_size 16, d=16, l=32): a request of 40 tokens holds 3 pages; compressed token
    0 (positions 0..31) closes at 31 and lives in its second page at index 0, token 1
    (16..47) does not exist yet.
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, nsa: NSAParams,
                 cache: CacheConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.nsa, self.page_size, self.num_pages = nsa, cache.page_size, cache.num_pages
        self.cpp = nsa.cmp_per_page(cache.page_size)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (num_layers, cache.num_pages, cache.page_size, num_kv_heads, head_dim)
        cshape = (num_layers, cache.num_pages, self.cpp, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.ck = torch.zeros(cshape, dtype=dtype, device=self.device)
        self.cv = torch.zeros(cshape, dtype=dtype, device=self.device)
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(cache.num_pages - 1, -1, -1))
        self._reqs: dict[int, _RequestPages] = {}

    # -- contract views -------------------------------------------------------------------
    def k_cache(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.v[layer]

    def ck_cache(self, layer: int) -> torch.Tensor:
        return self.ck[layer]

    def cv_cache(self, layer: int) -> torch.Tensor:
        return self.cv[layer]

    # -- bookkeeping ----------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def requests(self) -> list[int]:
        return list(self._reqs)

    def has(self, rid: int) -> bool:
        return rid in self._reqs

    def add_request(self, rid: int) -> None:
        if rid in self._reqs:
            raise CacheError(f"request {rid} is already in the cache")
        self._reqs[rid] = _RequestPages(pages=[])

    def _req(self, rid: int) -> _RequestPages:
        try:
            return self._reqs[rid]
        except KeyError:
            raise CacheError(f"request {rid} is not in the cache") from None

    def length(self, rid: int) -> int:
        return self._req(rid).length

    def block_table(self, rid: int) -> list[int]:
        return list(self._req(rid).pages)

    def block_table_tensor(self, rids: list[int]) -> torch.Tensor:
        """[B, max_pages] int32 on the cache device, -1 padded."""
        tables = [self._req(r).pages for r in rids]
        width = max((len(t) for t in tables), default=0)
        out = torch.full((len(rids), width), -1, dtype=torch.int32)
        for i, t in enumerate(tables):
            out[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        return out.to(self.device)

    def check_fits(self, total_tokens: int, what: str = "request") -> None:
        """Raise if `total_tokens` could never fit, even in an empty cache."""
        need = -(-total_tokens // self.page_size)
        if need > self.num_pages:
            raise CacheFullError(
                f"{what} needs {total_tokens} tokens = {need} pages of {self.page_size}, but the "
                f"cache has only {self.num_pages} pages ({self.capacity_tokens} tokens)")

    def reserve(self, rid: int, new_len: int) -> None:
        """Allocate pages so that positions < new_len have a slot."""
        req = self._req(rid)
        need = -(-new_len // self.page_size) - len(req.pages)
        if need <= 0:
            return
        if need > len(self._free):
            raise CacheFullError(
                f"KV cache full: request {rid} needs {need} more pages of {self.page_size} tokens "
                f"to reach {new_len} tokens, but only {len(self._free)} of {self.num_pages} pages "
                f"are free (capacity {self.capacity_tokens} tokens)")
        req.pages.extend(self._free.pop() for _ in range(need))

    def free_request(self, rid: int) -> None:
        req = self._reqs.pop(rid, None)
        if req is None:
            raise CacheError(f"request {rid} is not in the cache")
        self._free.extend(reversed(req.pages))

    def rollback(self, rid: int, new_len: int) -> None:
        """Truncate to `new_len` tokens: whole pages past it go back to the free list, and the
        compressed tokens that close at or after new_len stop existing (length bookkeeping:
        num_cmp(new_len) of them remain valid)."""
        req = self._req(rid)
        if not 0 <= new_len <= req.length:
            raise CacheError(f"rollback of request {rid} to {new_len} tokens: must be in "
                             f"[0, {req.length}]")
        keep = -(-new_len // self.page_size)
        self._free.extend(reversed(req.pages[keep:]))
        del req.pages[keep:]
        req.length = new_len

    # -- addressing -----------------------------------------------------------------------
    def _pages_tensor(self, rid: int) -> torch.Tensor:
        return torch.tensor(self._req(rid).pages, dtype=torch.int64)

    def slots(self, rid: int, positions: torch.Tensor) -> torch.Tensor:
        """Flat raw-KV slot (page * page_size + offset) of each position, int64 on device."""
        pos = positions.to("cpu", torch.int64)
        pages = self._pages_tensor(rid)
        return (pages[pos // self.page_size] * self.page_size + pos % self.page_size).to(self.device)

    def cmp_slots(self, rid: int, cmp_index: torch.Tensor) -> torch.Tensor:
        """Flat compressed slot (page * CPP + index in page) of compressed tokens `cmp_index`."""
        idx = cmp_index.to("cpu", torch.int64)
        p = self.nsa
        lp = (idx * p.stride + p.block - 1) // self.page_size                  # logical page
        lo = lp * self.page_size - (p.block - 1)
        first = torch.clamp(-torch.div(-lo, p.stride, rounding_mode="floor"), min=0)
        pages = self._pages_tensor(rid)
        return (pages[lp] * self.cpp + idx - first).to(self.device)

    # -- reads ----------------------------------------------------------------------------
    def committed_slots(self, rid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw slots [P], compressed slots [num_cmp(P)]) of the committed context; computed
        once per forward and reused by every layer's `gather`."""
        P = self.length(rid)
        return (self.slots(rid, torch.arange(P)),
                self.cmp_slots(rid, torch.arange(self.nsa.num_cmp(P))))

    def gather(self, layer: int, kv_slots: torch.Tensor, cmp_slots: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v [P, Hkv, D] and ck, cv [Nc, Hkv, D] of layer at the given slots (copies)."""
        return (self._flat(self.k, layer)[kv_slots], self._flat(self.v, layer)[kv_slots],
                self._flat(self.ck, layer)[cmp_slots], self._flat(self.cv, layer)[cmp_slots])

    def committed_kv(self, rid: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions 0..P-1: [P, Hkv, D] each."""
        kv, cs = self.committed_slots(rid)
        return self.gather(layer, kv, cs)[:2]

    def committed_cmp(self, rid: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Committed compressed K, V: [num_cmp(P), Hkv, D] each."""
        kv, cs = self.committed_slots(rid)
        return self.gather(layer, kv, cs)[2:]

    def _flat(self, t: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        if layer is None:
            return t.view(t.shape[0], -1, self.num_kv_heads, self.head_dim)
        return t[layer].view(-1, self.num_kv_heads, self.head_dim)

    # -- writes ---------------------------------------------------------------------------
    def append(self, rid: int, k: torch.Tensor, v: torch.Tensor, ck: torch.Tensor,
               cv: torch.Tensor) -> None:
        """Append m tokens at positions P..P+m-1 for every layer (k, v: [L, m, Hkv, D]) and the
        compressed tokens closing at those positions, in index order (ck, cv: [L, c, Hkv, D],
        c = num_cmp(P+m) - num_cmp(P))."""
        req = self._req(rid)
        P, m = req.length, k.shape[1]
        first, last = self.nsa.num_cmp(P), self.nsa.num_cmp(P + m)
        if ck.shape[1] != last - first:
            raise CacheError(f"append to request {rid}: {m} tokens after {P} close "
                             f"{last - first} compressed tokens, got {ck.shape[1]}")
        if m == 0:
            return
        self.reserve(rid, P + m)
        slots = self.slots(rid, torch.arange(P, P + m))
        self._flat(self.k)[:, slots] = k.to(self.dtype)
        self._flat(self.v)[:, slots] = v.to(self.dtype)
        if last > first:
            cs = self.cmp_slots(rid, torch.arange(first, last))
            self._flat(self.ck)[:, cs] = ck.to(self.dtype)
            self._flat(self.cv)[:, cs] = cv.to(self.dtype)
        req.length = P + m

    def commit(self, rid: int, pending: PendingKV, accepted_nodes: list[int] | None = None) -> int:
        """Store the accepted path of request `rid`'s block from `pending` (no recomputation):
        its nodes' K/V at consecutive positions P.. and the provisional compressed tokens that
        close on it. `accepted_nodes` is a root-to-leaf path of block-local node indices
        (None: the whole block, which must then be a chain). Rejected nodes leave no trace.
        Returns the number of tokens committed."""
        meta = pending.blocks.get(rid)
        if meta is None:
            raise CacheError(f"commit: request {rid} has no block in this PendingKV")
        req = self._req(rid)
        if req.length != meta.prefix_len:
            raise CacheError(f"commit: stale PendingKV for request {rid} (computed at length "
                             f"{meta.prefix_len}, cache now holds {req.length})")
        path = list(range(meta.num_nodes)) if accepted_nodes is None else list(accepted_nodes)
        _check_path(path, meta.parents, rid)
        if rid in pending.in_place:
            # K/V and compressed tokens of positions P..P+len(path)-1 are already in place;
            # pages past the kept length go back (a truncated chunk leaves no trace)
            keep = -(-(req.length + len(path)) // self.page_size)
            self._free.extend(reversed(req.pages[keep:]))
            del req.pages[keep:]
            req.length += len(path)
            return len(path)
        if pending.fused:
            self._commit_fused(rid, pending, meta, path)
            return len(path)
        rows = torch.tensor([meta.offset + u for u in path], dtype=torch.int64,
                            device=pending.k.device)
        close = {u: meta.cmp_offset + j for j, u in enumerate(meta.close_nodes)}
        crow = torch.tensor([close[u] for u in path if u in close], dtype=torch.int64,
                            device=pending.k.device)
        self.append(rid, pending.k[:, rows], pending.v[:, rows], pending.ck[:, crow],
                    pending.cv[:, crow])
        return len(path)


    def _commit_fused(self, rid: int, pending: PendingKV, meta: BlockMeta, path: list[int]) -> None:
        """`fused_commit` for every layer in one launch: layer l is request row l of a block
        table over the [L * num_pages] page pool, its tail / provisional rows offset by l."""
        from specsa.kernels.commit import fused_commit

        req = self._req(rid)
        P, a = req.length, len(path)
        self.reserve(rid, P + a)
        L, N, C = pending.k.shape[0], pending.k.shape[1], pending.ck.shape[1]
        dev = self.device
        lay = torch.arange(L, dtype=torch.int64)
        pages = torch.tensor(req.pages, dtype=torch.int64)
        bt = (pages[None, :] + lay[:, None] * self.num_pages).to(torch.int32)
        rows = torch.tensor([meta.offset + u for u in path], dtype=torch.int64)
        close = {u: meta.cmp_offset + j for j, u in enumerate(meta.close_nodes)}
        crow = torch.tensor([close[u] for u in path if u in close], dtype=torch.int64)
        cidx = torch.zeros(max(C, 1), dtype=torch.int32)
        for u, i in zip(meta.close_nodes, meta.cmp_index):
            cidx[close[u]] = i
        hkv, d = self.num_kv_heads, self.head_dim
        pool = (L * self.num_pages, -1, hkv, d)
        prov_k = pending.ck.reshape(L * C, hkv, d) if C else pending.k.new_zeros(L, hkv, d)
        prov_v = pending.cv.reshape(L * C, hkv, d) if C else pending.v.new_zeros(L, hkv, d)
        fused_commit(self.k.view(pool), self.v.view(pool), self.ck.view(pool), self.cv.view(pool),
                     bt.to(dev), torch.full((L,), P, dtype=torch.int32, device=dev),
                     pending.k.reshape(L * N, hkv, d), pending.v.reshape(L * N, hkv, d),
                     (rows[None, :] + lay[:, None] * N).to(dev),
                     prov_k.contiguous(), prov_v.contiguous(),
                     cidx.repeat(L).to(dev),
                     (crow[None, :] + lay[:, None] * max(C, 1)).to(dev), self.nsa)
        req.length = P + a


def _check_path(path: list[int], parents: tuple[int, ...], rid: int) -> None:
    prev = -1
    for u in path:
        if not 0 <= u < len(parents):
            raise CacheError(f"commit: request {rid}: node {u} is not in the block "
                             f"({len(parents)} nodes)")
        if parents[u] != prev:
            raise CacheError(f"commit: request {rid}: accepted nodes {path} are not a "
                             f"root-to-leaf path (parent of {u} is {parents[u]}, not {prev})")
        prev = u
