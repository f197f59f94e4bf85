"""The orchestrator's AdaptiveController inside the speculative loop: it changes what is
drafted (shape, or no speculation at all), never what is emitted (STRICT class)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specsa.config import PrecisionClass, SamplingConfig
from specsa.model import load_model
from specsa.model.tiny import build_tiny
from specsa.orchestrator import AdaptiveController, load_profile
from specsa.runtime.drafters import OracleDrafter
from specsa.runtime.generate import generate
from specsa.runtime.loop import speculative_generate
from specsa.draft_tree import TreeSpec

PROFILE = Path(__file__).resolve().parents[2] / "configs" / "profiles" / "cpu" / "tiny.json"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(build_tiny(tmp_path_factory.mktemp("ctl") / "m", kind="llama"))


@pytest.mark.parametrize("p", [0.0, 0.9], ids=["accept-none", "accept-most"])
def test_controller_keeps_greedy_identity_and_adapts(model, p):
    prompt = torch.randint(3, 500, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    sampling = SamplingConfig(max_new_tokens=40)
    ref = generate(model, [prompt], sampling)[0][0].tokens
    drafter = OracleDrafter(p, TreeSpec.chain(4), model.cfg.vocab_size, seed=3)
    drafter.set_truth(0, prompt + ref)
    ctl = AdaptiveController(load_profile(PROFILE), PrecisionClass.STRICT, warmup=2,
                             update_interval=2, probe_interval=8)
    res, stats = speculative_generate(model, [prompt], drafter, sampling, controller=ctl)
    assert res[0].tokens == ref
    assert ctl.strategy is not None
    if p == 0.0:
        # nothing is ever accepted: the planner must stop drafting (AR steps emit 1 token)
        assert not ctl.strategy.speculate or ctl.switches > 0
        assert stats.tokens_per_forward == pytest.approx(1.0)
    else:
        assert stats.tokens_per_forward > 1.5


def test_controller_steps_report_predicted_and_measured(model):
    """Under a controller every verify step records the planner's predicted step time and the
    measured one, summarised in the JSON stats; a fixed plan records none."""
    prompt = torch.randint(3, 500, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    sampling = SamplingConfig(max_new_tokens=24)
    ref = generate(model, [prompt], sampling)[0][0].tokens
    drafter = OracleDrafter(0.8, TreeSpec.chain(4), model.cfg.vocab_size, seed=3)
    drafter.set_truth(0, prompt + ref)
    ctl = AdaptiveController(load_profile(PROFILE), PrecisionClass.STRICT)
    res, stats = speculative_generate(model, [prompt], drafter, sampling, controller=ctl)
    assert res[0].tokens == ref
    assert len(stats.planned_steps) == stats.verify_steps > 0
    assert all(p > 0 and m > 0 for p, m in stats.planned_steps)
    summary = stats.to_dict()["planner"]
    assert summary["steps"] == stats.verify_steps
    assert summary["measured_over_predicted"] == pytest.approx(
        summary["measured_ms"] / summary["predicted_ms"])
    drafter.set_truth(0, prompt + ref)
    _, fixed = speculative_generate(model, [prompt], drafter, sampling)
    assert fixed.planned_steps == [] and "planner" not in fixed.to_dict()
