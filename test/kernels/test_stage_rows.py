"""stage_rows (kernels/stage/rows.py) vs naive_stage_rows: q / k / v taken as strided views of a
fused QKV projection (as SGLang's attention layers hand them), outputs and pool slots poisoned
with NaN before the run, results bit-identical (the op only copies and casts)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' @triton.jit

import pytest  # noqa: E402
from conftest import DEV  # noqa: E402

from specsa.kernels.stage import naive_stage_rows, stage_rows  # noqa: E402


def _qkv(n, hq, hkv, d, dtype, gen):
    # one [N, (Hq + 2 Hkv) * D] projection, split like a Llama / Qwen2 attention layer does
    w = (hq + 2 * hkv) * d
    qkv = torch.randn(n, w, generator=gen).to(dtype).to(DEV)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.reshape(n, hq, d), k.reshape(n, hkv, d), v.reshape(n, hkv, d)


def _equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("n,hq,hkv,d,dtype,ps", [
    pytest.param(1, 32, 8, 128, torch.bfloat16, 16, id="decode-8b-ps16"),
    pytest.param(4, 32, 8, 128, torch.bfloat16, 16, id="chain4-8b-ps16"),
    pytest.param(6, 4, 1, 64, torch.float32, 1, id="tree-G4-ps1"),
    pytest.param(12, 12, 2, 64, torch.float16, 16, id="G6-ps16"),
    pytest.param(5, 6, 6, 80, torch.float32, 64, id="G1-d80-ps64"),
])
def test_stage_rows_matches_naive(n, hq, hkv, d, dtype, ps):
    gen = torch.Generator().manual_seed(n * 1000 + hq * 10 + d)
    q, k, v = _qkv(n, hq, hkv, d, dtype, gen)
    pool_dtype = dtype
    if n > 1:       # (one row is contiguous whatever its stride)
        assert not q.is_contiguous() and not k.is_contiguous()      # the case that matters
    pages = 2 + n // ps + 1
    slots = torch.randperm(pages * ps, generator=gen)[:n].to(DEV)   # distinct slots
    k_pool = torch.full((pages * ps, hkv, d), float("nan"), dtype=pool_dtype, device=DEV)
    v_pool = torch.full_like(k_pool, float("nan"))
    rk_pool, rv_pool = k_pool.clone(), v_pool.clone()
    got = stage_rows(q, k, v, slots, k_pool, v_pool)
    want = naive_stage_rows(q, k, v, slots, rk_pool, rv_pool)
    for g, w in zip(got, want):
        assert g.is_contiguous() and _equal(g, w)
    assert got[1].dtype == pool_dtype
    # the stored slots hold the rows, every other slot is untouched (still NaN)
    assert torch.equal(torch.nan_to_num(k_pool, nan=7.0).cpu(), torch.nan_to_num(rk_pool, nan=7.0).cpu())
    assert torch.equal(torch.nan_to_num(v_pool, nan=7.0).cpu(), torch.nan_to_num(rv_pool, nan=7.0).cpu())
    untouched = torch.ones(pages * ps, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.isnan(k_pool.cpu()[untouched].float()).all()
    assert not torch.isnan(k_pool.cpu()[slots.cpu()].float()).any()


def test_stage_rows_without_store_and_empty():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(3, 8, 2, 32, torch.float32, gen)
    qc, kc, vc = stage_rows(q, k, v)
    assert _equal(qc, q.contiguous()) and _equal(kc, k.contiguous()) and _equal(vc, v.contiguous())
    q0, k0, v0 = _qkv(0, 8, 2, 32, torch.float32, gen)
    assert [t.shape[0] for t in stage_rows(q0, k0, v0)] == [0, 0, 0]


def test_stage_rows_rejects_bad_shapes():
    gen = torch.Generator().manual_seed(6)
    q, k, v = _qkv(2, 8, 2, 32, torch.float32, gen)
    pool = torch.zeros(16, 2, 32, device=DEV)
    with pytest.raises(ValueError, match="Hkv <= Hq"):
        stage_rows(k, q, q)
    with pytest.raises(ValueError, match="needs k_pool"):
        stage_rows(q, k, v, torch.zeros(2, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="loc"):
        stage_rows(q, k, v, torch.zeros(3, dtype=torch.int64, device=DEV), pool, pool)
    with pytest.raises(ValueError, match="contiguous"):
        stage_rows(q, k, v, torch.zeros(2, dtype=torch.int64, device=DEV), pool[:, :1], pool)
    with pytest.raises(ValueError, match="pool's dtype"):
        stage_rows(q, k, v, torch.zeros(2, dtype=torch.int64, device=DEV), pool.half(), pool)
    with pytest.raises(ValueError, match="head dim"):
        stage_rows(torch.randn(2, 8, 64, device=DEV)[..., ::2], k, v)
