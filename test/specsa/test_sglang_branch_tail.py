"""The sync-free prefix-tail copy into tree draft branches (sglang_plugin/branch_tail.py) leaves
the KV exactly as SGLang's own duplicate_prefix_tail_to_draft_branches does, on random batches,
with a row count that does not depend on the data (no host sync); servers on the CPU harness
(test_sglang_draft_window.py, test_sglang_eagle.py: trees at page 16) run it end to end."""
from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.speculative import eagle_worker_common as ewc  # noqa: E402

from specsa.sglang_plugin import branch_tail  # noqa: E402


class _Pool:
    """move_kv_cache with the Triton kernel's semantics: every source read before any write."""

    def __init__(self, slots: int, layers: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.k_buffer = [torch.randn(slots, 2, 4, generator=g) for _ in range(layers)]
        self.v_buffer = [torch.randn(slots, 2, 4, generator=g) for _ in range(layers)]
        self.counts: list[int] = []

    def move_kv_cache(self, tgt, src):
        self.counts.append(int(tgt.numel()))
        for b in self.k_buffer + self.v_buffer:
            b[tgt.long()] = b[src.long()].clone()


def _batch(bs: int, topk: int, steps: int, ps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    width = 8 * ps + topk * (steps // ps + 2) * ps
    slots = bs * width + ps
    rows = (torch.randperm(slots - ps, generator=g)[:bs * width] + ps).view(bs, width)
    seq = torch.randint(1, 6 * ps, (bs,), generator=g)
    last = seq % ps
    base = seq - last
    new_pages = (last + steps + ps - 1) // ps
    return rows.to(torch.int32), base, last, new_pages, slots


@pytest.mark.parametrize("bs,topk,steps,ps,seed", [(1, 2, 3, 16, 0), (5, 2, 3, 16, 1),
                                                   (3, 3, 4, 4, 2), (8, 2, 5, 8, 3),
                                                   (2, 4, 2, 16, 4)])
def test_same_kv_as_sglang_and_a_fixed_row_count(bs, topk, steps, ps, seed):
    rows, base, last, new_pages, slots = _batch(bs, topk, steps, ps, seed)
    ref, got = _Pool(slots, seed=seed), _Pool(slots, seed=seed)
    _original()(ref, rows, base, last, new_pages, topk, ps)
    old = branch_tail.ACTIVE
    branch_tail.ACTIVE = True
    try:
        branch_tail.duplicate_prefix_tail(None, got, rows, base, last, new_pages, topk, ps)
    finally:
        branch_tail.ACTIVE = old
    for a, b in zip(ref.k_buffer + ref.v_buffer, got.k_buffer + got.v_buffer):
        assert torch.equal(a, b)
    assert got.counts == [bs * (topk - 1) * ps]          # whatever the tails: no host sync


def _original():
    # SGLang's function as shipped (the plugin's hook may wrap the module attribute)
    return getattr(ewc.duplicate_prefix_tail_to_draft_branches, "__wrapped__",
                   ewc.duplicate_prefix_tail_to_draft_branches)


def test_inactive_or_chain_defers_to_sglang():
    calls = []
    branch_tail.duplicate_prefix_tail(lambda *a: calls.append(a), None, torch.zeros(1, 4),
                                      torch.zeros(1), torch.zeros(1), torch.ones(1), 2, 16)
    assert len(calls) == 1                                # not a SpecSA server: SGLang's path
    old = branch_tail.ACTIVE
    branch_tail.ACTIVE = True
    try:
        branch_tail.duplicate_prefix_tail(lambda *a: calls.append(a), None, torch.zeros(1, 4),
                                          torch.zeros(1), torch.zeros(1), torch.ones(1), 1, 16)
    finally:
        branch_tail.ACTIVE = old
    assert len(calls) == 2                                # topk 1: SGLang returns at once


def test_hook_target_has_the_signature_we_replace():
    fn = _original()
    names = list(inspect.signature(fn).parameters)
    assert names == ["token_to_kv_pool", "rows", "prefix_base", "last_page", "num_new_pages",
                     "topk", "page_size"]
    ours = list(inspect.signature(branch_tail.duplicate_prefix_tail).parameters)
    assert ours == ["original"] + names
