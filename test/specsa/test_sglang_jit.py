"""Start-up compile of SGLang's KV-move kernel for trees (jit_warmup.py) and the compile log
(jit_log.py). The GPU side (no compile inside the measured window) is in the e2e benchmark's
`jit_compiles` rows; here: the variants chosen, what the warm-up touches, the log's records."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from specsa.sglang_plugin.jit_log import JitLog, read_jit_log
from specsa.sglang_plugin.jit_warmup import (move_kernel_counts, warm_kv_move,
                                             warm_tree_step_kernels)


def _key(n: int):
    # SGLang passes next_power_of_2(N) as a constexpr and N as an int that Triton specialises
    # on N == 1 and N % 16 == 0
    return (1 << (n - 1).bit_length(), "one" if n == 1 else "d16" if n % 16 == 0 else "any")


@pytest.mark.parametrize("limit", [1, 7, 48, 256])
def test_move_counts_cover_every_variant_once(limit):
    counts = move_kernel_counts(limit)
    assert counts == sorted(set(counts)) and all(1 <= n <= limit for n in counts)
    keys = [_key(n) for n in counts]
    assert len(set(keys)) == len(keys)                               # one launch per variant
    assert set(keys) == {_key(n) for n in range(1, limit + 1)}       # every variant
    assert move_kernel_counts(0) == []


class _Pool:
    """SGLang's MHATokenToKVPool move interface, recording what the warm-up moves."""

    def __init__(self, cap=256, **flags):
        self._kv_copy_config = {"num_locs_upper": cap}
        self.k_buffer = [torch.randn(40, 2, 8) for _ in range(3)]
        self.v_buffer = [torch.randn(40, 2, 8) for _ in range(3)]
        self.calls = []
        for k, v in flags.items():
            setattr(self, k, v)

    def move_kv_cache(self, tgt, src):
        self.calls.append((tgt.clone(), src.clone()))
        for kb, vb in zip(self.k_buffer, self.v_buffer):
            kb[tgt] = kb[src]
            vb[tgt] = vb[src]


def test_warm_kv_move_touches_only_the_padding_slot():
    pool = _Pool(cap=64)
    before = [b.clone() for b in pool.k_buffer + pool.v_buffer]
    n, secs = warm_kv_move(pool)
    assert n == len(move_kernel_counts(64)) == len(pool.calls) and secs >= 0
    assert [c[0].numel() for c in pool.calls] == move_kernel_counts(64)
    assert all(int(t.abs().sum()) == 0 and int(s.abs().sum()) == 0 for t, s in pool.calls)
    assert all(torch.equal(a, b) for a, b in zip(before, pool.k_buffer + pool.v_buffer))
    assert warm_kv_move(_Pool(cap=64), limit=5)[0] == len(move_kernel_counts(5))


@pytest.mark.parametrize("pool", [SimpleNamespace(),                 # no tiled move at all
                                  _Pool(use_hnd=True), _Pool(use_native_move_kv_cache=True)])
def test_warm_kv_move_skips_pools_without_the_tiled_kernel(pool):
    assert warm_kv_move(pool) == (0, 0.0)
    assert not getattr(pool, "calls", [])


@pytest.mark.parametrize("topk,device,expect", [(2, "cuda", True), (1, "cuda", False),
                                                (2, "cpu", False)])
def test_tree_warmup_runs_for_trees_on_cuda_only(topk, device, expect):
    pool, draft_pool = _Pool(cap=16), _Pool(cap=8)
    worker = SimpleNamespace(
        server_args=SimpleNamespace(speculative_eagle_topk=topk, device=device),
        target_worker=SimpleNamespace(model_runner=SimpleNamespace(token_to_kv_pool=pool)),
        _draft_worker=SimpleNamespace(draft_runner=SimpleNamespace(token_to_kv_pool=draft_pool)))
    warm_tree_step_kernels(worker)
    assert bool(pool.calls) == expect
    # the draft's pool (branch tail copies) is warmed too, with its own cap
    assert [c[0].numel() for c in draft_pool.calls] == (move_kernel_counts(8) if expect else [])


def test_jit_log_records_each_compile_and_chains_hooks(tmp_path):
    from triton import knobs
    rt = knobs.runtime
    seen = []
    old = rt.jit_cache_hook, rt.jit_post_compile_hook
    rt.jit_cache_hook = lambda **kw: seen.append("before") or False
    rt.jit_post_compile_hook = lambda **kw: seen.append("after")
    try:
        log = JitLog(str(tmp_path / "sub" / "jit.jsonl"))
        fn = SimpleNamespace(module="pkg.mod", name="kern")
        kw = dict(repr="kern[...]", fn=fn, is_manual_warmup=False, already_compiled=False,
                  compile={"constants": {(3,): 16, (4,): torch.float32},
                           "signature": {"x": "*fp32"}})
        for key in ("k1", "k2"):
            # False: the log must never tell Triton to skip a compile
            assert rt.jit_cache_hook(key=key, **kw) is False
            rt.jit_post_compile_hook(key=key, **kw)
        recs = read_jit_log(log.path)
        assert [r["kernel"] for r in recs] == ["pkg.mod.kern"] * 2
        assert all(r["ms"] is not None and r["ms"] >= 0 and not r["warmup"] for r in recs)
        assert recs[0]["constexprs"] == {"(3,)": 16, "(4,)": "torch.float32"}
        json.dumps(recs)
        assert seen == ["before", "after"] * 2                   # earlier hooks still run
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = old
    assert read_jit_log(tmp_path / "missing.jsonl") == []


def test_sync_debug_records_each_site_with_its_stack(tmp_path):
    """SPECSA_SYNC_DEBUG (sync_debug.py): torch's sync warnings inside a step are recorded per
    call site with the stack that raised them; other warnings pass through; the file holds the
    counts. (On CUDA torch raises the warnings; here the test raises the same text.)"""
    import warnings

    from specsa.sglang_plugin.sync_debug import SyncDebug
    dbg = SyncDebug(str(tmp_path / "s" / "syncs.json"), every_s=0.0, cuda=False)

    def sync_here():
        warnings.warn("called a synchronizing CUDA operation", UserWarning)

    for _ in range(3):
        with dbg.step():
            sync_here()
            sync_here()
    with pytest.warns(DeprecationWarning, match="unrelated"):
        with dbg.step():
            warnings.warn("unrelated", DeprecationWarning)
    out = json.loads((tmp_path / "s" / "syncs.json").read_text())
    assert out["steps"] == 4
    assert len(out["sites"]) == 1 and out["sites"][0]["count"] == 6
    assert "sync_here" in out["sites"][0]["where"]
    assert any("test_sync_debug_records" in f for f in out["sites"][0]["stack"])
