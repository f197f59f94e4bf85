"""Acceptance: greedy invariants and exactness of (multi-draft) rejection sampling.

Distribution tests run a toy context-dependent target p(.|ctx) and draft q(.|ctx) on a
5-token vocabulary, draft from q, accept with `sample_accept`, and compare the frequencies of
the first emitted token and of the first two emitted tokens (which spans the bonus token and
a second speculative step) with the target via Pearson's chi-square. Each test's false-alarm
rate is alpha = 1e-3 (fixed seeds, so the outcome is deterministic); a deliberately broken
acceptance rule (no residual update) must be rejected at the same N, which shows the test
has power.
"""
from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chi2

import specsa.runtime.accept as acc
from specsa.runtime.accept import greedy_accept, sample_accept
from specsa.draft_tree import DraftTree

ALPHA = 1e-3
V = 5


class ToyLM:
    """Fixed random next-token distributions per context tuple; some tokens get zero mass
    so that supports differ between target and draft."""

    def __init__(self, seed: int, zero_frac: float = 0.25):
        self.seed, self.zero_frac, self.cache = seed, zero_frac, {}

    def __call__(self, ctx: tuple[int, ...]) -> torch.Tensor:
        if ctx not in self.cache:
            g = torch.Generator().manual_seed(hash((self.seed,) + ctx) & 0x7FFFFFFF)
            w = torch.rand(V, generator=g, dtype=torch.float64) ** 2
            w[torch.rand(V, generator=g) < self.zero_frac] = 0.0
            if w.sum() == 0:
                w[0] = 1.0
            self.cache[ctx] = w / w.sum()
        return self.cache[ctx]


def chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    n = counts.sum()
    exp = expected_probs * n
    assert counts[exp == 0].sum() == 0, "emitted a token the target gives zero probability"
    m = exp > 0
    stat = ((counts[m] - exp[m]) ** 2 / exp[m]).sum().item()
    return float(chi2.sf(stat, int(m.sum()) - 1))


def draft_tree(ctx, q: ToyLM, widths: list[int], gen: torch.Generator, mode: str):
    """Tree below root ctx[-1]: `widths[d]` children per node at depth d, drawn from q
    (mode 'norep' / 'rep') or q's top tokens (mode 'det'). Returns (tree, Q rows or None)."""
    toks, pars, ctxs = [ctx[-1]], [-1], [ctx]
    frontier = [0]
    for w in widths:
        nxt = []
        for u in frontier:
            qu = q(ctxs[u])
            k = min(w, int((qu > 0).sum()))
            if mode == "det":
                kids = torch.argsort(qu, descending=True, stable=True)[:k].tolist()
            else:
                kids = torch.multinomial(qu, k if mode == "norep" else w,
                                         replacement=mode == "rep", generator=gen).tolist()
            for x in kids:
                toks.append(x)
                pars.append(u)
                ctxs.append(ctxs[u] + (x,))
                nxt.append(len(toks) - 1)
        frontier = nxt
    tree = DraftTree(tokens=toks, parents=pars, prefix_len=len(ctx) - 1)
    Q = None if mode == "det" else torch.stack([q(c) for c in ctxs])
    return tree, Q, ctxs


def emitted_pairs(p: ToyLM, q: ToyLM, widths: list[int], mode: str, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    firsts, pairs = torch.zeros(V), torch.zeros(V, V)
    root = (1,)
    for _ in range(n):
        ctx, out = root, []
        while len(out) < 2:
            tree, Q, ctxs = draft_tree(ctx, q, widths, gen, mode)
            P = torch.stack([p(c) for c in ctxs])
            a = sample_accept(tree, P, Q, generator=gen, replacement=mode == "rep")
            out += list(a.tokens)
            ctx = ctx + a.tokens
        firsts[out[0]] += 1
        pairs[out[0], out[1]] += 1
    exp_first = p(root)
    exp_pair = torch.stack([exp_first[a] * p(root + (a,)) for a in range(V)])
    return firsts, pairs, exp_first, exp_pair


CASES = [
    pytest.param([1, 1, 1], "norep", id="chain-gamma3-sampled"),
    pytest.param([1], "det", id="chain-gamma1-deterministic"),
    pytest.param([2, 2], "norep", id="tree-2x2-without-replacement"),
    pytest.param([3, 1], "rep", id="tree-3x1-with-replacement"),
    pytest.param([2, 2], "det", id="tree-2x2-deterministic-topk"),
]


@pytest.mark.parametrize("widths,mode", CASES)
def test_emitted_distribution_matches_target(widths, mode):
    p, q = ToyLM(seed=11), ToyLM(seed=23, zero_frac=0.1)
    firsts, pairs, ef, ep = emitted_pairs(p, q, widths, mode, n=6000, seed=5)
    assert chi_square_pvalue(firsts, ef) > ALPHA
    assert chi_square_pvalue(pairs.flatten(), ep.flatten()) > ALPHA


def test_broken_rule_is_detected(monkeypatch):
    """Power check: without the residual update the output is biased towards q and the same
    test must reject it."""
    monkeypatch.setattr(acc, "_residual", lambda p, q, x: p)
    p, q = ToyLM(seed=11), ToyLM(seed=23, zero_frac=0.1)
    firsts, pairs, ef, ep = emitted_pairs(p, q, [2, 2], "norep", n=6000, seed=5)
    try:
        pvals = chi_square_pvalue(firsts, ef), chi_square_pvalue(pairs.flatten(), ep.flatten())
    except AssertionError:  # emitted a zero-probability token: detected as well
        return
    assert min(pvals) < ALPHA, pvals


@pytest.mark.parametrize("seed", range(30))
def test_greedy_invariants(seed):
    rng = random.Random(seed)
    n, vocab = rng.randrange(1, 30), rng.choice([3, 7, 50])
    parents = [-1] + [rng.randrange(u) for u in range(1, n)]
    logits = torch.randn(n, vocab)
    arg = logits.argmax(-1)
    # plant matches so that long paths occur
    toks = [rng.randrange(vocab) for _ in range(n)]
    for u in range(1, n):
        if rng.random() < 0.6:
            toks[u] = int(arg[parents[u]])
    tree = DraftTree(tokens=toks, parents=parents, prefix_len=rng.randrange(64))
    a = greedy_accept(tree, logits)
    assert a.nodes[0] == 0 and len(a.tokens) == len(a.nodes)
    for prev, cur in zip(a.nodes, a.nodes[1:]):
        assert parents[cur] == prev and toks[cur] == int(arg[prev])
    last = a.nodes[-1]
    assert a.tokens[-1] == int(arg[last])
    # maximal: no child of the last node carries the bonus token
    assert all(toks[c] != a.tokens[-1] for c in tree.children[last])
    # sampling with point-mass target distributions is greedy
    onehot = torch.nn.functional.one_hot(arg, vocab).double()
    s = sample_accept(tree, onehot, None, torch.Generator().manual_seed(seed))
    assert s == a


def test_equal_distributions_accept_everything():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, V, dtype=torch.float64), -1)
    for _ in range(200):
        toks = [0] + [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(3)]
        a = sample_accept(DraftTree.chain(toks[0], toks[1:], 0), p, p, generator=gen)
        assert a.accepted == 3


def test_bad_inputs():
    tree = DraftTree.chain(1, [2, 7], prefix_len=0)
    with pytest.raises(ValueError, match="vocabulary"):
        greedy_accept(tree, torch.randn(3, 5))
    with pytest.raises(ValueError, match="one per tree node"):
        greedy_accept(tree, torch.randn(2, 8))
    P = torch.full((3, 8), 1 / 8)
    with pytest.raises(ValueError, match="same vocabulary"):
        sample_accept(tree, P, torch.full((3, 9), 1 / 9))
    Q = P.clone()
    Q[0, 2] = 0
    with pytest.raises(ValueError, match="zero draft probability"):
        sample_accept(tree, P, Q, torch.Generator().manual_seed(0))
