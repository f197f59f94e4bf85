"""Unit tests of the SGLang plugin pieces that need no server: NSA settings parsing, the
per-page compressed cache (lazy fill, invalidation on page reuse), tree links, the CPU tree
builder and platform selection."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sglang")
pytestmark = pytest.mark.sglang

from specsa.config import Combine, ConfigError, NSAConfig  # noqa: E402
from specsa.kernels.common.params import NSAParams  # noqa: E402
from specsa.kernels.compression.naive import compress  # noqa: E402


class _Cfg:
    def __init__(self, nsa=None):
        self.nsa = nsa


def test_nsa_settings_precedence(tmp_path):
    from specsa.sglang_plugin.settings import resolve_nsa_config
    ck = {"block": 8, "stride": 4, "select": 16, "topn": 4, "window": 32}
    assert resolve_nsa_config(_Cfg(), env={}) == NSAConfig()
    assert resolve_nsa_config(_Cfg(ck), env={}).block == 8
    cfg = resolve_nsa_config(_Cfg(ck), env={"SPECSA_NSA": "window=64,topn=5"})
    assert (cfg.block, cfg.window, cfg.topn) == (8, 64, 5)
    cfg = resolve_nsa_config(_Cfg(ck), env={"SPECSA_NSA": json.dumps({"window": 48})})
    assert cfg.window == 48
    f = tmp_path / "nsa.json"
    f.write_text(json.dumps({"nsa": {"combine": "gated"}}))
    assert resolve_nsa_config(_Cfg(ck), env={"SPECSA_NSA": str(f)}).combine is Combine.GATED
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_nsa_config(_Cfg(ck), env={"SPECSA_NSA": "blok=8"})
    with pytest.raises(ConfigError, match="stride"):
        resolve_nsa_config(_Cfg({"block": 8, "stride": 3}), env={})


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_paged_compressed_cache_exact_and_invalidated(page_size):
    from specsa.sglang_plugin.compressed_cache import PagedCompressedKV
    params = NSAParams(block=8, stride=4, select=16, topn=4, window=32)
    hkv, d, n = 2, 8, 61
    slots_total = 256
    k_buf, v_buf = torch.randn(slots_total, hkv, d), torch.randn(slots_total, hkv, d)
    # a request whose positions live on scattered pages
    pages = torch.randperm(slots_total // page_size)[: -(-n // page_size)]
    row = (pages[:, None] * page_size + torch.arange(page_size)[None]).reshape(-1)[:n]
    cache = PagedCompressedKV(1, slots_total, page_size, params, hkv, d, d, "cpu")
    ck, cv = cache.committed(0, row, n, k_buf, v_buf)
    assert torch.equal(ck, compress(k_buf[row], params)) and torch.equal(cv, compress(v_buf[row], params))
    # the pages are freed and reused by another request: new KV is written (and invalidated)
    k_buf[row] = torch.randn(n, hkv, d)
    cache.invalidate(row[n - 5:])           # only the last page(s) written in this forward
    cache.invalidate(row[: n - 5])
    ck2, _ = cache.committed(0, row, n, k_buf, v_buf)
    assert torch.equal(ck2, compress(k_buf[row], params))
    # without invalidation the stale entries would be served: the invariant matters
    k_buf[row] = torch.randn(n, hkv, d)
    ck3, _ = cache.committed(0, row, n, k_buf, v_buf)
    assert not torch.equal(ck3, compress(k_buf[row], params))


def test_tree_parents_from_links():
    from specsa.sglang_plugin.backend import tree_parents
    # root 0 -> {1, 2}; 1 -> {3}; 2 -> {4}
    nxt = [1, 3, 4, -1, -1]
    sib = [-1, 2, -1, -1, -1]
    assert tree_parents(nxt, sib).tolist() == [-1, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="unreachable"):
        tree_parents([1, -1, -1], [-1, -1, -1])


def test_cpu_tree_builder_matches_eagle_layout():
    from specsa.sglang_plugin.backend import tree_parents
    from specsa.sglang_plugin.cpu_fallbacks import build_tree_kernel_efficient_torch
    # EAGLE topk=2, steps=2: step-0 candidates are indices 0,1 (children of the root);
    # step-1 candidates 2..5 are children of step-0 node (idx-2)//2 via parent_list.
    topk, steps, n = 2, 2, 4
    parent_list = torch.tensor([[-1, 0, 1]])       # parents_list[0] tokens, then step-0 picks
    selected = torch.tensor([[0, 1, 2]])           # root children 0, 1; node 2 = child of 0
    seq = torch.tensor([10])
    mask = torch.ones(seq.item() * n + n * n, dtype=torch.bool)
    pos = torch.empty(n, dtype=torch.long)
    ri, rn, rs = torch.full((3, 1, n), -1, dtype=torch.long)
    build_tree_kernel_efficient_torch(parent_list, selected, seq, mask, pos, ri, rn, rs,
                                      topk, steps, n, 0)
    parents = tree_parents(rn[0].tolist(), rs[0].tolist())
    assert parents.tolist() == [-1, 0, 0, 1]
    assert pos.tolist() == [10, 11, 11, 12]
    tree = mask.view(n, 10 + n)[:, 10:]
    assert tree.tolist() == [[True, False, False, False], [True, True, False, False],
                             [True, False, True, False], [True, True, False, True]]


def test_cpu_platform_only_when_selected(monkeypatch):
    from specsa.sglang_plugin import cpu_platform
    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    assert cpu_platform.activate() is None
    monkeypatch.setenv("SGLANG_PLATFORM", "specsa_cpu")
    assert cpu_platform.activate() == "specsa.sglang_plugin.cpu_platform.SpecsaCpuPlatform"


def test_overlap_schedule_setting():
    from specsa.config import ConfigError
    from specsa.sglang_plugin.settings import overlap_schedule
    assert overlap_schedule("cuda", {}) is True          # auto: on with CUDA
    assert overlap_schedule("cuda:0", {"SPECSA_OVERLAP": "auto"}) is True
    assert overlap_schedule("cpu", {}) is False          # auto: off on the CPU harness
    assert overlap_schedule("cpu", {"SPECSA_OVERLAP": "on"}) is True
    assert overlap_schedule("cuda", {"SPECSA_OVERLAP": "off"}) is False
    assert overlap_schedule("cpu", {"SPECSA_OVERLAP": "1"}) is True
    with pytest.raises(ConfigError, match="SPECSA_OVERLAP='maybe'"):
        overlap_schedule("cuda", {"SPECSA_OVERLAP": "maybe"})
