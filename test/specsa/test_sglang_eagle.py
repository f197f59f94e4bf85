"""EAGLE / EAGLE-3 draft heads in SGLang (`--speculative-algo specsa
--speculative-draft-model-path HEAD`, docs/DESIGN.md section 8) on the CPU harness.

Fast: the draft kind is detected from the head's config.json and drives SpecsaAlgo's answers
and the worker class. Slow (one server each): an EAGLE-3 head drafting chains and an EAGLE
head drafting trees at page size 16, both "mimic" heads (`build_tiny_eagle(mimic=True)`) on a
damped 4-layer target so that multi-token accepts happen: greedy outputs equal autoregressive
NSA (the runtime's `generate`), and the EAGLE-3 chain server verifies exactly as many steps per
request as the runtime's EAGLE drafter (the same drafts: the runtime head follows SGLang's
classes). Acceptance is printed (pytest -s). Random heads (test_eagle.py) accept nothing here.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")
pytestmark = pytest.mark.sglang

NEW = 16
LEAK_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from specsa.model.tiny import build_tiny, build_tiny_eagle, damp_layers
    root = tmp_path_factory.mktemp("sglang_eagle")
    t = damp_layers(build_tiny(root / "target", kind="llama", seed=0, num_layers=4), 0.2)
    return {"target": str(t),
            "eagle": str(build_tiny_eagle(root / "eagle", t, kind="eagle", seed=1,
                                          mimic=True)),
            "eagle3": str(build_tiny_eagle(root / "eagle3", t, kind="eagle3", seed=2,
                                           mimic=True, draft_vocab_size=384))}


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1234)   # longer than the tiny NSA window (32): sparse attention
    return [[rng.randrange(2, 512) for _ in range(n)] for n in (230, 170, 131)]


@pytest.fixture(scope="module")
def target(models):
    from specsa.model.load import load_model
    return load_model(models["target"])


@pytest.fixture(scope="module")
def reference(target, prompts):
    """Greedy tokens of autoregressive NSA in the runtime (fp32)."""
    from specsa.config import SamplingConfig
    from specsa.runtime.generate import generate
    return [r.tokens for r in generate(target, prompts, SamplingConfig(max_new_tokens=NEW))[0]]


def test_draft_kind_detection(models):
    """The head's architecture decides the shape SGLang runs: EAGLE-3 / EAGLE / standalone."""
    from specsa.sglang_plugin import eagle as ek
    from specsa.sglang_plugin.algorithm import SpecsaAlgo

    algo = SpecsaAlgo("SPECSA", lambda sa: None)
    for draft, kind in ((models["eagle3"], "eagle3"), (models["eagle"], "eagle"),
                        (models["target"] + "/", "standalone"), (None, "standalone")):
        sa = SimpleNamespace(model_path=models["target"], speculative_draft_model_path=draft,
                             speculative_draft_model_revision=None, trust_remote_code=False)
        assert ek.resolve(sa) == kind and ek.kind_of(sa) == kind
        assert algo.is_standalone() == (kind == "standalone")      # this process's last one
        assert algo.is_eagle() == algo.carries_draft_hidden_states() == (kind != "standalone")
        assert algo.is_eagle3() == (kind == "eagle3")
    with pytest.raises(ValueError, match="MLA EAGLE"):
        ek.kind_of_architecture("Eagle3DeepseekV2ForCausalLM")


def _run(srv, prompts, reference):
    outs = []
    for i, (p, ref) in enumerate(zip(prompts, reference)):
        out = srv.generate(input_ids=p, max_new_tokens=NEW)
        assert out["output_ids"] == ref, f"prompt {i} differs from autoregressive NSA"
        outs.append(out["meta_info"])
    return outs


def _concurrent(srv, prompts, reference):
    assert srv.generate_concurrent(prompts, NEW) == reference


@pytest.mark.slow
def test_eagle3_chain_server(models, target, prompts, reference):
    from specsa.config import SamplingConfig
    from specsa.runtime.drafters.build import build_drafter
    from specsa.runtime.loop import speculative_generate
    from specsa.draft_tree import TreeSpec
    from specsa.sglang_plugin.harness import free_port, launch_server

    args = ["--speculative-algo", "specsa", "--speculative-draft-model-path", models["eagle3"],
            "--speculative-num-steps", "3"]
    with launch_server(models["target"], free_port(), args, env=LEAK_ENV) as srv:
        meta = _run(srv, prompts, reference)
        _concurrent(srv, prompts, reference)
        log = srv.log_path.read_text()
    assert "is an EAGLE-3 head (LlamaForCausalLMEagle3)" in log
    assert "type=LlamaForCausalLMEagle3" in log and "memory leak" not in log
    s = SamplingConfig(max_new_tokens=NEW)
    steps = []
    for p in prompts:
        d = build_drafter(f"eagle:{models['eagle3']}", target, TreeSpec.chain(3), s, None)
        steps.append(speculative_generate(target, [p], d, s)[1].request_steps)
    got = [m["spec_verify_ct"] for m in meta]
    print(f"\nEAGLE-3 chain: SGLang accept lengths {[round(m['spec_accept_length'], 2) for m in meta]},"
          f" verify steps {got}; runtime verify steps {steps}")
    assert got == steps
    assert max(m["spec_accept_length"] for m in meta) > 1.3


@pytest.mark.slow
def test_eagle_tree_server_page16(models, prompts, reference):
    from specsa.sglang_plugin.harness import free_port, launch_server

    args = ["--speculative-algo", "specsa", "--speculative-draft-model-path", models["eagle"],
            "--speculative-num-steps", "3", "--speculative-eagle-topk", "2",
            "--speculative-num-draft-tokens", "6", "--page-size", "16"]
    with launch_server(models["target"], free_port(), args, env=LEAK_ENV) as srv:
        meta = _run(srv, prompts, reference)
        again = srv.generate(input_ids=prompts[0], max_new_tokens=NEW)   # radix-cache hit
        assert again["output_ids"] == reference[0] and again["meta_info"]["cached_tokens"] >= 208
        log = srv.log_path.read_text()
    assert "is an EAGLE head (LlamaForCausalLMEagle)" in log and "memory leak" not in log
    acc = [round(m["spec_accept_length"], 2) for m in meta]
    print(f"\nEAGLE tree (topk 2, 3 steps, 6 tokens, page 16): SGLang accept lengths {acc}")
    assert max(acc) > 1.5
