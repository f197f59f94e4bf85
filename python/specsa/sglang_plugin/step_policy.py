"""SpecSA's orchestrator inside SGLang: the planner picks the draft length of every step.

SGLang 0.5.17 already knows how to switch a speculative worker between draft lengths between
steps: `AdaptiveController` keeps one runtime state per candidate length (draft CUDA graphs,
TARGET_VERIFY graphs and attention backends captured at start-up) and swaps them atomically;
length 0 is plain decoding through the same verify path. What it decides with is a policy
object (`AdaptiveSpeculativeParams`: an EMA of accepted lengths, "try one more"). SpecSA
replaces that policy with `PlannerPolicy`, which runs `specsa.orchestrator.AdaptiveController`
on a latency profile measured for this GPU and model and the per-depth acceptance it observes:

    every verify step: stats <- observed accepted lengths; context <- context + committed
    every update_interval steps (after warm-up): length = argmax over candidates of
        E[accepted + 1 | chain(length), stats] / (draft_ms(length) + verify_ms(context, length + 1))
    with plain decoding (length 0) competing at decode_ms(context); hysteresis against flapping

inside the server's precision class and verify knobs (SPECSA_VERIFY; the planner never leaves
the class). `sweep` mode cycles through the candidates instead, so that the step timer
(SPECSA_STEP_TIMING) measures every length: `benchmark/sglang_profile.py` turns that into the
profile `auto` reads.

Chains only (topk 1), like SGLang's own adaptive mode; the candidates must not exceed
--speculative-num-steps, which sizes SGLang's buffers.
"""
from __future__ import annotations

import logging
import math
from collections import Counter

from sglang.srt.speculative.adaptive_runtime_state import (
    AdaptiveController as SGLangAdaptive,
)

from specsa.config import ConfigError, VerifyKnobs
from specsa.draft_tree import TreeSpec
from specsa.orchestrator import (
    PROFILES_DIR,
    AdaptiveController,
    gpu_folder,
    load_profile,
    match_profile,
    shape_key,
)
from specsa.orchestrator.planner import Candidates
from specsa.orchestrator.profile import Profile

from .settings import ENV_PLAN, StepPlan

log = logging.getLogger("specsa")


class PlannerPolicy:
    """The policy interface SGLang's AdaptiveController calls (that of
    `sglang.srt.speculative.adaptive_spec_params.AdaptiveSpeculativeParams`)."""

    def __init__(self, plan: StepPlan, max_steps: int, knobs: VerifyKnobs,
                 profile: Profile | None = None):
        self.plan = plan
        self.candidate_steps = list(plan.candidates(max_steps))
        self.current = max_steps if max_steps in self.candidate_steps else \
            self.candidate_steps[-1]
        self.context_len = 1.0          # committed length of the longest request (estimate)
        self.batch_size = 1
        self.steps_seen = 0
        self.chosen: Counter = Counter()    # verify steps run per draft length
        self.predicted_ms: float | None = None
        self._bs: list[int] | None = None
        self.ctl = None
        if plan.mode == "auto":
            if profile is None:
                raise ConfigError(f"{ENV_PLAN}=auto needs a latency profile")
            cand = Candidates(shapes=tuple(TreeSpec.chain(k) for k in self.candidate_steps
                                           if k > 0),
                              refresh_periods=(_nearest_period(profile, knobs.refresh_period),),
                              schedules=None if knobs.schedule is None else (knobs.schedule,),
                              allow_ar=0 in self.candidate_steps)
            self.ctl = AdaptiveController(profile, knobs.precision, cand)

    # -- SGLang's interface -------------------------------------------------------------
    def set_cuda_graph_bs(self, cuda_graph_bs: list[int] | None) -> None:
        self._bs = cuda_graph_bs

    def cuda_graph_bs_for_step(self, step: int) -> list[int] | None:
        return self._bs          # every length serves every captured batch size

    def get_steps_for_batch(self, batch_size: int) -> int:
        self.batch_size = max(1, int(batch_size))
        return self.current

    def on_verify_complete(self, num_correct_drafts_per_req: list[int],
                           batch_size: int) -> int | None:
        """Feed one verify step's accepted draft counts; the new length, or None."""
        acc = [int(a) for a in num_correct_drafts_per_req]
        if not acc:
            return None
        # the batch this step ran (SGLang's v2 worker does not call get_steps_for_batch): the
        # profile's step time depends on it (H100, 32K: 12.1 ms at batch 1, 15.6 at batch 8)
        self.batch_size = max(1, int(batch_size or len(acc)))
        self.chosen[self.current] += 1
        self.steps_seen += 1
        self.context_len += 1 + max(acc)
        if self.plan.mode == "sweep":
            if self.steps_seen % self.plan.every:
                return None
            i = self.candidate_steps.index(self.current)
            return self._set(self.candidate_steps[(i + 1) % len(self.candidate_steps)])
        ctx = int(self.context_len)
        if self.ctl.strategy is None:
            self.ctl.start(ctx, self.batch_size)
        self.ctl.observe(acc, depth=self.current)
        s = self.ctl.next_strategy(ctx, self.batch_size)
        self.predicted_ms = s.step_ms
        return self._set(s.depth if s.speculate else 0)

    # -- SpecSA's side --------------------------------------------------------------------
    def observe_context(self, seq_max: int) -> None:
        """The batch's longest committed length when the host knows it (prefill, or
        seq_lens_cpu); between those, on_verify_complete advances the estimate."""
        self.context_len = float(max(1, seq_max))

    def summary(self) -> dict:
        return {"mode": self.plan.mode, "candidates": self.candidate_steps,
                "current": self.current, "steps_per_length": dict(self.chosen)}

    def _set(self, steps: int) -> int | None:
        if steps == self.current:
            return None
        log.info("specsa plan: draft length %d -> %d (context %d, batch %d)", self.current,
                 steps, int(self.context_len), self.batch_size)
        self.current = steps
        return steps


class SpecsaAdaptive(SGLangAdaptive):
    """SGLang's state switcher with SpecSA's policy (no SGLang adaptive config file)."""

    def __init__(self, worker, policy: PlannerPolicy):
        self.worker = worker
        self.params = policy
        self._states = {}


def _nearest_period(profile: Profile, period: int) -> int:
    """The server runs one refresh period (SPECSA_VERIFY); the planner predicts with it, or
    with the nearest one the profile measured (log2 distance, ties to the smaller: what the
    profile's own lookup does) when the profile lacks it."""
    have = sorted({r for sc in profile.schedules() for r in profile.refresh_periods(sc)})
    if period in have or not have:
        return period
    near = min(have, key=lambda r: (abs(math.log2(r) - math.log2(period)), r))
    log.warning("specsa plan: the profile has no refresh period %d; predicting with %d",
                period, near)
    return near


def find_profile(model_config, device_name: str) -> Profile:
    """The profile under configs/profiles/<gpu>/ whose model shape is the target's."""
    hf = model_config.hf_config
    want = shape_key(model_config.num_hidden_layers, hf.hidden_size, hf.num_attention_heads,
                     getattr(hf, "num_key_value_heads", hf.num_attention_heads),
                     getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                     hf.vocab_size)
    folder = PROFILES_DIR / gpu_folder(device_name)
    prof = match_profile(folder, want)
    if prof is not None:
        return prof
    raise ConfigError(
        f"{ENV_PLAN}=auto: no latency profile for this GPU and model shape in {folder} "
        f"(layers, hidden, heads, kv heads, head_dim, vocab = {want}); measure one with "
        f"{ENV_PLAN}=sweep and benchmark/sglang_profile.py, then pass "
        f"{ENV_PLAN}=auto,profile=PATH")


def make_controller(worker, plan: StepPlan, knobs: VerifyKnobs) -> SpecsaAdaptive:
    """The controller a SpecSA worker installs as `adaptive_controller`."""
    if (worker.topk or 1) != 1:
        raise ConfigError(f"{ENV_PLAN}={plan.mode}: per-step draft lengths need chains "
                          f"(--speculative-eagle-topk 1), got topk {worker.topk}")
    profile = None
    if plan.mode == "auto":
        runner = worker._target_worker.model_runner
        profile = load_profile(plan.profile) if plan.profile else \
            find_profile(runner.model_config, _device_name(runner.device))
    policy = PlannerPolicy(plan, int(worker.speculative_num_steps), knobs, profile)
    log.warning("specsa plan: %s over draft lengths %s", plan.mode, policy.candidate_steps)
    if profile is not None:
        # the planner prices draft steps with the profile's first draft entry: a shipped
        # profile measured another draft than this server's unless the user swept their own
        log.warning("specsa plan: draft step cost %.3f ms from profile entry %r (%s); for "
                    "another draft measure a profile with SPECSA_PLAN=sweep",
                    profile.draft[0].step_ms, profile.draft[0].name,
                    plan.profile or "configs/profiles, matched by GPU and model shape")
    return SpecsaAdaptive(worker, policy)


def _device_name(device) -> str:
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"
