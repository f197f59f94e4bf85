"""The model's TRITON attention path (kernels under TRITON_INTERPRET=1 on CPU) against the
TORCH path (masked_nsa): logits of prefill (in-place chunks and verifier chains, mixed in one
batch), decode and tree verification; the committed cache after a fused commit; the PendingKV
contract (verification writes nothing, rejected nodes leave no trace, exact page counts);
greedy AR and speculative generation token-identical to AR on the torch path."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import DEV, assert_close
from specsa.config import CacheConfig, ConfigError, SamplingConfig
from specsa.model import BlockInput, load_model
from specsa.model.nsa_layer import AttnImpl, resolve_attn_impl
from specsa.model.triton_forward import Refresh, TritonOptions
from specsa.model.tiny import build_tiny
from specsa.runtime.drafters import OracleDrafter
from specsa.runtime.generate import generate
from specsa.runtime.loop import speculative_generate
from specsa.draft_tree import TreeSpec

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton path on CPU needs TRITON_INTERPRET=1")
# whole-model runs under the interpreter take 10-17 s each on 2 CPU cores: `slow`, so that
# `make test-quick` (-m "not slow") skips them; `make test` runs them
slow = pytest.mark.slow

SPARSE = "block=8,stride=4,select=16,topn=4,window=32"
# small prefill_chain so that ~100-token prompts exercise both prefill kinds cheaply
OPTS = dict(prefill_chain=24)

_MODELS: dict = {}


def _model(tmp_path_factory, native: bool, g: int):
    key = (native, g)
    if key not in _MODELS:
        hq = 4 if g == 4 else 2
        # G=1 models have one layer (interpreter time); the G=4 ones cover multi-layer commit
        d = build_tiny(tmp_path_factory.mktemp("m"), kind="llama", native=native, seed=5,
                       num_heads=hq, num_kv_heads=hq // g, head_dim=16,
                       num_layers=2 if g == 4 else 1)
        _MODELS[key] = load_model(d, nsa_overrides=SPARSE, device=DEV)
    return _MODELS[key]


def _run_scenario(m, impl: str, ps: int, schedule: str, snapshots: list | None = None):
    """Two requests: mixed prefill batch, verifier chain, tree + decode batch with a partial
    commit, then a decode batch. Returns per-step logits, the final cache and lengths."""
    m.set_attn_impl(impl, TritonOptions(schedule=schedule, **OPTS))
    gen = torch.Generator().manual_seed(11)
    ids0 = torch.randint(0, m.cfg.vocab_size, (85,), generator=gen).tolist()
    ids1 = torch.randint(0, m.cfg.vocab_size, (23,), generator=gen).tolist()
    cache = m.new_cache(CacheConfig(page_size=ps, num_pages=-(-140 // ps) + 4))
    cache.add_request(0)
    cache.add_request(1)
    logits = []
    # 1: r0 a 40-token chunk (prefill kind), r1 a 23-token chain (verifier)
    lg, pend = m(cache, [BlockInput(0, ids0[:40]), BlockInput(1, ids1)])
    cache.commit(0, pend)
    cache.commit(1, pend)
    logits.append(lg)
    # 2: r0 the rest in one prefill chunk, 3: nothing for r1 yet
    lg, pend = m(cache, [BlockInput(0, ids0[40:])], last_only=True)
    cache.commit(0, pend)
    logits.append(lg)
    # 3: r0 a tree at positions 85..87 (depth-2 nodes close compressed token 20) with r1
    # decoding at position 23 (closes token 4)
    before = [t.clone() for t in (cache.k, cache.v, cache.ck, cache.cv)]
    lg, pend = m(cache, [BlockInput(0, [7, 8, 9, 10, 11, 12], [-1, 0, 0, 1, 1, 2]),
                         BlockInput(1, [5])])
    if snapshots is not None:
        snapshots.append([torch.equal(a, b) for a, b in
                          zip(before, (cache.k, cache.v, cache.ck, cache.cv))])
    logits.append(lg)
    cache.commit(0, pend, [0, 1, 4])
    cache.commit(1, pend)
    # 4: both decode
    lg, pend = m(cache, [BlockInput(0, [3]), BlockInput(1, [4])])
    cache.commit(0, pend)
    cache.commit(1, pend)
    logits.append(lg)
    return logits, cache


def _committed(cache, rid):
    out = []
    for layer in range(cache.num_layers):
        k, v = cache.committed_kv(rid, layer)
        ck, cv = cache.committed_cmp(rid, layer)
        out += [k, v, ck, cv]
    return out


@slow
@pytest.mark.parametrize("native,g,ps,schedule", [
    pytest.param(False, 4, 16, "exact_merged", id="union-G4-ps16-merged"),
    pytest.param(False, 1, 1, "independent", id="union-G1-ps1-indep"),
    pytest.param(True, 4, 1, "exact_merged", id="gated-G4-ps1-merged"),
    pytest.param(True, 1, 16, "exact_merged", id="gated-G1-ps16-merged"),
])
def test_triton_logits_match_torch(tmp_path_factory, native, g, ps, schedule):
    m = _model(tmp_path_factory, native, g)
    ref, ref_cache = _run_scenario(m, "torch", ps, schedule)
    snaps: list = []
    got, cache = _run_scenario(m, "triton", ps, schedule, snaps)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, what=f"step {step} logits")
    assert snaps == [[True] * 4], "verification wrote into the cache"
    for rid in (0, 1):
        assert cache.length(rid) == ref_cache.length(rid)
        assert len(cache.block_table(rid)) == -(-cache.length(rid) // ps)
        for x, y in zip(_committed(cache, rid), _committed(ref_cache, rid)):
            assert_close(x, y, what=f"committed cache of request {rid}")
    assert cache.num_free_pages == ref_cache.num_free_pages


@slow
def test_rejected_nodes_leave_no_trace(tmp_path_factory):
    """Committing a partial path on the TRITON path equals verifying only that path."""
    m = _model(tmp_path_factory, False, 4)
    m.set_attn_impl("triton", TritonOptions(**OPTS))
    ids = torch.randint(0, m.cfg.vocab_size, (30,)).tolist()
    outs = []
    for tree, par, path in (([7, 8, 9, 10], [-1, 0, 0, 2], [0, 2, 3]), ([7, 9, 10], None, None)):
        cache = m.new_cache(CacheConfig(page_size=4, num_pages=12))
        cache.add_request(0)
        cache.commit(0, m(cache, [BlockInput(0, ids)])[1])
        cache.commit(0, m(cache, [BlockInput(0, tree, par)])[1], path)
        lg, _ = m(cache, [BlockInput(0, [5])])
        outs.append((lg, _committed(cache, 0), cache.num_free_pages))
    assert_close(outs[0][0], outs[1][0], what="decode after partial commit")
    for x, y in zip(outs[0][1], outs[1][1]):
        assert_close(x, y, what="committed cache")
    assert outs[0][2] == outs[1][2]


@slow
@pytest.mark.parametrize("native", [False, True], ids=["union", "gated"])
def test_greedy_ar_tokens_identical(tmp_path_factory, native):
    m = _model(tmp_path_factory, native, 4)
    prompt = torch.randint(0, m.cfg.vocab_size, (72,)).tolist()
    sampling = SamplingConfig(max_new_tokens=6)
    m.set_attn_impl("torch")
    ref = generate(m, [prompt], sampling, chunk_size=40)[0][0].tokens
    m.set_attn_impl("triton", TritonOptions(**OPTS))
    got = generate(m, [prompt], sampling, chunk_size=40)[0][0].tokens
    assert got == ref


@slow
@pytest.mark.parametrize("native,spec,refresh", [
    pytest.param(False, TreeSpec(topk=2, depth=3, tokens=6), "grouped", id="union-tree"),
    # the per-row score_topk refresh (TritonOptions.refresh), kept for benchmarks
    pytest.param(False, TreeSpec(topk=2, depth=3, tokens=6), "per_row", id="union-tree-per_row"),
    pytest.param(True, TreeSpec.chain(3), "grouped", id="gated-chain"),
])
def test_speculative_triton_equals_ar_torch(tmp_path_factory, native, spec, refresh):
    m = _model(tmp_path_factory, native, 4)
    prompt = torch.randint(0, m.cfg.vocab_size, (70,)).tolist()
    sampling = SamplingConfig(max_new_tokens=10)
    m.set_attn_impl("torch")
    ref = generate(m, [prompt], sampling, chunk_size=48)[0][0].tokens
    drafter = OracleDrafter(0.7, spec, m.cfg.vocab_size, seed=1)
    drafter.set_truth(0, prompt + ref)
    m.set_attn_impl("triton", TritonOptions(refresh=refresh, **OPTS))
    res, stats = speculative_generate(m, [prompt], drafter, sampling, chunk_size=48)
    assert res[0].tokens == ref
    assert stats.verify_steps < len(ref)       # some drafts were accepted


def test_attn_impl_parsing(monkeypatch):
    assert resolve_attn_impl(None, "cpu") is AttnImpl.TORCH
    assert resolve_attn_impl("auto", "cuda") is AttnImpl.TRITON
    assert resolve_attn_impl("TORCH", "cuda") is AttnImpl.TORCH
    with pytest.raises(ConfigError, match="attn_impl"):
        resolve_attn_impl("flash", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        resolve_attn_impl("triton", "cpu")
    with pytest.raises(ConfigError, match="prefill_chain"):
        TritonOptions(prefill_chain=65)
    assert TritonOptions().refresh is Refresh.GROUPED
    assert TritonOptions(refresh="PER_ROW").refresh is Refresh.PER_ROW
    with pytest.raises(ConfigError, match="refresh"):
        TritonOptions(refresh="fused")
