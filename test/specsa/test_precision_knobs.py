"""Precision classes in the standalone runtime (docs/DESIGN.md section 5) on tiny random NSA
models (float32, CPU):

- STRICT stays exact: speculative greedy output == autoregressive NSA for every exact
  schedule / group size;
- REUSE with R = 1 is STRICT (logits bit-identical, tokens identical);
- reuse layers really skip the selection: per forward (prefill chunk, verifier chain, draft
  tree, decode) exactly ceil(L / R) layers compute a selection (top-n calls counted), and
  every reuse layer attends with the last refresh layer's selection (recorded);
- REUSE is still lossless speculation w.r.t. the model as run: speculative REUSE output ==
  autoregressive REUSE output (a reused selection is per query, like AR's);
- APPROX SHARED_INDEX: group size 1 and single-query forwards are exact, groups attend with
  their representative's selection (the first layer compared with STRICT's own selections);
- the TRITON path (kernels under TRITON_INTERPRET=1; slow) applies the same knobs: logits
  equal the TORCH path's, and the refresh kernel runs in ceil(L / R) layers per forward;
- combinations outside the class are refused (ConfigError with the class sentence).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from specsa.config import (CacheConfig, ConfigError, PrecisionClass, SamplingConfig, Schedule,
                           Traversal, VerifyKnobs)
from specsa.model import BlockInput, load_model
from specsa.model.triton_forward import TritonOptions
from specsa.model.tiny import build_tiny
from specsa.runtime.drafters import OracleDrafter
from specsa.runtime.generate import generate
from specsa.runtime.loop import speculative_generate
from specsa.draft_tree import TreeSpec
from specsa.schedule import shared_sources

SPARSE = "block=8,stride=4,select=16,topn=4,window=32"
L = 5
TREE = ([7, 8, 9, 10, 11, 12, 13], [-1, 0, 0, 1, 1, 2, 3])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = build_tiny(tmp_path_factory.mktemp("knobs") / "m", kind="llama", seed=4, num_heads=4,
                   num_kv_heads=2, head_dim=16, num_layers=L)
    return load_model(d, nsa_overrides=SPARSE)


def _prompt(n, seed=1, vocab=500):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _oracle(model, prompt, truth, tree=TreeSpec(topk=2, depth=3, tokens=6), p=0.8):
    d = OracleDrafter(p, tree, model.cfg.vocab_size, seed=3)
    d.set_truth(0, prompt + truth)
    return d


class Counter:
    """Counts top-n selections computed on the TORCH path (masked_nsa's `_select`, one call
    per query chunk and request) and records the selection each masked_nsa call attended
    with, layer-major."""

    def __init__(self, monkeypatch):
        import specsa.kernels.nsa.masked as mk
        import specsa.model.nsa_layer as attn

        self.selects, self.sels = 0, []
        real_select, real_nsa = mk._select, attn.masked_nsa

        def select(*a, **k):
            self.selects += 1
            return real_select(*a, **k)

        def nsa(*a, **k):
            o, sel = real_nsa(*a, **k)
            self.sels.append(sel.clone())
            return o, sel
        monkeypatch.setattr(mk, "_select", select)
        monkeypatch.setattr(attn, "masked_nsa", nsa)

    def reset(self):
        self.selects, self.sels = 0, []


def _forwards(model, knobs, traversal=None):
    """Prefill chunk (100 tokens), verifier chain (6), draft tree (7 nodes), decode (1):
    [(logits, last_forward)] per forward, committing as a generation would."""
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=16))
    cache.add_request(0)
    ids = _prompt(106)
    out = []
    for blk, keep in ((BlockInput(0, ids[:100]), None), (BlockInput(0, ids[100:]), None),
                      (BlockInput(0, *TREE), [0, 1, 3]), (BlockInput(0, [5]), None)):
        lg, pend = model(cache, [blk], knobs=knobs, traversal=traversal)
        out.append((lg, model.last_forward))
        cache.commit(0, pend, keep)
    return out


# -- STRICT / REUSE R=1 --------------------------------------------------------------------
@pytest.mark.parametrize("schedule, c", [(None, None), ("independent", None),
                                         ("exact_merged", 2), ("exact_merged", 8)])
def test_strict_is_exact(model, schedule, c):
    prompt = _prompt(90)
    sampling = SamplingConfig(max_new_tokens=24)
    ref = generate(model, [prompt], sampling)[0][0].tokens
    knobs = VerifyKnobs(PrecisionClass.STRICT, schedule=schedule, group_size=c)
    res, stats = speculative_generate(model, [prompt], _oracle(model, prompt, ref), sampling,
                                      knobs=knobs)
    assert res[0].tokens == ref
    assert stats.mean_accept_len > 1.5
    assert stats.layers_reused == 0


def test_reuse_period_1_is_strict(model):
    strict = _forwards(model, VerifyKnobs())
    reuse = _forwards(model, VerifyKnobs(PrecisionClass.REUSE, refresh_period=1))
    for (a, _), (b, info) in zip(strict, reuse):
        assert torch.equal(a, b)
        assert info.refreshed == L and info.reused == 0
    prompt, sampling = _prompt(70, seed=2), SamplingConfig(max_new_tokens=20)
    ref = generate(model, [prompt], sampling)[0][0].tokens
    knobs = VerifyKnobs(PrecisionClass.REUSE, refresh_period=1)
    assert generate(model, [prompt], sampling, knobs=knobs)[0][0].tokens == ref
    res, _ = speculative_generate(model, [prompt], _oracle(model, prompt, ref), sampling,
                                  knobs=knobs)
    assert res[0].tokens == ref


# -- REUSE: the refresh is really skipped ----------------------------------------------------
@pytest.mark.parametrize("period", [1, 2, 3, 5])
def test_reuse_layers_skip_the_selection(model, monkeypatch, period):
    knobs = VerifyKnobs(PrecisionClass.REUSE, refresh_period=period)
    refresh = [layer for layer in range(L) if knobs.refreshes(layer)]
    assert len(refresh) == math.ceil(L / period)
    cnt = Counter(monkeypatch)
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=16))
    cache.add_request(0)
    ids = _prompt(106)
    for blk, keep in ((BlockInput(0, ids[:100]), None), (BlockInput(0, ids[100:]), None),
                      (BlockInput(0, *TREE), [0, 2]), (BlockInput(0, [5]), None)):
        cnt.reset()
        _, pend = model(cache, [blk], knobs=knobs)
        cache.commit(0, pend, keep)
        # one query chunk per layer (<= 128 rows): a selection per refresh layer only
        assert cnt.selects == len(refresh), blk
        info = model.last_forward
        assert (info.refreshed, info.reused) == (len(refresh), L - len(refresh))
        assert len(cnt.sels) == L
        for layer in range(L):
            last = max(r for r in refresh if r <= layer)
            assert torch.equal(cnt.sels[layer], cnt.sels[last]), (blk, layer)


def test_reuse_changes_the_model_but_speculation_stays_lossless(model):
    knobs = VerifyKnobs(PrecisionClass.REUSE, refresh_period=2)
    strict = _forwards(model, VerifyKnobs())
    reuse = _forwards(model, knobs)
    assert any(not torch.allclose(a, b) for (a, _), (b, _) in zip(strict, reuse))
    prompt, sampling = _prompt(110, seed=5), SamplingConfig(max_new_tokens=30)
    ar, st = generate(model, [prompt], sampling, knobs=knobs)
    assert st.layers_reused == st.steps * (L - 3)
    assert st.refresh_period_counts == {"2": st.steps}
    for tree in (TreeSpec(topk=2, depth=3, tokens=6), TreeSpec.chain(4)):
        res, stats = speculative_generate(model, [prompt],
                                          _oracle(model, prompt, ar[0].tokens, tree), sampling,
                                          knobs=knobs)
        assert res[0].tokens == ar[0].tokens
        forwards = stats.prefill_steps + stats.verify_steps
        assert (stats.layers_refreshed, stats.layers_reused) == (3 * forwards, 2 * forwards)
        assert stats.knob_counts["refresh_period"] == {"2": stats.verify_steps}


# -- APPROX: SHARED_INDEX ---------------------------------------------------------------------
def test_shared_index_group_of_one_and_single_queries_are_exact(model):
    strict = _forwards(model, VerifyKnobs())
    one = _forwards(model, VerifyKnobs(PrecisionClass.APPROX, schedule=Schedule.SHARED_INDEX,
                                       group_size=1))
    for (a, _), (b, info) in zip(strict, one):
        assert torch.equal(a, b)
    shared = _forwards(model, VerifyKnobs(PrecisionClass.APPROX, schedule=Schedule.SHARED_INDEX,
                                          group_size=4))
    # the 100-token prefill chunk is not a verification (never grouped); the 6-token chain
    # and the tree are (the decode after them reads the KV they committed)
    assert torch.equal(strict[0][0], shared[0][0])
    assert not torch.equal(strict[2][0], shared[2][0])
    assert shared[2][1].schedule is Schedule.SHARED_INDEX and shared[2][1].group_size == 4
    # greedy AR decoding has nothing to group: APPROX knobs give STRICT's tokens
    prompt, sampling = _prompt(60, seed=3), SamplingConfig(max_new_tokens=12)
    assert generate(model, [prompt], sampling, knobs=VerifyKnobs(PrecisionClass.APPROX))[0][0] \
        .tokens == generate(model, [prompt], sampling)[0][0].tokens


@pytest.mark.parametrize("traversal", [Traversal.BFS, Traversal.DFS])
def test_shared_index_uses_the_representatives_selection(model, monkeypatch, traversal):
    """In the first layer (same inputs as STRICT) every tree query attends with the STRICT
    selection of its group's deepest member; later layers may differ anywhere (their inputs
    changed), which is what APPROX allows."""
    cnt = Counter(monkeypatch)
    _forwards(model, VerifyKnobs(), traversal)
    own = cnt.sels[2 * L]                     # third forward (the tree), layer 0
    cnt.reset()
    _forwards(model, VerifyKnobs(PrecisionClass.APPROX, schedule=Schedule.SHARED_INDEX,
                                 group_size=3), traversal)
    used = cnt.sels[2 * L]
    src = shared_sources(TREE[1], traversal, 3)
    assert src != list(range(len(TREE[1])))
    assert torch.equal(used, own[torch.tensor(src)])


def test_approx_speculation_runs_and_reports(model):
    prompt, sampling = _prompt(90, seed=7), SamplingConfig(max_new_tokens=24)
    ref = generate(model, [prompt], sampling)[0][0].tokens
    knobs = VerifyKnobs(PrecisionClass.APPROX_REUSE, schedule=Schedule.SHARED_INDEX,
                        group_size=4, refresh_period=2)
    res, stats = speculative_generate(model, [prompt], _oracle(model, prompt, ref), sampling,
                                      knobs=knobs)
    assert len(res[0].tokens) == 24
    assert stats.knob_counts["schedule"] == {"shared_index": stats.verify_steps}
    assert stats.knob_counts["group_size"] == {"4": stats.verify_steps}
    assert stats.knob_counts["refresh_period"] == {"2": stats.verify_steps}


# -- rejected combinations -------------------------------------------------------------------
@pytest.mark.parametrize("knobs, msg", [
    (VerifyKnobs(PrecisionClass.STRICT, refresh_period=2), "needs a REUSE precision class"),
    (VerifyKnobs(PrecisionClass.APPROX, refresh_period=4), "needs a REUSE precision class"),
    (VerifyKnobs(PrecisionClass.STRICT, schedule=Schedule.SHARED_INDEX),
     "needs an APPROX precision class"),
    (VerifyKnobs(PrecisionClass.REUSE, schedule=Schedule.SHARED_INDEX, refresh_period=2),
     "needs an APPROX precision class"),
])
def test_knobs_outside_the_class_are_refused(model, knobs, msg):
    prompt, sampling = _prompt(20), SamplingConfig(max_new_tokens=4)
    with pytest.raises(ConfigError, match=msg):
        speculative_generate(model, [prompt], _oracle(model, prompt, [1] * 4), sampling,
                             knobs=knobs)
    if knobs.schedule is None:
        with pytest.raises(ConfigError, match=msg):
            generate(model, [prompt], sampling, knobs=knobs)


def test_model_refuses_shared_index_outside_approx(model):
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=4))
    cache.add_request(0)
    cache.commit(0, model(cache, [BlockInput(0, _prompt(20))])[1])
    with pytest.raises(ConfigError, match="SHARED_INDEX is approximate"):
        model(cache, [BlockInput(0, *TREE)],
              knobs=VerifyKnobs(PrecisionClass.REUSE, schedule=Schedule.SHARED_INDEX))


# -- the TRITON path -------------------------------------------------------------------------
triton_only = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton path on CPU needs TRITON_INTERPRET=1")


@pytest.mark.slow
@triton_only
@pytest.mark.parametrize("native", [False, True], ids=["union", "gated"])
def test_triton_path_applies_the_same_knobs(tmp_path, monkeypatch, native):
    """Logits equal the TORCH path's for REUSE (R=2) and APPROX_REUSE (SHARED_INDEX C=2, R=2)
    in every kind of forward (in-place prefill chunk, verifier chain, tree, decode); with the
    union combine the refresh kernel runs in ceil(L/R) layers only (prefill: chunked_nsa_prefill
    without its refresh stage)."""
    import specsa.kernels.refresh as kc
    import specsa.kernels.prefill.chunked as ch

    layers = 3
    d = build_tiny(tmp_path / "m", kind="llama", native=native, seed=5, num_heads=4,
                   num_kv_heads=1, head_dim=16, num_layers=layers)
    # on a GPU machine the Triton kernels run compiled, on CUDA tensors (no interpreter there)
    m = load_model(d, nsa_overrides=SPARSE, device="cuda" if torch.cuda.is_available() else "cpu")
    calls = [0]
    for mod in (kc, ch):
        real = mod.score_topk_grouped

        def counted(*a, _real=real, **k):
            calls[0] += 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, "score_topk_grouped", counted)
    for knobs in (VerifyKnobs(PrecisionClass.REUSE, refresh_period=2),
                  VerifyKnobs(PrecisionClass.APPROX_REUSE, schedule=Schedule.SHARED_INDEX,
                              group_size=2, refresh_period=2)):
        m.set_attn_impl("torch", TritonOptions(prefill_chain=24))
        ref = _forwards(m, knobs)
        m.set_attn_impl("triton", TritonOptions(prefill_chain=24))
        cache = m.new_cache(CacheConfig(page_size=16, num_pages=16))
        cache.add_request(0)
        ids = _prompt(106)
        for (want, info), (blk, keep) in zip(ref, (
                (BlockInput(0, ids[:100]), None), (BlockInput(0, ids[100:]), None),
                (BlockInput(0, *TREE), [0, 1, 3]), (BlockInput(0, [5]), None))):
            calls[0] = 0
            lg, pend = m(cache, [blk], knobs=knobs)
            cache.commit(0, pend, keep)
            torch.testing.assert_close(lg, want, rtol=1e-4, atol=1e-4)
            assert m.last_forward == info
            # gated: reuse layers still run the kernel for their o_cmp (selection dropped)
            assert calls[0] == (layers if native else 2), blk
