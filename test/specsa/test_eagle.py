"""EAGLE / EAGLE-3 draft heads in the runtime (`--draft eagle:DIR`, docs/DESIGN.md section 8):
tiny heads written as HF checkpoints in SGLang's formats, the target's hidden-state capture,
greedy speculative output equal to autoregressive NSA with chains and trees (random heads, and
"mimic" heads that predict what a damped target predicts from the current token, so that
multi-token accepts happen), hot-token vocabularies, sampled chains, load errors, the CLI.

Acceptance is printed (pytest -s): random heads accept almost nothing, mimic heads most drafts.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from specsa.config import CacheConfig, SamplingConfig
from specsa.model import BlockInput, load_model
from specsa.model.eagle import EagleConfig, eagle_kind
from specsa.model.tiny import build_tiny, build_tiny_eagle, damp_layers
from specsa.runtime.drafters import DraftError, DraftRequest, DraftSpec, parse_draft_spec
from specsa.runtime.drafters.build import build_drafter
from specsa.runtime.generate import generate
from specsa.runtime.loop import speculative_generate
from specsa.draft_tree import TreeSpec

NEW = 20
GREEDY = SamplingConfig(max_new_tokens=NEW)
SHAPES = {"chain": TreeSpec.chain(3), "tree": TreeSpec(topk=2, depth=3, tokens=6)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """4-layer targets (random; damped) with random and mimic EAGLE / EAGLE-3 heads."""
    root = tmp_path_factory.mktemp("eagle")
    t = build_tiny(root / "target", kind="llama", seed=0, num_layers=4)
    d = damp_layers(build_tiny(root / "damped", kind="llama", seed=0, num_layers=4), 0.2)
    return {
        "target": t, "damped": d,
        ("random", "eagle"): build_tiny_eagle(root / "e1", t, kind="eagle", seed=1),
        ("random", "eagle3"): build_tiny_eagle(root / "e3", t, kind="eagle3", seed=2,
                                               draft_vocab_size=256),
        ("mimic", "eagle"): build_tiny_eagle(root / "m1", d, kind="eagle", seed=1, mimic=True),
        ("mimic", "eagle3"): build_tiny_eagle(root / "m3", d, kind="eagle3", seed=2,
                                              mimic=True),
    }


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1234)   # longer than the tiny NSA window (32): sparse attention
    return [[rng.randrange(2, 512) for _ in range(n)] for n in (130, 70)]


@pytest.fixture(scope="module")
def models(ckpts):
    return {"random": load_model(ckpts["target"]), "mimic": load_model(ckpts["damped"])}


@pytest.fixture(scope="module")
def references(models, prompts):
    return {k: [r.tokens for r in generate(m, prompts, GREEDY)[0]] for k, m in models.items()}


def test_parse_spec():
    assert parse_draft_spec("eagle:/x/y") == DraftSpec("eagle", path="/x/y")
    with pytest.raises(DraftError, match="eagle:DIR needs a checkpoint directory"):
        parse_draft_spec("eagle:")


def test_checkpoint_formats(ckpts):
    """The configs SGLang maps to its EAGLE classes, the weight names its loaders read."""
    from safetensors.torch import load_file
    c1 = json.loads((ckpts["random", "eagle"] / "config.json").read_text())
    c3 = json.loads((ckpts["random", "eagle3"] / "config.json").read_text())
    assert c1["architectures"] == ["LlamaForCausalLMEagle"] and eagle_kind(c1) == "eagle"
    assert c3["architectures"] == ["LlamaForCausalLMEagle3"] and eagle_kind(c3) == "eagle3"
    assert c3["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    w1 = load_file(str(ckpts["random", "eagle"] / "model.safetensors"))
    w3 = load_file(str(ckpts["random", "eagle3"] / "model.safetensors"))
    assert w1["fc.weight"].shape == (64, 128) and "fc.bias" in w1
    assert "layers.0.input_layernorm.weight" not in w1 and "lm_head.weight" not in w1
    assert w3["fc.weight"].shape == (64, 192) and w3["lm_head.weight"].shape == (256, 64)
    assert w3["midlayer.self_attn.q_proj.weight"].shape[1] == 128
    assert w3["d2t"].shape == (256,) and int(w3["t2d"].sum()) == 256
    assert EagleConfig.from_hf(c3).target_capture(4) == (1, 2, 3)
    # SGLang's default aux layers (2, n // 2, n - 3 as layer inputs) on a 32-layer target
    del c3["eagle_config"]
    assert EagleConfig.from_hf(c3).target_capture(32) == (2, 16, 29)


def test_target_capture_leaves_logits_unchanged(ckpts, prompts):
    """The features the target returns: EAGLE the final normed hidden state (the LM head's
    input), EAGLE-3 the outputs of layers 0, 1, 2 (the inputs of layers 1, 2, 3)."""
    model = load_model(ckpts["target"])
    cache = model.new_cache(CacheConfig(page_size=16, num_pages=32))
    cache.add_request(0)
    block = [BlockInput(0, prompts[1][:40])]
    base, pend = model(cache, block)
    assert pend.hidden is None
    model.set_hidden_capture("final")
    logits, pend = model(cache, block)
    torch.testing.assert_close(logits, base)
    with torch.inference_mode():
        torch.testing.assert_close(model.lm_head(pend.hidden).float(), base)
    model.set_hidden_capture((1, 2, 3))
    logits, pend = model(cache, block, last_only=True)
    torch.testing.assert_close(logits, base[-1:])
    assert pend.hidden.shape == (40, 3 * 64)        # every row, even with last_only
    with pytest.raises(ValueError, match=r"must be in \[1, 3\]"):
        model.set_hidden_capture((0, 1))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
@pytest.mark.parametrize("head", ["random", "mimic"])
def test_greedy_equals_autoregressive(ckpts, models, references, prompts, head, kind, shape):
    model = models[head]
    drafter = build_drafter(f"eagle:{ckpts[head, kind]}", model, SHAPES[shape], GREEDY, None)
    res, st = speculative_generate(model, prompts, drafter, GREEDY)
    assert [r.tokens for r in res] == references[head]
    print(f"\n{head} {kind} {shape}: accept histogram {st.accept_histogram}, mean accepted "
          f"length {st.mean_accept_len:.2f}, {st.request_steps} request-steps")
    assert not drafter.features and not drafter.cached       # released with the requests
    if head == "mimic":
        assert st.mean_accept_len > 1.4, st.accept_histogram


def test_hot_vocabulary_drafts_hot_tokens_only(ckpts, models, prompts):
    model = models["random"]
    d = build_drafter(f"eagle:{ckpts['random', 'eagle3']}", model, SHAPES["tree"], GREEDY, None)
    hot = set(d.model.hot_ids.tolist())
    assert len(hot) == 256
    seen = []

    def hook(rid, tree, logits, acc):
        seen.extend(int(t) for t in tree.tokens[1:])
    speculative_generate(model, prompts[:1], d, GREEDY, hook=hook)
    assert seen and set(seen) <= hot


def test_sampled_chain(ckpts, models, prompts):
    """Sampled chains carry the head's q over the target vocabulary, zero off its hot tokens."""
    model = models["random"]
    s = SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=40, seed=3)
    d = build_drafter(f"eagle:{ckpts['random', 'eagle3']}", model, TreeSpec.chain(3), s, None,
                      seed=3)
    drafts, propose = [], d.propose

    def spy(reqs):
        out = propose(reqs)
        drafts.extend(out)
        return out
    d.propose = spy
    res, _ = speculative_generate(model, prompts[:1], d, s)
    assert len(res[0].tokens) == 8 and drafts and not d.features
    off = torch.ones(512, dtype=torch.bool)
    off[d.model.hot_ids] = False
    for dr in drafts:
        q = dr.draft_probs[:3]
        torch.testing.assert_close(q.sum(-1), torch.ones(3))
        assert float(q[:, off].sum()) == 0.0


def test_propose_needs_target_features(ckpts, models, prompts):
    d = build_drafter(f"eagle:{ckpts['random', 'eagle']}", models["random"], SHAPES["chain"],
                      GREEDY, None)
    with pytest.raises(DraftError, match="needs the target's hidden states"):
        d.propose([DraftRequest(0, tuple(prompts[0]))])


def test_load_errors(ckpts, tmp_path):
    two = load_model(build_tiny(tmp_path / "two", kind="llama", seed=0, num_layers=2))
    with pytest.raises(DraftError, match="eagle_aux_hidden_state_layer_ids"):
        build_drafter(f"eagle:{ckpts['random', 'eagle3']}", two, SHAPES["chain"], GREEDY, None)
    wide = load_model(build_tiny(tmp_path / "wide", kind="llama", seed=0, num_layers=4,
                                 vocab_size=600))
    with pytest.raises(DraftError, match="vocab_size 512 differs from the target's 600"):
        build_drafter(f"eagle:{ckpts['random', 'eagle']}", wide, SHAPES["chain"], GREEDY, None)
    with pytest.raises(DraftError, match="not an EAGLE head"):
        build_drafter(f"eagle:{ckpts['target']}", two, SHAPES["chain"], GREEDY, None)
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = json.loads((ckpts["random", "eagle"] / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    w = load_file(str(ckpts["random", "eagle"] / "model.safetensors"))
    del w["fc.bias"]
    save_file(w, str(broken / "model.safetensors"))
    with pytest.raises(DraftError, match="missing weight 'fc.bias'"):
        build_drafter(f"eagle:{broken}", load_model(ckpts["target"]), SHAPES["chain"], GREEDY,
                      None)


def test_cli_generate_with_eagle(ckpts, capsys):
    from specsa.cli import main
    assert main(["generate", "--model", str(ckpts["damped"]), "--prompt", "hello world " * 10,
                 "--mode", "specsa", "--draft", f"eagle:{ckpts['mimic', 'eagle3']}",
                 "--tree", "topk=2,depth=3,tokens=6", "--max-new-tokens", "10",
                 "--ignore-eos", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["mode"] == "specsa" and len(rep["tokens"]) == 10
    assert rep["draft"].startswith("eagle:") and rep["mean_accept_len"] >= 1.0
    with pytest.raises(SystemExit) as e:       # a usage error, before the target loads
        main(["generate", "--model", str(ckpts["damped"]), "--prompt", "hi", "--mode",
              "specsa", "--draft", "eagle:/does/not/exist"])
    assert e.value.code == 2
    assert "draft model folder '/does/not/exist' does not exist" in capsys.readouterr().err
