"""The torch version of SGLang's tree speculative sampling (CPU harness fallback): emitted
tokens follow the target distribution exactly (Monte Carlo against the exact joint), and the
top-k / top-p renormalisation matches the AR torch sampler's rules."""
from __future__ import annotations

import itertools

import torch

from specsa.sglang_plugin.cpu_fallbacks import (top_k_renorm_prob, top_p_renorm_prob,
                                                tree_speculative_sampling_target_only)

V = 5


def _tree():
    """root(0) -> children 1 (token 2), 2 (token 0); node 1 -> child 3 (token 4);
    node 2 -> child 4 (token 1). SGLang's retrieve_* links, as build_tree fills them."""
    cand = torch.tensor([[3, 2, 0, 4, 1]])
    nxt = torch.tensor([[1, 3, 4, -1, -1]])
    sib = torch.tensor([[-1, 2, -1, -1, -1]])
    return cand, nxt, sib


def _run(tp, coins, final, steps=3):
    cand, nxt, sib = _tree()
    n = cand.shape[1]
    predicts = torch.full((n,), -1, dtype=torch.int32)
    acc_idx = torch.full((1, steps), -1, dtype=torch.int32)
    acc_num = torch.zeros(1, dtype=torch.int32)
    tree_speculative_sampling_target_only(
        predicts, acc_idx, acc_num, cand, torch.arange(n).view(1, n), nxt, sib, coins, final,
        tp, torch.zeros_like(tp))
    path = [int(i) for i in acc_idx[0] if i >= 0]
    return [int(predicts[i]) for i in path]       # tokens emitted: accepted drafts + bonus


def test_emitted_tokens_follow_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    tp = torch.softmax(torch.randn(1, 5, V, generator=g) * 1.5, dim=-1)
    # exact joint of the first two emitted tokens: node probabilities along the draft tree
    node_of = {(): 0, (2,): 1, (0,): 2}
    exact = {}
    for a, b in itertools.product(range(V), range(V)):
        row = node_of.get((a,))
        second = tp[0, row, b] if row is not None else None
        if second is None:      # first token off the tree: its successor is not emitted now
            continue
        exact[(a, b)] = float(tp[0, 0, a] * second)
    n = 6000
    counts: dict = {}
    first = torch.zeros(V)
    for _ in range(n):
        toks = _run(tp, torch.rand(1, 5, generator=g), torch.rand(1, generator=g))
        first[toks[0]] += 1
        if len(toks) >= 2:
            counts[tuple(toks[:2])] = counts.get(tuple(toks[:2]), 0) + 1
        assert 1 <= len(toks) <= 3
    # first token ~ target at the root
    tv = 0.5 * (first / n - tp[0, 0]).abs().sum()
    assert tv < 0.03, (first / n, tp[0, 0])
    # pairs (on-tree first token) ~ exact joint
    for k, p in exact.items():
        assert abs(counts.get(k, 0) / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 2e-3, (k, p)


def test_point_mass_target_accepts_the_whole_path():
    tp = torch.zeros(1, 5, V)
    tp[0, 0, 2] = tp[0, 1, 4] = tp[0, 3, 1] = 1.0          # the target agrees with path 0-1-3
    toks = _run(tp, torch.full((1, 5), 0.5), torch.tensor([0.3]))
    assert toks == [2, 4, 1]


def test_rejected_siblings_are_excluded_from_the_bonus():
    tp = torch.zeros(1, 5, V)
    tp[0, 0] = torch.tensor([0.0, 0.0, 0.3, 0.7, 0.0])     # children 2 (p .3) and 0 (p 0)
    for c in (0.31, 0.6, 0.99):                             # coin past token 2's mass: reject
        assert _run(tp, torch.full((1, 5), c), torch.tensor([0.5])) == [3]


def test_renorm_rules():
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]])
    k = top_k_renorm_prob(p, torch.tensor([2, 1]))
    assert torch.allclose(k[0], torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]))
    assert torch.equal(k[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))     # ties: lower token id
    t = top_p_renorm_prob(p, torch.tensor([0.5, 0.6]))
    assert torch.allclose(t[0], torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]))   # 0.4 < 0.5: next kept
    assert torch.allclose(t[1], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    assert torch.equal(top_k_renorm_prob(p, torch.tensor([1 << 30, 1 << 30])), p / p.sum(-1, True))
