"""Triton compression (kernels/compression/blocks.py) vs the fp32 reference (naive.py)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' @triton.jit

import pytest  # noqa: E402
from conftest import assert_close, poisoned, on_device  # noqa: E402

from specsa.kernels.commit.naive import naive_read_cmp, naive_write_cmp, naive_write_kv  # noqa: E402
from specsa.kernels.common.params import NSAParams  # noqa: E402
from specsa.kernels.compression import compress, compress_blocks, compress_gather, compress_paged  # noqa: E402

# compiled kernels take device tensors; these tests build CPU ones (conftest.on_device)
compress_gather = on_device(compress_gather)
compress_paged = on_device(compress_paged)

SMALL = NSAParams(block=8, stride=4, select=16, topn=4, window=32)
DEFAULT = NSAParams()


def make_pool(lens, page_size, hkv, dim, dtype, params, extra=0, cw=None, fill_cmp=True):
    """Random paged pool holding requests of the given lengths (pages shuffled, `extra` spare
    positions per request mapped too). Returns a dict: caches, block_table, fp32 sequences."""
    pages_per = [-(-(n + extra) // page_size) for n in lens]
    perm = torch.randperm(sum(pages_per) + 2).to(torch.int32)
    bt = torch.zeros(len(lens), max(pages_per), dtype=torch.int32)
    at = 0
    for b, n in enumerate(pages_per):
        bt[b, :n] = perm[at:at + n]
        at += n
    npages = sum(pages_per) + 2
    cpp = params.cmp_per_page(page_size)
    pool = dict(k_cache=poisoned(npages, page_size, hkv, dim, dtype=dtype),
                v_cache=poisoned(npages, page_size, hkv, dim, dtype=dtype),
                ck_cache=poisoned(npages, cpp, hkv, dim, dtype=dtype),
                cv_cache=poisoned(npages, cpp, hkv, dim, dtype=dtype), block_table=bt,
                k=[], v=[])
    for b, n in enumerate(lens):
        k = torch.randn(n, hkv, dim).to(dtype).float()
        v = torch.randn(n, hkv, dim).to(dtype).float()
        naive_write_kv(pool["k_cache"], pool["v_cache"], bt[b], 0, k, v)
        pool["k"].append(k)
        pool["v"].append(v)
        if fill_cmp:
            wk, bk, wv, bv = cw if cw is not None else (None,) * 4
            ck, cv = compress(k, params, wk, bk), compress(v, params, wv, bv)
            naive_write_cmp(pool["ck_cache"], pool["cv_cache"], bt[b], list(range(ck.shape[0])),
                            ck, cv, page_size, params)
    return pool


def learned(hkv, l, dim, bias=True):
    w = [torch.randn(hkv, l) / l for _ in range(2)]
    b = [torch.randn(hkv, dim) * 0.1 if bias else None for _ in range(2)]
    return (w[0], b[0], w[1], b[1])


@pytest.mark.parametrize("params,lens,old,ps,hkv,dim,dtype,mode", [
    pytest.param(SMALL, [37, 70, 8], [0, 50, 7], 16, 2, 64, torch.float32, "mean", id="small-ps16-fp32-mean"),
    pytest.param(SMALL, [29, 61], [3, 33], 1, 1, 64, torch.bfloat16, "learned", id="small-ps1-bf16-learned"),
    pytest.param(SMALL, [130, 9], [100, 0], 64, 2, 128, torch.float16, "nobias", id="small-ps64-fp16-nobias"),
    pytest.param(DEFAULT, [300, 95], [0, 40], 16, 1, 128, torch.bfloat16, "learned", id="default-ps16-bf16"),
])
def test_compress_paged(params, lens, old, ps, hkv, dim, dtype, mode):
    cw = None if mode == "mean" else learned(hkv, params.block, dim, bias=(mode == "learned"))
    pool = make_pool(lens, ps, hkv, dim, dtype, params, fill_cmp=False)
    compress_paged(pool["k_cache"], pool["v_cache"], pool["ck_cache"], pool["cv_cache"],
                   pool["block_table"], torch.tensor(old, dtype=torch.int32),
                   torch.tensor(lens, dtype=torch.int32), params, cw=cw, num_programs=2)
    wk, bk, wv, bv = cw if cw is not None else (None,) * 4
    for b, n in enumerate(lens):
        lo, hi = params.num_cmp(old[b]), params.num_cmp(n)
        ref_k = compress(pool["k"][b], params, wk, bk)
        ref_v = compress(pool["v"][b], params, wv, bv)
        got_k = naive_read_cmp(pool["ck_cache"], pool["block_table"][b], hi, ps, params)
        got_v = naive_read_cmp(pool["cv_cache"], pool["block_table"][b], hi, ps, params)
        assert torch.isnan(got_k[:lo].float()).all(), "tokens before num_cmp(old_len) were rewritten"
        if hi > lo:
            assert_close(got_k[lo:], ref_k[lo:hi], dtype, f"ck req {b}")
            assert_close(got_v[lo:], ref_v[lo:hi], dtype, f"cv req {b}")


@pytest.mark.parametrize("ps,dtype,mode", [
    pytest.param(16, torch.float32, "mean", id="ps16-fp32-mean"),
    pytest.param(1, torch.bfloat16, "learned", id="ps1-bf16-learned"),
])
def test_compress_gather(ps, dtype, mode):
    params, hkv, dim = SMALL, 3, 64
    cw = None if mode == "mean" else learned(hkv, params.block, dim)
    pool = make_pool([23, 40], ps, hkv, dim, dtype, params, fill_cmp=False)
    k_tail = torch.randn(11, hkv, dim).to(dtype)
    v_tail = torch.randn(11, hkv, dim).to(dtype)
    nc, l = 5, params.block
    # each row: some committed positions of a request, then tail rows (a path's tail)
    idx = torch.empty(nc, l, dtype=torch.int64)
    ref_k = torch.empty(nc, l, hkv, dim)
    ref_v = torch.empty(nc, l, hkv, dim)
    for c in range(nc):
        b = c % 2
        n_ctx = int(torch.randint(0, l + 1, ()))
        start = int(torch.randint(0, len(pool["k"][b]) - n_ctx + 1, ()))
        rows = torch.randperm(11)[: l - n_ctx]
        pos = torch.arange(start, start + n_ctx)
        slots = pool["block_table"][b].long()[pos // ps] * ps + pos % ps
        idx[c] = torch.cat([slots, -1 - rows])
        ref_k[c] = torch.cat([pool["k"][b][pos], k_tail[rows].float()])
        ref_v[c] = torch.cat([pool["v"][b][pos], v_tail[rows].float()])
    wk, bk, wv, bv = cw if cw is not None else (None,) * 4
    out_k, out_v = poisoned(nc, hkv, dim, dtype=dtype), poisoned(nc, hkv, dim, dtype=dtype)
    compress_gather(pool["k_cache"], pool["v_cache"], k_tail, v_tail, idx, params, cw=cw,
                    out_k=out_k, out_v=out_v)
    assert_close(out_k, compress_blocks(ref_k, wk, bk), dtype, "gather k")
    assert_close(out_v, compress_blocks(ref_v, wv, bv), dtype, "gather v")


def test_compress_rejects_bad_idx():
    pool = make_pool([20], 16, 1, 64, torch.float32, SMALL, fill_cmp=False)
    with pytest.raises(ValueError, match="idx must be"):
        compress_gather(pool["k_cache"], pool["v_cache"], torch.zeros(2, 1, 64), torch.zeros(2, 1, 64),
                        torch.zeros(3, 5, dtype=torch.int64), SMALL)
