"""The draft's sink + window attention (sglang_plugin/draft_backend.py) on the CPU harness
under the Triton interpreter: a tree self-draft (top-2, per-branch block tables at page 16)
whose draft decode and draft extend run the window kernel still gives exactly the runtime's
greedy tokens (the target verifies every draft token), and the drafts get accepted."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("sglang")
pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from specsa.sglang_plugin.harness import free_port, launch_server  # noqa: E402

NEW = 16


def test_window_draft_tree_equals_runtime(tmp_path):
    from specsa.config import SamplingConfig
    from specsa.model.load import load_model
    from specsa.model.tiny import build_tiny
    from specsa.runtime.generate import generate
    model = str(build_tiny(tmp_path / "m", kind="llama", seed=0))
    rng = random.Random(1234)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (230, 170)]
    ref = [r.tokens for r in generate(load_model(model), prompts,
                                      SamplingConfig(max_new_tokens=NEW))[0]]
    # window 16 + sink 8 on ~200-token prompts: the draft really sees a window
    env = {"SPECSA_SGLANG_ATTN": "triton", "TRITON_INTERPRET": "1",
           "SPECSA_DRAFT_ATTN": "window=16,sink=8"}
    args = ["--speculative-algo", "specsa", "--speculative-num-steps", "3",
            "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "4",
            "--page-size", "16"]
    with launch_server(model, free_port(), args, env=env) as srv:
        outs = [srv.generate(input_ids=p, max_new_tokens=NEW) for p in prompts]
        log = srv.log_path.read_text()
    assert [o["output_ids"] for o in outs] == ref
    assert "draft attention = sink 8 + window 16 through the fused kernel" in log
    assert max(o["meta_info"]["spec_accept_length"] for o in outs) > 1.5
