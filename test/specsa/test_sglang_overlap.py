"""SGLang's overlap scheduler with `--speculative-algo specsa` (SPECSA_OVERLAP=on: the default
with CUDA, opt-in on the CPU harness) on the CPU harness: the host prepares step N+1 while
step N runs (SGLang's spec-v2 worker path, future maps, no host seq_lens in the verify batch). Greedy outputs must equal autoregressive NSA (the
runtime's `generate`) for a tree self-draft at page 1 (SGLang's standalone worker; the H100
run measured a chain with a separate draft model) and an EAGLE-3 chain head at page 16 (its
EAGLE worker), one request at a time and all at once, with no KV leak
(SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE). The server must report the overlap scheduler on.

One server per configuration; each start takes ~1-3 min on 2 cores.
"""
from __future__ import annotations

import random

import pytest

pytest.importorskip("sglang")
pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from specsa.sglang_plugin.harness import free_port, launch_server  # noqa: E402

NEW = 16
ENV = {"SPECSA_OVERLAP": "on", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from specsa.model.tiny import build_tiny, build_tiny_eagle, damp_layers
    root = tmp_path_factory.mktemp("sglang_overlap")
    # damped so that the mimic EAGLE-3 head's drafts are accepted (multi-token steps)
    target = damp_layers(build_tiny(root / "target", kind="llama", seed=0, num_layers=4), 0.2)
    return {"target": str(target),
            "eagle3": str(build_tiny_eagle(root / "eagle3", target, kind="eagle3", seed=2,
                                           mimic=True, draft_vocab_size=384))}


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1234)   # longer than the tiny NSA window (32): sparse attention
    return [[rng.randrange(2, 512) for _ in range(n)] for n in (230, 170, 131, 201)]


@pytest.fixture(scope="module")
def reference(models, prompts):
    from specsa.config import SamplingConfig
    from specsa.model.load import load_model
    from specsa.runtime.generate import generate
    model = load_model(models["target"])
    return [r.tokens for r in generate(model, prompts, SamplingConfig(max_new_tokens=NEW))[0]]


CONFIGS = {
    "tree-self-draft-ps1": lambda m: ["--speculative-num-steps", "3",
                                      "--speculative-eagle-topk", "2",
                                      "--speculative-num-draft-tokens", "6",
                                      "--context-length", "512"],
    "eagle3-chain-ps16": lambda m: ["--speculative-draft-model-path", m["eagle3"],
                                    "--speculative-num-steps", "3", "--page-size", "16"],
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_overlap_greedy_equals_ar(models, prompts, reference, config):
    args = ["--speculative-algo", "specsa", *CONFIGS[config](models)]
    with launch_server(models["target"], free_port(), args, env=ENV) as srv:
        status, info = srv.get("/get_server_info")
        assert status == 200 and info.get("disable_overlap_schedule") is False, \
            "the overlap scheduler is not on"
        for i, (p, ref) in enumerate(zip(prompts, reference)):
            out = srv.generate(input_ids=p, max_new_tokens=NEW)
            assert out["output_ids"] == ref, f"{config}: prompt {i} differs from AR NSA"
        assert srv.generate_concurrent(prompts, NEW) == reference, f"{config}: concurrent requests differ from AR NSA"
