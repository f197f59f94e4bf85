"""The per-step orchestrator inside SGLang (SPECSA_PLAN, sglang_plugin/step_policy.py): parsing,
the planner policy's choices on synthetic profiles, and CPU servers whose draft length changes
between steps (sweep, and auto falling back to plain decoding) with greedy output equal to the
runtime's NSA AR tokens."""
from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("sglang")

from specsa.config import ConfigError, PrecisionClass, VerifyKnobs
from specsa.orchestrator import Profile
from specsa.sglang_plugin.settings import StepPlan, step_plan

NEW = 24


def profile_dict(verify_ms: float, decode_ms: float = 10.0, draft_step: float = 1.0,
                 periods=(1,)) -> dict:
    """A toy-model profile: verify of T queries costs verify_ms + 0.1 (T - 1) at any context
    (refresh period R > 1 saves 0.5 ms)."""
    ctxs, toks = (64, 65536), (2, 3, 4)
    return {
        "schema": "specsa.profile/1", "gpu": "synthetic",
        "model": {"name": "toy", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                  "num_kv_heads": 2, "head_dim": 16, "vocab_size": 512},
        "metadata": {"source": "test_sglang_step_policy"},
        "decode": [{"context": c, "batch": 1, "ms": decode_ms} for c in ctxs],
        "draft": [{"name": "toy", "step_ms": draft_step, "token_ms": 0.0}],
        "verify": [{"context": c, "tokens": t, "traversal": "chain", "schedule": "independent",
                    "group_size": 1, "refresh_period": r, "batch": 1,
                    "ms": verify_ms + 0.1 * (t - 1) - 0.5 * (r > 1)}
                   for c in ctxs for t in toks for r in periods]}


def test_step_plan_parse():
    assert step_plan({}) == StepPlan()
    assert step_plan({"SPECSA_PLAN": "off"}).mode == "off"
    p = step_plan({"SPECSA_PLAN": "auto"})
    assert (p.mode, p.steps, p.profile) == ("auto", None, None)
    assert p.candidates(3) == (0, 1, 2, 3) and p.candidates(5) == (0, 1, 3, 5)
    p = step_plan({"SPECSA_PLAN": "auto,steps=3:0:1,profile=/Some/Path.json"})
    assert p.steps == (0, 1, 3) and p.profile == "/Some/Path.json"
    assert step_plan({"SPECSA_PLAN": "sweep,steps=1:2,every=3"}) == \
        StepPlan(mode="sweep", steps=(1, 2), every=3)
    with pytest.raises(ConfigError, match="exceed --speculative-num-steps 2"):
        step_plan({"SPECSA_PLAN": "auto,steps=0:3"}).candidates(2)
    for bad in ("fast", "auto,every=2", "sweep,profile=x.json", "auto,steps=a:1",
                "sweep,every=0", "auto,steps=1,steps=2", "auto,steps=0"):
        with pytest.raises(ConfigError, match="SPECSA_PLAN"):
            step_plan({"SPECSA_PLAN": bad})


def _policy(plan: StepPlan, verify_ms: float, knobs: VerifyKnobs | None = None, periods=(1,)):
    from specsa.sglang_plugin.step_policy import PlannerPolicy
    prof = Profile.from_dict(profile_dict(verify_ms, periods=periods))
    return PlannerPolicy(plan, 3, knobs or VerifyKnobs(), prof)


def _run(policy, accepted: int, steps: int = 40) -> list[int]:
    seen = []
    for _ in range(steps):
        policy.get_steps_for_batch(1)
        k = policy.current
        policy.on_verify_complete([min(accepted, k)], 1)
        seen.append(policy.current)
    return seen


def test_policy_follows_acceptance_and_cost():
    # cheap verification, every draft accepted: the longest chain
    p = _policy(StepPlan(mode="auto"), verify_ms=10.5)
    assert _run(p, accepted=3)[-1] == 3
    assert p.predicted_ms == pytest.approx(1.0 * 3 + 10.5 + 0.3)
    # nothing accepted: plain decoding (length 0) wins, and the step counts say so
    p = _policy(StepPlan(mode="auto"), verify_ms=10.5)
    seen = _run(p, accepted=0, steps=60)
    assert 0 in seen and p.chosen[0] > 0
    # verification far dearer than decoding: no speculation even at full acceptance
    p = _policy(StepPlan(mode="auto"), verify_ms=60.0)
    assert _run(p, accepted=3)[-1] == 0
    # without 0 among the candidates the planner may not leave speculation
    p = _policy(StepPlan(mode="auto", steps=(1, 3)), verify_ms=60.0)
    assert set(_run(p, accepted=0, steps=60)) <= {1, 3}


def test_policy_sweep_cycles_and_knobs_stay_in_class():
    from specsa.sglang_plugin.step_policy import PlannerPolicy
    p = PlannerPolicy(StepPlan(mode="sweep", steps=(0, 1, 3), every=2), 3, VerifyKnobs())
    assert _run(p, accepted=1, steps=12) == [3, 0, 0, 1, 1, 3, 3, 0, 0, 1, 1, 3]
    # the planner predicts with the server's refresh period (SPECSA_VERIFY) when the profile
    # measured it, with the nearest measured one otherwise; it never picks another
    reuse2 = VerifyKnobs(precision=PrecisionClass.REUSE, refresh_period=2)
    p = _policy(StepPlan(mode="auto"), 10.5, reuse2, periods=(1, 2, 4))
    assert _run(p, accepted=3, steps=12)[-1] == 3
    assert p.ctl.strategy.refresh_period == 2
    p = _policy(StepPlan(mode="auto"), 10.5, reuse2, periods=(1,))
    assert _run(p, accepted=3, steps=12)[-1] == 3
    assert p.ctl.strategy.refresh_period == 1
    # STRICT never predicts with a reuse period, whatever the profile holds
    p = _policy(StepPlan(mode="auto"), 10.5, VerifyKnobs(), periods=(1, 2, 4))
    _run(p, accepted=3, steps=12)
    assert p.ctl.strategy.refresh_period == 1


def test_policy_predicts_for_the_batch_the_step_ran():
    # SGLang's v2 worker reports the batch only through on_verify_complete: the prediction must
    # use the profile's batch-8 times for a batch-8 step (the H100 run predicted batch 1's)
    from specsa.sglang_plugin.step_policy import PlannerPolicy
    d = profile_dict(10.5)
    d["decode"] += [dict(e, batch=8, ms=e["ms"] + 4.0) for e in d["decode"]]
    d["verify"] += [dict(e, batch=8, ms=e["ms"] + 4.0) for e in d["verify"]]
    p = PlannerPolicy(StepPlan(mode="auto"), 3, VerifyKnobs(), Profile.from_dict(d))
    for _ in range(12):
        p.on_verify_complete([3] * 8, 8)
    assert p.batch_size == 8 and p.current == 3
    assert p.predicted_ms == pytest.approx(1.0 * 3 + 10.5 + 0.3 + 4.0)
    for _ in range(12):
        p.on_verify_complete([3], 1)
    assert p.predicted_ms == pytest.approx(1.0 * 3 + 10.5 + 0.3)


@pytest.fixture(scope="module")
def model_and_ref(tmp_path_factory):
    from specsa.config import SamplingConfig
    from specsa.model.load import load_model
    from specsa.model.tiny import build_tiny
    from specsa.runtime.generate import generate
    m = build_tiny(tmp_path_factory.mktemp("plan") / "m", kind="llama", seed=0)
    rng = random.Random(11)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (170, 95)]
    res, _ = generate(load_model(str(m)), prompts, SamplingConfig(max_new_tokens=NEW))
    return str(m), prompts, [r.tokens for r in res]


# the CUDA path's code on CPU: the target on the Triton kernels and the draft's sink + window
# kernels under the interpreter (each runtime state builds its own backends, sized for its
# draft length, over one shared compressed cache)
TRITON_ENV = {"SPECSA_SGLANG_ATTN": "triton", "TRITON_INTERPRET": "1",
              "SPECSA_DRAFT_ATTN": "window=16,sink=8"}


@pytest.mark.slow
@pytest.mark.parametrize("plan,path", [("sweep,steps=0:1:3,every=2", "torch"),
                                       ("auto", "torch"),
                                       ("sweep,steps=0:1:3,every=2", "triton")])
def test_server_switches_draft_length_and_stays_exact(model_and_ref, tmp_path, plan, path):
    """Greedy tokens equal NSA AR while the draft length changes between steps: sweep visits
    0, 1 and 3; auto with a profile where verification costs 6 decode steps falls back to
    plain decoding (length 0) after its warm-up."""
    from specsa.sglang_plugin.harness import free_port, launch_server
    model, prompts, ref = model_and_ref
    env = {"SPECSA_PLAN": plan, "SPECSA_STEP_TIMING": str(tmp_path / "timing.json"),
           **(TRITON_ENV if path == "triton" else {})}
    if plan == "auto":
        prof = tmp_path / "toy.json"
        prof.write_text(json.dumps(profile_dict(verify_ms=60.0)))
        env["SPECSA_PLAN"] = f"auto,profile={prof}"
    args = ["--speculative-algo", "specsa", "--speculative-num-steps", "3",
            "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4"]
    with launch_server(model, free_port(), args, env=env) as srv:
        outs = [srv.generate(input_ids=p, max_new_tokens=NEW)["output_ids"] for p in prompts]
        log = srv.log_path.read_text()
    assert outs == ref
    assert "specsa plan: " in log, log[-3000:]
    if plan == "auto":
        assert "draft length 3 -> 0" in log, log[-3000:]
    else:
        for a, b in ((3, 0), (0, 1), (1, 3)):
            assert f"draft length {a} -> {b}" in log, log[-3000:]


def test_profile_folder_of_a_device():
    from specsa.orchestrator import PROFILES_DIR, gpu_folder
    assert gpu_folder("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_folder("NVIDIA H200") == "h200" and gpu_folder("cpu") == "cpu"
    assert gpu_folder("Some GPU X") == "some_gpu_x"
    assert (PROFILES_DIR / "cpu" / "tiny.json").is_file()
