"""Paged KV + compressed cache: layout (CONTRACTS.md 4), commit / rollback / free invariants
against a shadow copy, and clear errors."""
from __future__ import annotations

import random

import pytest
import torch

from specsa.config import CacheConfig
from specsa.kernels.common.params import NSAParams
from specsa.kernels.compression.naive import compress
from specsa.model.cache import BlockMeta, CacheError, CacheFullError, PagedKVCache, PendingKV

L, HKV, D = 2, 2, 4


def _cache(page_size, num_pages, params):
    return PagedKVCache(num_layers=L, num_kv_heads=HKV, head_dim=D, nsa=params,
                        cache=CacheConfig(page_size=page_size, num_pages=num_pages))


def _chain_pending(rid, P, k, v, params):
    """A PendingKV for a chain block of len(k[0]) tokens after P, with compressed tokens
    computed from the shadow sequence (what the model would produce)."""
    n = k.shape[1]
    pos = torch.arange(P, P + n)
    e = pos - params.block + 1
    close = ((e >= 0) & (e % params.stride == 0)).nonzero().flatten()
    idx = e[close] // params.stride
    meta = BlockMeta(offset=0, prefix_len=P, parents=tuple(range(-1, n - 1)), cmp_offset=0,
                     close_nodes=tuple(close.tolist()), cmp_index=tuple(idx.tolist()))
    return PendingKV(k=k, v=v, ck=torch.zeros(L, len(close), HKV, D),
                     cv=torch.zeros(L, len(close), HKV, D), blocks={rid: meta}), idx


def _fill_cmp(pending, idx, shadow_k, shadow_v, params):
    for layer in range(L):
        ck, cv = compress(shadow_k[layer], params), compress(shadow_v[layer], params)
        pending.ck[layer] = ck[idx]
        pending.cv[layer] = cv[idx]


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_random_commit_rollback_invariants(page_size):
    params = NSAParams(block=8, stride=4, select=16, topn=4, window=32)
    num_pages = -(-600 // page_size)
    cache = _cache(page_size, num_pages, params)
    rng = random.Random(page_size)
    shadow: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(60):
        op = rng.random()
        if op < 0.15 or not shadow:
            rid = step
            cache.add_request(rid)
            shadow[rid] = (torch.zeros(L, 0, HKV, D), torch.zeros(L, 0, HKV, D))
            continue
        rid = rng.choice(sorted(shadow))
        sk, sv = shadow[rid]
        P = sk.shape[1]
        if op < 0.65:
            n = rng.randint(1, 40)
            if cache.num_free_pages * page_size < n + page_size:
                continue
            k, v = torch.randn(L, n, HKV, D), torch.randn(L, n, HKV, D)
            pending, idx = _chain_pending(rid, P, k, v, params)
            nk, nv = torch.cat([sk, k], 1), torch.cat([sv, v], 1)
            _fill_cmp(pending, idx, nk, nv, params)
            keep = rng.randint(0, n - 1)           # accept a prefix of the chain
            assert cache.commit(rid, pending, list(range(keep + 1))) == keep + 1
            shadow[rid] = (nk[:, :P + keep + 1], nv[:, :P + keep + 1])
        elif op < 0.9:
            new_len = rng.randint(0, P)
            cache.rollback(rid, new_len)
            shadow[rid] = (sk[:, :new_len], sv[:, :new_len])
        else:
            cache.free_request(rid)
            del shadow[rid]
        _check(cache, shadow, params, page_size, num_pages)
    for rid in list(shadow):
        cache.free_request(rid)
    assert cache.num_free_pages == num_pages


def _check(cache, shadow, params, page_size, num_pages):
    used = []
    for rid, (sk, sv) in shadow.items():
        P = sk.shape[1]
        assert cache.length(rid) == P
        pages = cache.block_table(rid)
        assert len(pages) == -(-P // page_size)          # whole pages freed on rollback
        used += pages
        for layer in range(L):
            k, v = cache.committed_kv(rid, layer)
            assert torch.equal(k, sk[layer]) and torch.equal(v, sv[layer])
            ck, cv = cache.committed_cmp(rid, layer)
            assert ck.shape[0] == params.num_cmp(P)
            torch.testing.assert_close(ck, compress(sk[layer], params))
            torch.testing.assert_close(cv, compress(sv[layer], params))
    assert len(used) == len(set(used)), "a page is owned twice"
    assert len(used) + cache.num_free_pages == num_pages, "page leak"


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_compressed_slot_layout(page_size):
    """Token i lives in the page holding e = i*d + l - 1 at i - first_cmp_in_page; slots of
    distinct tokens never collide and stay below CPP."""
    params = NSAParams(block=32, stride=16, select=64, topn=16)
    cache = _cache(page_size, -(-400 // page_size), params)
    cache.add_request(0)
    cache.reserve(0, 400)
    idx = torch.arange(params.num_cmp(400))
    slots = cache.cmp_slots(0, idx)
    pages = cache.block_table(0)
    for i, s in zip(idx.tolist(), slots.tolist()):
        e = i * params.stride + params.block - 1
        lp = e // page_size
        assert s // cache.cpp == pages[lp]
        assert s % cache.cpp == i - params.first_cmp_in_page(lp, page_size)
    assert len(set(slots.tolist())) == len(slots)


def test_errors_name_sizes():
    params = NSAParams(block=8, stride=4, select=16, topn=4, window=32)
    cache = _cache(16, 4, params)
    with pytest.raises(CacheFullError, match=r"65 tokens = 5 pages of 16.*only 4 pages \(64 tokens\)"):
        cache.check_fits(65, "prompt")
    cache.add_request(0)
    cache.reserve(0, 50)
    cache.add_request(1)
    with pytest.raises(CacheFullError, match=r"needs 2 more pages of 16 tokens.*only 0 of 4"):
        cache.reserve(1, 20)
    with pytest.raises(CacheError, match="request 7 is not in the cache"):
        cache.length(7)
    with pytest.raises(CacheError, match="already in the cache"):
        cache.add_request(0)
    k = torch.randn(L, 3, HKV, D)
    pending, _ = _chain_pending(1, 0, k, k, params)
    with pytest.raises(CacheError, match="not a root-to-leaf path"):
        cache.commit(1, pending, [0, 2])
    cache.free_request(0)
    cache.commit(1, pending)
    with pytest.raises(CacheError, match="stale PendingKV"):
        cache.commit(1, pending)
    cache.free_request(1)
    assert cache.num_free_pages == 4
