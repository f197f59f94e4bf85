"""Chunked NSA prefill (kernels/prefill/chunked.py) vs the composed fp32 reference."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' @triton.jit

import pytest  # noqa: E402
from conftest import assert_close, poisoned, on_device  # noqa: E402
from test_compress_kernel import DEFAULT, SMALL, learned, make_pool  # noqa: E402

from specsa.kernels.commit.naive import naive_write_cmp  # noqa: E402
from specsa.kernels.compression import compress  # noqa: E402
from specsa.kernels.prefill import chunked_nsa_prefill, naive_nsa_prefill_rows  # noqa: E402
from dataclasses import replace  # noqa: E402

# compiled kernels take device tensors; these tests build CPU ones (conftest.on_device)
chunked_nsa_prefill = on_device(chunked_nsa_prefill)


@pytest.mark.parametrize("params,ps,hkv,g,dim,dtype,lens,prefix,rows,learn", [
    pytest.param(SMALL, 16, 2, 1, 64, torch.float32, [120, 70], [96, 0], 10, False, id="small-ps16-G1-fp32-union"),
    pytest.param(replace(SMALL, gated=True), 1, 1, 6, 64, torch.float32, [90], [60], 12, True,
                 id="small-ps1-G6-fp32-gated-learned"),
    pytest.param(SMALL, 16, 1, 4, 128, torch.bfloat16, [150], [100], 8, False, id="small-ps16-G4-bf16-union"),
    pytest.param(DEFAULT, 64, 1, 4, 64, torch.float32, [1100], [1090], 4, False, id="default-ps64-G4-fp32-ctx1100"),
])
def test_chunked_prefill(params, ps, hkv, g, dim, dtype, lens, prefix, rows, learn):
    cw = learned(hkv, params.block, dim) if learn else None
    pool = make_pool(lens, ps, hkv, dim, dtype, params, fill_cmp=False)
    wk, bk, wv, bv = cw if cw is not None else (None,) * 4
    for b, p in enumerate(prefix):   # compressed tokens of the prefix exist; the chunk's do not
        nc = params.num_cmp(p)
        ck = compress(pool["k"][b], params, wk, bk)[:nc]
        cv = compress(pool["v"][b], params, wv, bv)[:nc]
        naive_write_cmp(pool["ck_cache"], pool["cv_cache"], pool["block_table"][b], list(range(nc)),
                        ck, cv, ps, params)
    hq, scale = hkv * g, dim ** -0.5
    q_req, q_pos = [], []
    for b, (p, n) in enumerate(zip(prefix, lens)):
        pos = sorted(set(torch.randint(p, n, (rows,)).tolist()) | {n - 1})
        q_req += [b] * len(pos)
        q_pos += pos
    nq = len(q_pos)
    q = torch.randn(nq, hq, dim).to(dtype)
    gates = torch.rand(nq, hq, 3) if params.gated else None
    out = poisoned(nq, hq, dim, dtype=dtype)
    sel = torch.full((nq, hkv, params.topn), -7, dtype=torch.int32)
    q_req_t = torch.tensor(q_req, dtype=torch.int32)
    chunked_nsa_prefill(q, pool["k_cache"], pool["v_cache"], pool["ck_cache"], pool["cv_cache"],
                        pool["block_table"], q_req_t, torch.tensor(q_pos, dtype=torch.int32),
                        torch.tensor(prefix, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                        params, scale, cw=cw, gates=gates, out=out, sel=sel, compress_programs=2)
    for b in range(len(lens)):
        rr = (q_req_t == b).nonzero().squeeze(1)
        o_ref, s_ref = naive_nsa_prefill_rows(q[rr].float(), pool["k"][b], pool["v"][b],
                                              [q_pos[i] for i in rr.tolist()], params, scale, cw,
                                              None if gates is None else gates[rr])
        same = (sel[rr] == s_ref.to(torch.int32)).all(-1).all(-1)                  # [rows]
        if dtype == torch.float32:
            assert bool(same.all()), f"request {b}: selection differs at rows {(~same).nonzero().tolist()}"
        else:   # bf16 compressed cache vs fp32 reference compression: allow rare flips
            assert same.float().mean() >= 0.75, f"request {b}: too many selection flips"
        assert_close(out[rr][same], o_ref[same], dtype, f"prefill out request {b}")


# ---- the tiled path (refresh tiles + sparse free blocks + tile kernel) on whole chunks ------
def _fill_prefix_cmp(pool, prefix, params, ps, cw):
    wk, bk, wv, bv = cw if cw is not None else (None,) * 4
    for b, p in enumerate(prefix):   # compressed tokens of the prefix exist; the chunk's do not
        nc = params.num_cmp(p)
        ck = compress(pool["k"][b], params, wk, bk)[:nc]
        cv = compress(pool["v"][b], params, wv, bv)[:nc]
        naive_write_cmp(pool["ck_cache"], pool["cv_cache"], pool["block_table"][b], list(range(nc)),
                        ck, cv, ps, params)


def _run_chunk(params, ps, hkv, g, dim, dtype, lens, prefix, learn, **kw):
    """Every row prefix[b]..lens[b]-1 of every request in one chunk (fresh random inputs,
    outputs NaN-poisoned) -> (q, gates, out, sel, q_req, q_pos, pool, cw)."""
    cw = learned(hkv, params.block, dim) if learn else None
    pool = make_pool(lens, ps, hkv, dim, dtype, params, fill_cmp=False)
    _fill_prefix_cmp(pool, prefix, params, ps, cw)
    hq = hkv * g
    q_req = [b for b, (p, n) in enumerate(zip(prefix, lens)) for _ in range(p, n)]
    q_pos = [t for p, n in zip(prefix, lens) for t in range(p, n)]
    nq = len(q_pos)
    q = torch.randn(nq, hq, dim).to(dtype)
    gates = torch.rand(nq, hq, 3) if params.gated else None
    out = poisoned(nq, hq, dim, dtype=dtype)
    sel = torch.full((nq, hkv, params.topn), -7, dtype=torch.int32)
    q_req_t = torch.tensor(q_req, dtype=torch.int32)
    q_pos_t = torch.tensor(q_pos, dtype=torch.int32)
    chunked_nsa_prefill(q, pool["k_cache"], pool["v_cache"], pool["ck_cache"], pool["cv_cache"],
                        pool["block_table"], q_req_t, q_pos_t, torch.tensor(prefix, dtype=torch.int32),
                        torch.tensor(lens, dtype=torch.int32), params, dim ** -0.5, cw=cw,
                        gates=gates, out=out, sel=sel, **kw)
    return q, gates, out, sel, q_req_t, q_pos, pool, cw


def _check_vs_reference(params, dim, dtype, lens, q, gates, out, sel, q_req_t, q_pos, pool, cw):
    for b in range(len(lens)):
        rr = (q_req_t == b).nonzero().squeeze(1)
        o_ref, s_ref = naive_nsa_prefill_rows(q[rr].float(), pool["k"][b], pool["v"][b],
                                              [q_pos[i] for i in rr.tolist()], params, dim ** -0.5,
                                              cw, None if gates is None else gates[rr])
        same = (sel[rr] == s_ref.to(torch.int32)).all(-1).all(-1)
        if dtype == torch.float32:
            assert bool(same.all()), f"request {b}: selection differs at rows {(~same).nonzero().tolist()}"
        else:
            assert same.float().mean() >= 0.75, f"request {b}: too many selection flips"
        assert_close(out[rr][same], o_ref[same], dtype, f"prefill out request {b}")


# n=6 leaves 3 free slots; window 16 < 2 local blocks of 16 (local tokens outside the window)
SMALL6 = replace(SMALL, topn=6)
NARROW = replace(SMALL, topn=6, window=16)


@pytest.mark.parametrize("params,ps,hkv,g,dim,dtype,lens,prefix,learn,kw", [
    pytest.param(SMALL, 16, 2, 1, 32, torch.float32, [61, 45], [0, 13], False, {},
                 id="small-ps16-G1-union-2req"),
    pytest.param(SMALL6, 1, 1, 4, 32, torch.float32, [150], [90], False,
                 dict(tile_rows=16, item_rows=16, group_size=3, pass_rows=20),
                 id="n6-ps1-G4-union-passes"),
    pytest.param(replace(SMALL6, gated=True), 16, 1, 6, 32, torch.float32, [77, 130], [40, 101], True,
                 dict(tile_rows=24, item_rows=12), id="n6-ps16-G6-gated-learned-2req"),
    pytest.param(NARROW, 16, 2, 4, 32, torch.float32, [120], [64], False,
                 dict(tile_rows=32, item_rows=8, group_size=5), id="narrow-window-G4-union"),
    pytest.param(replace(NARROW, gated=True), 1, 1, 4, 32, torch.float32, [96, 30, 70], [50, 0, 69], False,
                 dict(pass_rows=16), id="narrow-window-G4-gated-3req"),
    pytest.param(SMALL6, 16, 1, 4, 64, torch.bfloat16, [140], [70], True, {}, id="n6-ps16-G4-bf16-learned"),
])
def test_chunked_prefill_tiles(params, ps, hkv, g, dim, dtype, lens, prefix, learn, kw):
    res = _run_chunk(params, ps, hkv, g, dim, dtype, lens, prefix, learn, **kw)
    _check_vs_reference(params, dim, dtype, lens, *res)


def test_chunked_prefill_tiles_match_rows():
    """The tiled path and the per-row path give the same selections and outputs (fp32)."""
    params, ps, hkv, g, dim = replace(SMALL6, window=24), 16, 2, 4, 32
    lens, prefix = [200, 90], [120, 33]
    res = _run_chunk(params, ps, hkv, g, dim, torch.float32, lens, prefix, False, item_rows=32)
    q, gates, out, sel, q_req_t, q_pos, pool, cw = res
    out_r = poisoned(*out.shape)
    sel_r = torch.full_like(sel, -7)
    chunked_nsa_prefill(q, pool["k_cache"], pool["v_cache"], pool["ck_cache"], pool["cv_cache"],
                        pool["block_table"], q_req_t, torch.tensor(q_pos, dtype=torch.int32),
                        torch.tensor(prefix, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                        params, dim ** -0.5, out=out_r, sel=sel_r, impl="rows")
    assert torch.equal(sel, sel_r)
    assert_close(out, out_r, torch.float32, "tiles vs rows")


def test_row_tiles():
    from specsa.kernels.prefill.chunked import row_tiles
    order, gs, gl = row_tiles(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2], dtype=torch.int32), 3, 2)
    assert order.tolist() == list(range(9))
    assert gs.shape[0] == 5 + 3
    assert [(s, n) for s, n in zip(gs.tolist(), gl.tolist()) if n] == [(0, 2), (2, 1), (3, 2), (5, 2), (7, 1), (8, 1)]
