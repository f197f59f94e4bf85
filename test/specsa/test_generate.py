"""Autoregressive generation (batching, chunking, stop/max tokens, cache accounting) and
sampling filters."""
from __future__ import annotations

import pytest
import torch

from specsa.config import CacheConfig, SamplingConfig
from specsa.model import CacheFullError, load_model
from specsa.model.tiny import build_tiny
from specsa.runtime.generate import generate
from specsa.runtime.sampling import filtered_probs, make_generator, sample


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = build_tiny(tmp_path_factory.mktemp("g"), kind="qwen2", seed=5)
    return load_model(d)   # NSA from config.json: block 8, stride 4, select 16, topn 4, window 32


def _prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (150, 37, 96)]


def test_batch_equals_single_and_chunking_is_invisible(model):
    sc = SamplingConfig(max_new_tokens=12)
    prompts = _prompts()
    batch, stats = generate(model, prompts, sc, chunk_size=40, page_size=16)
    for p, r in zip(prompts, batch):
        single, _ = generate(model, [p], sc, chunk_size=1000, page_size=64)
        assert r.tokens == single[0].tokens
        assert r.prompt_tokens == len(p) and r.finish_reason == "length"
    assert stats.prefill_steps == 4           # ceil(150 / 40)
    assert stats.decode_steps == 11 and stats.steps == 15
    assert stats.decode_tokens == 33 and stats.decode_tokens_per_s > 0


def test_greedy_matches_manual_argmax_loop(model):
    """generate() == the plain loop: full forward over prompt + generated so far, argmax."""
    from specsa.model import BlockInput
    p = _prompts()[1]
    res, _ = generate(model, [p], SamplingConfig(max_new_tokens=6))
    seq = list(p)
    for _ in range(6):
        cache = model.new_cache(CacheConfig(page_size=16, num_pages=8))
        cache.add_request(0)
        logits, _ = model(cache, [BlockInput(0, seq)])
        seq.append(int(logits[-1].argmax()))
    assert res[0].tokens == seq[len(p):]


def test_stop_tokens_and_cache_accounting(model):
    prompts = _prompts()
    free_run, _ = generate(model, prompts, SamplingConfig(max_new_tokens=10))
    stop = free_run[0].tokens[3]
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=40))
    res, _ = generate(model, prompts, SamplingConfig(max_new_tokens=10, stop_token_ids=(stop,)),
                      cache=cache)
    first = free_run[0].tokens.index(stop)
    assert res[0].tokens == free_run[0].tokens[:first + 1] and res[0].finish_reason == "stop"
    assert cache.num_free_pages == 40 and not cache.requests()
    res, stats = generate(model, prompts, SamplingConfig(max_new_tokens=0))
    assert all(r.tokens == [] for r in res) and stats.steps == 0
    res, stats = generate(model, prompts, SamplingConfig(max_new_tokens=1))
    assert [len(r.tokens) for r in res] == [1, 1, 1] and stats.decode_steps == 0


def test_prompt_longer_than_cache(model):
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=4))
    with pytest.raises(CacheFullError, match=r"request 0 \(prompt 150 \+ max_new_tokens 5\).*"
                                             r"only 4 pages \(64 tokens\)"):
        generate(model, [_prompts()[0]], SamplingConfig(max_new_tokens=5), cache=cache)
    assert cache.num_free_pages == 4


def test_sampling_seeded_and_filters(model):
    prompts = _prompts()[:2]
    sc = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, seed=3, max_new_tokens=8)
    a, _ = generate(model, prompts, sc)
    b, _ = generate(model, prompts, sc)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    greedy, _ = generate(model, prompts, SamplingConfig(max_new_tokens=8))
    k1, _ = generate(model, prompts, SamplingConfig(temperature=1.0, top_k=1, seed=0, max_new_tokens=8))
    assert [r.tokens for r in k1] == [r.tokens for r in greedy]


def test_filtered_probs():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = filtered_probs(logits, 1.0, top_k=2)
    torch.testing.assert_close(p, torch.tensor([[0.7311, 0.2689, 0.0, 0.0]]), atol=1e-4, rtol=0)
    full = torch.softmax(logits, -1)[0]              # [0.644, 0.237, 0.087, 0.032]
    p = filtered_probs(logits, 1.0, top_p=0.85)      # 0.644 < 0.85 <= 0.881: keep 2 tokens
    assert (p[0] > 0).tolist() == [True, True, False, False]
    p = filtered_probs(logits, 1.0, top_p=0.01)      # the most likely token always survives
    assert p[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    p = filtered_probs(logits, 0.5)
    torch.testing.assert_close(p[0], torch.softmax(logits[0] / 0.5, -1))
    assert torch.allclose(filtered_probs(logits, 1.0), full[None])
    # empirical frequencies follow the filtered distribution
    gen = make_generator(0, "cpu")
    draws = sample(logits.expand(4000, 4), SamplingConfig(temperature=1.0, top_k=3), gen)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    target = filtered_probs(logits, 1.0, top_k=3)[0]
    assert (freq - target).abs().max() < 0.03 and freq[3] == 0
