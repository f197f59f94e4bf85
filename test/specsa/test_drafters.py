"""Drafters: spec parsing, n-gram lookup, oracle, draft model (self:K, model:DIR) and the
compatibility checks."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from specsa.config import CacheConfig, SamplingConfig
from specsa.model import load_model, load_tokenizer
from specsa.model.tiny import build_tiny
from specsa.runtime.drafters import (DraftError, DraftRequest, DraftSpec, NGramDrafter,
                                     OracleDrafter, parse_draft_spec, trie_tree)
from specsa.runtime.drafters.build import build_drafter
from specsa.runtime.drafters.model import ModelDrafter, truncated_view
from specsa.runtime.generate import generate
from specsa.draft_tree import TreeSpec

GREEDY = SamplingConfig(max_new_tokens=12)
CACHE = CacheConfig(page_size=16, num_pages=64)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), kind="qwen2", seed=3, num_layers=3,
                      num_kv_heads=1)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


@pytest.mark.parametrize("spec,expect", [
    pytest.param("self:2", DraftSpec("self", layers=2), id="self"),
    pytest.param("model:/x/y", DraftSpec("model", path="/x/y"), id="model"),
    pytest.param("ngram:3", DraftSpec("ngram", n=3), id="ngram"),
    pytest.param("oracle:0.5", DraftSpec("oracle", accept_prob=0.5), id="oracle"),
    pytest.param("NGRAM: 2", DraftSpec("ngram", n=2), id="case-space"),
])
def test_parse_spec(spec, expect):
    assert parse_draft_spec(spec) == expect


@pytest.mark.parametrize("spec,match", [
    pytest.param("medusa:3", "unknown drafter 'medusa'", id="unknown"),
    pytest.param("self", "expected self:K", id="no-colon"),
    pytest.param("self:x", "positive integer", id="self-not-int"),
    pytest.param("ngram:0", "positive integer", id="ngram-zero"),
    pytest.param("oracle:1.5", "0 <= P <= 1", id="oracle-range"),
    pytest.param("oracle:abc", "probability", id="oracle-nan"),
    pytest.param("model:", "checkpoint directory", id="model-empty"),
])
def test_parse_spec_errors(spec, match):
    with pytest.raises(DraftError, match=match):
        parse_draft_spec(spec)


def test_ngram_continuations():
    d = NGramDrafter(3, TreeSpec(topk=2, depth=3, tokens=6))
    ctx = [5, 6, 7, 1, 2, 5, 6, 7, 3, 4, 9, 5, 6, 7]
    # suffix (5,6,7) occurs at 5 (-> 3,4,9) and at 0 (-> 1,2,5): most recent first
    assert d.continuations(ctx) == [[3, 4, 9], [1, 2, 5]]
    tree = d.propose([DraftRequest(0, tuple(ctx))])[0].tree
    assert tree.tokens.tolist() == [7, 3, 4, 9, 1, 2, 5] and tree.prefix_len == len(ctx) - 1
    assert tree.parents.tolist() == [-1, 0, 1, 2, 0, 4, 5]
    # falls back to shorter n-grams, and proposes nothing when nothing matches
    assert d.continuations([1, 2, 3, 9, 8, 3]) == [[9, 8, 3]]
    assert d.propose([DraftRequest(0, (1, 2, 3))])[0].tree.size == 1
    chain = NGramDrafter(2, TreeSpec.chain(4))
    assert chain.continuations([1, 2, 3, 1, 2]) == [[3, 1, 2]]


def test_trie_shares_prefixes_and_caps():
    t = trie_tree(9, 4, [[1, 2, 3], [1, 2, 4], [5]], max_tokens=4)
    assert t.tokens.tolist() == [9, 1, 2, 3, 4] and t.parents.tolist() == [-1, 0, 1, 2, 2]


def test_oracle_acceptance_rate():
    truth = list(range(100, 300))
    o = OracleDrafter(0.6, TreeSpec(topk=3, depth=4, tokens=10), vocab_size=512, seed=1)
    o.set_truth(7, truth)
    hits = total = 0
    for m in range(10, 150):
        tree = o.propose([DraftRequest(7, tuple(truth[:m]))])[0].tree
        assert tree.size <= 11 and int(tree.depth.max()) <= 4
        main = [c for c in tree.children[0]]
        assert len({int(tree.tokens[c]) for c in main}) == len(main)   # distinct siblings
        hits += int(tree.tokens[main[0]]) == truth[m]
        total += 1
    assert abs(hits / total - 0.6) < 0.15
    # off the oracle sequence: root only
    assert o.propose([DraftRequest(7, (1, 2, 3))])[0].tree.size == 1


def test_self_draft_shares_weights(tiny):
    v = truncated_view(tiny, 2)
    assert len(v.model.layers) == 2 and len(tiny.model.layers) == 3 and v.cfg.num_layers == 2
    assert v.lm_head.weight is tiny.lm_head.weight
    assert v.model.layers[1].self_attn.q_proj.weight is tiny.model.layers[1].self_attn.q_proj.weight
    with pytest.raises(DraftError, match=r"K must be in \[1, 3\]"):
        truncated_view(tiny, 4)


def test_full_depth_self_draft_is_the_target(tiny):
    """self:L drafts with the target itself: greedy chain drafts are its AR continuation."""
    prompt = torch.randint(0, 512, (37,)).tolist()
    ar = generate(tiny, [prompt], GREEDY)[0][0].tokens
    d = build_drafter("self:3", tiny, TreeSpec.chain(5), GREEDY, CACHE)
    draft = d.propose([DraftRequest(0, tuple(prompt + ar[:1]))])[0]
    assert draft.draft_probs is None
    assert draft.tree.tokens.tolist() == ar[:6]


@pytest.mark.parametrize("spec", [TreeSpec(topk=2, depth=3, tokens=5),
                                  TreeSpec(topk=3, depth=2, tokens=12)])
def test_eagle2_tree_shape(tiny, spec):
    d = build_drafter("self:1", tiny, spec, GREEDY, CACHE)
    prompt = torch.randint(0, 512, (21,)).tolist()
    tree = d.propose([DraftRequest(4, tuple(prompt))])[0].tree
    assert 1 < tree.size <= spec.tokens + 1 and int(tree.depth.max()) <= spec.depth
    for kids in tree.children:
        toks = [int(tree.tokens[c]) for c in kids]
        assert len(set(toks)) == len(toks) and len(kids) <= spec.topk


def test_draft_cache_rollback(tiny):
    """After drafting for one context and then a diverging one, the draft cache holds exactly
    the new context, with the same KV as a fresh drafter computes."""
    a = build_drafter("self:2", tiny, TreeSpec.chain(3), GREEDY, CACHE)
    ctx1 = tuple(torch.randint(0, 512, (40,)).tolist())
    ctx2 = ctx1[:25] + (3, 4, 5, 6)
    a.propose([DraftRequest(0, ctx1)])
    a.propose([DraftRequest(0, ctx2)])
    b = build_drafter("self:2", tiny, TreeSpec.chain(3), GREEDY, CACHE)
    b.propose([DraftRequest(0, ctx2)])
    assert a.cache.length(0) == b.cache.length(0) == len(ctx2) - 1
    for layer in range(2):
        ka, va = a.cache.committed_kv(0, layer)
        kb, vb = b.cache.committed_kv(0, layer)
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5)
    free = a.cache.num_free_pages
    a.release(0)
    assert a.cache.num_free_pages > free and not a.cache.has(0)


def test_sampled_chain_returns_q(tiny):
    s = SamplingConfig(temperature=0.8, top_k=20, max_new_tokens=8)
    d = ModelDrafter(truncated_view(tiny, 1), TreeSpec.chain(3), s, CACHE,
                     torch.Generator().manual_seed(0))
    dr = d.propose([DraftRequest(0, tuple(range(10, 30)))])[0]
    assert dr.draft_probs is not None and dr.draft_probs.shape == (4, 512)
    for u in range(3):   # each drafted child has positive probability under its parent's q
        assert dr.draft_probs[u, int(dr.tree.tokens[u + 1])] > 0
        assert (dr.draft_probs[u] > 0).sum() <= 20
        torch.testing.assert_close(dr.draft_probs[u].sum(), torch.tensor(1.0))


def test_model_dir_vocab_and_tokenizer_checks(tiny, tiny_dir, tmp_path):
    other = build_tiny(tmp_path / "v600", kind="qwen2", seed=1, num_layers=1, num_kv_heads=1,
                       vocab_size=600)
    with pytest.raises(DraftError, match="vocabulary size 600 differs from the target's 512"):
        build_drafter(f"model:{other}", tiny, TreeSpec.chain(2), GREEDY, CACHE)
    # same vocabulary size, different token -> id mapping
    swapped = build_tiny(tmp_path / "swapped", kind="qwen2", seed=1, num_layers=1, num_kv_heads=1)
    tj = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    tok = load_tokenizer(tiny_dir)
    with pytest.raises(DraftError, match="tokenizer differs"):
        build_drafter(f"model:{swapped}", tiny, TreeSpec.chain(2), GREEDY, CACHE, tokenizer=tok)
    same = tmp_path / "same"
    shutil.copytree(other, same)
    shutil.copytree(tiny_dir, same, dirs_exist_ok=True)   # a copy of the target itself
    d = build_drafter(f"model:{same}", tiny, TreeSpec.chain(2), GREEDY, CACHE, tokenizer=tok)
    assert d.vocab_size == 512
