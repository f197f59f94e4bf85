"""Planner and adaptive controller on fixed synthetic profiles: precision classes, determinism,
the acceptance -> draft length relation, schedule choice, statistics and hysteresis."""
from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from specsa.config import ConfigError, PrecisionClass, Schedule, Traversal
from specsa.draft_tree import TreeSpec
from specsa.orchestrator import (PRECISION_RULES, AcceptanceStats, AdaptiveController, Candidates,
                                 Profile, allowed, expected_accepted, plan_strategy,
                                 score_strategy)

REPO = Path(__file__).resolve().parents[2]
CTX = (1024, 8192, 65536)
TOK = (2, 3, 4, 5, 7, 9, 13, 17, 33)


def make_profile(merged=0.8, shared=0.6, reuse_gain=0.25, decode_ms=10.0, draft_step=0.5,
                 batches=(1, 8)) -> Profile:
    """Verify cost = decode-like base + per-token growth of the attention part.

    merged / shared: cost of each extra verifier query under EXACT_MERGED / SHARED_INDEX
    relative to INDEPENDENT; reuse_gain: attention fraction saved at refresh period 4 (half
    at 2), for verify and decode alike."""
    verify = []
    for trav in ("chain", "bfs", "dfs"):
        for sched, cs in (("independent", (1,)), ("exact_merged", (2, 4)), ("shared_index", (4,))):
            for c in cs:
                for r in (1, 2, 4):
                    for b in batches:
                        for ctx in CTX:
                            for t in TOK:
                                f = {"independent": 1.0, "exact_merged": merged, "shared_index": shared}[sched]
                                f *= 1 + 0.01 * (c == 4)
                                f *= 1 + 0.02 * (trav == "dfs")
                                g = 1 - reuse_gain * {1: 0.0, 2: 0.5, 4: 1.0}[r]
                                # schedules change what each extra verifier query costs
                                attn = 0.4 * math.log2(ctx) * g * (1 + 0.35 * (t - 1) * f)
                                ms = (decode_ms * 0.6 + 0.08 * (t - 1)) * b ** 0.3 + attn
                                verify.append(dict(context=ctx, tokens=t, traversal=trav, schedule=sched,
                                                   group_size=c, refresh_period=r, batch=b, ms=ms))
    return Profile.from_dict({
        "schema": "specsa.profile/1", "gpu": "synthetic",
        "model": {"name": "toy", "num_layers": 4, "hidden_size": 64, "num_heads": 4,
                  "num_kv_heads": 1, "head_dim": 16, "vocab_size": 512},
        "metadata": {"source": "test_planner synthetic"},
        "decode": [{"context": c, "batch": b, "refresh_period": r,
                    "ms": (decode_ms * 0.6 * b ** 0.3 + 0.4 * math.log2(c)
                           * (1 - reuse_gain * {1: 0.0, 2: 0.5, 4: 1.0}[r]))}
                   for c in CTX for b in batches for r in (1, 2, 4)],
        "draft": [{"name": "self:1", "step_ms": draft_step, "token_ms": 0.01},
                  {"name": "ngram", "step_ms": 0.0, "token_ms": 0.001}],
        "verify": verify})


PROFILE = make_profile()


def const_stats(a: float) -> AcceptanceStats:
    return AcceptanceStats.initial(prior=a)


@pytest.mark.parametrize("precision", list(PrecisionClass), ids=lambda p: p.value)
def test_stays_inside_precision_class(precision):
    schedules, reuse = PRECISION_RULES[precision]
    seen = set()
    for a in (0.0, 0.3, 0.6, 0.8, 0.95, 1.0):
        for ctx in (500, 1024, 5000, 65536, 200000):
            for b in (1, 3, 8):
                s = plan_strategy(PROFILE, const_stats(a), precision, ctx, b)
                assert s.schedule in schedules, (a, ctx, b, s)
                assert s.refresh_period == 1 or reuse, (a, ctx, b, s)
                assert allowed(precision, s.schedule, s.refresh_period)
                seen.add((s.schedule, s.refresh_period))
    # the extras each class allows are actually used on this profile (the test can fail)
    assert any(r > 1 for _, r in seen) == reuse
    assert any(sc is Schedule.SHARED_INDEX for sc, _ in seen) == (Schedule.SHARED_INDEX in schedules)


def test_precision_rules_match_config_file():
    doc = json.loads((REPO / "configs" / "precision_classes.json").read_text())
    for p, (schedules, reuse) in PRECISION_RULES.items():
        assert {Schedule(s) for s in doc[p.value]["schedules"]} == schedules
        assert doc[p.value]["index_reuse"] is reuse
        assert doc[p.value]["shared_index"] is (Schedule.SHARED_INDEX in schedules)


def test_deterministic_and_independent_of_entry_order():
    st = AcceptanceStats.initial(0.7).updated(3, 4).updated(1, 4)
    a = plan_strategy(PROFILE, st, PrecisionClass.APPROX_REUSE, 9000, 2)
    assert a == plan_strategy(PROFILE, st, PrecisionClass.APPROX_REUSE, 9000, 2)
    d = PROFILE.to_dict()
    random.Random(1).shuffle(d["verify"])
    random.Random(2).shuffle(d["decode"])
    assert plan_strategy(Profile.from_dict(d), st, PrecisionClass.APPROX_REUSE, 9000, 2) == a


@pytest.mark.parametrize("precision", list(PrecisionClass), ids=lambda p: p.value)
def test_no_speculation_when_acceptance_is_zero(precision):
    for a in (0.0, 0.01):
        s = plan_strategy(PROFILE, const_stats(a), precision, 8192)
        assert not s.speculate and s.depth == 0 and s.tokens == 0
        r = 4 if PRECISION_RULES[precision][1] else 1      # plain decoding may reuse indices too
        assert s.refresh_period == r
        assert s.tokens_per_s == pytest.approx(1000 / PROFILE.decode_ms(8192, 1, r))
    assert plan_strategy(PROFILE, const_stats(0.8), precision, 8192).speculate


def test_longer_drafts_as_acceptance_rises():
    chains = Candidates(shapes=tuple(TreeSpec.chain(g) for g in range(1, 33)))
    depths = [plan_strategy(PROFILE, const_stats(a), PrecisionClass.STRICT, 8192, 1, chains).depth
              for a in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)]
    assert depths == sorted(depths), depths
    assert depths[-1] > depths[1] > 0, depths
    # the full default space (chains and trees): more draft tokens as acceptance rises
    toks = [plan_strategy(PROFILE, const_stats(a), PrecisionClass.STRICT, 8192).tokens
            for a in (0.4, 0.7, 0.95)]
    assert toks == sorted(toks) and toks[-1] > toks[0], toks


def test_low_acceptance_prefers_trees_high_prefers_chains():
    """Siblings pay off when the top-1 draft is often wrong; deep chains when it is right."""
    lo = plan_strategy(PROFILE, const_stats(0.45), PrecisionClass.STRICT, 8192)
    hi = plan_strategy(PROFILE, const_stats(0.97), PrecisionClass.STRICT, 8192)
    assert lo.speculate and lo.topk > 1 and lo.traversal in (Traversal.BFS, Traversal.DFS)
    assert hi.topk == 1 and hi.traversal is Traversal.CHAIN and hi.depth >= 6


@pytest.mark.parametrize("merged,want", [pytest.param(0.7, Schedule.EXACT_MERGED, id="merged-faster"),
                                         pytest.param(1.2, Schedule.INDEPENDENT, id="merged-slower")])
def test_schedule_follows_profile(merged, want):
    prof = make_profile(merged=merged)
    for precision in (PrecisionClass.STRICT, PrecisionClass.REUSE):
        s = plan_strategy(prof, const_stats(0.8), precision, 8192)
        assert s.speculate and s.schedule is want
        if want is Schedule.EXACT_MERGED:
            assert s.group_size == 2          # C=4 is 1 % slower in this profile
        else:
            assert s.group_size == 1


def test_approx_uses_shared_index_only_when_faster():
    assert plan_strategy(make_profile(shared=0.5), const_stats(0.8), PrecisionClass.APPROX,
                         8192).schedule is Schedule.SHARED_INDEX
    assert plan_strategy(make_profile(shared=0.95), const_stats(0.8), PrecisionClass.APPROX,
                         8192).schedule is Schedule.EXACT_MERGED


def test_reuse_picks_refresh_period_from_profile():
    s = plan_strategy(make_profile(reuse_gain=0.25), const_stats(0.8), PrecisionClass.REUSE, 8192)
    assert s.refresh_period == 4
    s = plan_strategy(make_profile(reuse_gain=-0.1), const_stats(0.8), PrecisionClass.REUSE, 8192)
    assert s.refresh_period == 1


def test_objective_is_expected_tokens_over_step_time():
    st = AcceptanceStats.initial(0.75)
    s = plan_strategy(PROFILE, st, PrecisionClass.STRICT, 5000, 3)
    again = score_strategy(PROFILE, st, s, 5000, 3)
    assert again == s
    cost = PROFILE.draft[0].ms(s.depth, s.tokens, 3)
    ms = cost + PROFILE.verify_ms(5000, s.tokens + 1, s.schedule, s.traversal, s.group_size,
                                  s.refresh_period, 3)
    assert s.step_ms == pytest.approx(ms)
    assert s.tokens_per_s == pytest.approx(1000 * (1 + expected_accepted(s.shape, st)) / ms)
    # every other candidate is no faster (brute force over the same space)
    for shape in Candidates().shapes:
        if shape.tokens + 1 > 33:
            continue
        for sched in (Schedule.INDEPENDENT, Schedule.EXACT_MERGED):
            for c in ((1,) if sched is Schedule.INDEPENDENT else (2, 4)):
                trav = Traversal.CHAIN if shape.topk == 1 else Traversal.BFS
                other = replace(s, topk=shape.topk, depth=shape.depth, tokens=shape.tokens,
                                schedule=sched, group_size=c, traversal=trav, refresh_period=1)
                assert score_strategy(PROFILE, st, other, 5000, 3).tokens_per_s <= s.tokens_per_s + 1e-9


def test_expensive_drafter_shortens_drafts():
    chains = Candidates(shapes=tuple(TreeSpec.chain(g) for g in range(1, 33)))
    cheap = plan_strategy(make_profile(draft_step=0.05), const_stats(0.85), PrecisionClass.STRICT,
                          8192, 1, chains)
    dear = plan_strategy(make_profile(draft_step=3.0), const_stats(0.85), PrecisionClass.STRICT,
                         8192, 1, chains)
    assert 0 < dear.depth < cheap.depth


def test_shapes_outside_profile_token_range_are_skipped():
    big = Candidates(shapes=(TreeSpec.chain(40), TreeSpec.chain(2)))
    s = plan_strategy(PROFILE, const_stats(0.99), PrecisionClass.STRICT, 8192, 1, big)
    assert s.tokens == 2
    with pytest.raises(ConfigError, match="no speculative strategy"):
        plan_strategy(PROFILE, const_stats(0.9), PrecisionClass.STRICT, 8192, 1,
                      Candidates(shapes=(TreeSpec.chain(40),), allow_ar=False))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="precision: unknown value 'loose'"):
        plan_strategy(PROFILE, const_stats(0.5), "loose", 100)
    with pytest.raises(ConfigError, match="context_len"):
        plan_strategy(PROFILE, const_stats(0.5), PrecisionClass.STRICT, 0)
    with pytest.raises(ConfigError, match="tokens .* < depth"):
        Candidates(shapes=(TreeSpec(topk=2, depth=4, tokens=3),))


# -- expected accepted length ------------------------------------------------------------
def test_expected_accepted_chain_and_tree():
    st = AcceptanceStats(rates=(0.9, 0.5, 0.2) + (0.2,) * 5, seen=(1, 1, 1) + (0,) * 5)
    assert expected_accepted(TreeSpec.chain(1), st) == pytest.approx(0.9)
    assert expected_accepted(TreeSpec.chain(3), st) == pytest.approx(0.9 + 0.45 + 0.09)
    p1, p2 = 1 - 0.1 ** 2, 1 - 0.5 ** 2
    assert expected_accepted(TreeSpec(2, 2, 4), st) == pytest.approx(p1 + p1 * p2)
    # 5 tokens with topk 2: levels 2, 2, 1
    p3 = 0.2
    assert expected_accepted(TreeSpec(2, 3, 5), st) == pytest.approx(p1 + p1 * p2 + p1 * p2 * p3)


# -- statistics ----------------------------------------------------------------------------
def test_stats_ema_per_depth():
    s = AcceptanceStats.initial(prior=0.5, alpha=0.25).updated(accepted=2, depth=4)
    assert s.rates[:3] == pytest.approx((0.625, 0.625, 0.375))
    assert s.seen[:4] == (1, 1, 1, 0) and s.steps == 1
    assert s.rate(4) == pytest.approx(0.375)      # unobserved: deepest observed depth's rate
    assert s.rate(60) == pytest.approx(0.375)
    full = s.updated(4, 4)
    assert full.rates[3] == pytest.approx(0.75 * 0.375 + 0.25)
    w = AcceptanceStats.initial(prior=0.5, alpha=0.25).updated(accepted=1, depth=1, width=2)
    r = 0.75 * (1 - 0.5 ** 2) + 0.25
    assert w.rates[0] == pytest.approx(1 - (1 - r) ** 0.5)
    assert s.updated(0, 0) is s                    # no speculation: nothing tested
    with pytest.raises(ConfigError, match="accepted <= depth"):
        s.updated(5, 4)


def test_stats_from_histogram():
    s = AcceptanceStats.from_histogram([10, 20, 30, 40], depth=3)
    assert s.rate(1) == pytest.approx(90 / 100)
    assert s.rate(2) == pytest.approx(70 / 90)
    assert s.rate(3) == pytest.approx(40 / 70)
    assert s.steps == 100
    with pytest.raises(ConfigError, match="does not fit"):
        AcceptanceStats.from_histogram([1, 2, 3, 4, 5], depth=3)


def test_stats_converge_to_true_rate():
    rng = random.Random(0)
    s = AcceptanceStats.initial(prior=0.2, alpha=0.01)
    for _ in range(3000):
        acc = 0
        while acc < 4 and rng.random() < 0.8:
            acc += 1
        s = s.updated(acc, 4)
    assert all(abs(s.rate(k) - 0.8) < 0.1 for k in range(1, 5))


# -- adaptive controller -------------------------------------------------------------------
def _drive(ctl: AdaptiveController, accepted_for, steps: int, ctx: int = 8192) -> list:
    hist = []
    for i in range(steps):
        s = ctl.next_strategy(ctx + i)
        hist.append(s)
        ctl.observe(accepted_for(i, s) if s.speculate else 0)
    return hist


def test_controller_adapts_to_acceptance():
    ctl = AdaptiveController(make_profile(), PrecisionClass.STRICT,
                             stats=AcceptanceStats.initial(0.6), warmup=2, update_interval=2)
    first = ctl.start(8192)
    assert first.speculate
    hist = _drive(ctl, lambda i, s: s.depth, 40)           # every draft accepted
    assert hist[-1].speculate and hist[-1].depth > first.depth
    hist = _drive(ctl, lambda i, s: 0, 40)                  # nothing accepted any more
    assert not hist[-1].speculate


def test_controller_probes_after_plain_decoding():
    ctl = AdaptiveController(make_profile(), PrecisionClass.STRICT,
                             stats=AcceptanceStats.initial(0.0), probe_interval=5,
                             update_interval=3, warmup=0)
    assert not ctl.start(8192).speculate
    hist = _drive(ctl, lambda i, s: s.depth, 30)            # drafts would be accepted
    assert not hist[4].speculate and hist[5].speculate      # probe after 5 plain steps
    assert hist[-1].speculate and hist[-1].depth > 1


CHAINS = Candidates(shapes=tuple(TreeSpec.chain(g) for g in range(1, 17)))


def _tie_point() -> float:
    """Acceptance rate where the best chain length changes (bisection)."""
    depth = lambda a: plan_strategy(PROFILE, const_stats(a), PrecisionClass.STRICT, 8192, 1,
                                    CHAINS).depth
    lo, hi = 0.6, 0.9
    assert depth(lo) != depth(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if depth(mid) == depth(lo) else (lo, mid)
    return (lo + hi) / 2


def test_hysteresis_prevents_flapping():
    """Statistics oscillate slightly around the point where two chain lengths tie: without
    hysteresis every re-plan flips the strategy, with it the controller settles."""
    a = _tie_point()

    def run(h: float) -> int:
        ctl = AdaptiveController(PROFILE, PrecisionClass.STRICT, CHAINS, stats=const_stats(a),
                                 warmup=0, update_interval=1, hysteresis=h)
        ctl.start(8192)
        for i in range(40):
            ctl.stats = const_stats(a + (0.01 if i % 2 else -0.01))   # what observe() would feed
            ctl.observe(0, depth=0)                                    # (a step that tests nothing)
            ctl.next_strategy(8192)
        return ctl.switches
    flappy, calm = run(0.0), run(0.05)
    assert flappy >= 30, flappy
    assert calm == 0, calm


def test_hysteresis_still_follows_large_changes():
    ctl = AdaptiveController(PROFILE, PrecisionClass.STRICT, CHAINS, stats=const_stats(0.6),
                             warmup=0, update_interval=1, hysteresis=0.05)
    short = ctl.start(8192)
    ctl.stats = const_stats(0.95)
    ctl.observe(0, depth=0)
    long = ctl.next_strategy(8192)
    assert long.depth > short.depth and ctl.switches == 1


def test_controller_batch_observations_and_errors():
    ctl = AdaptiveController(PROFILE, PrecisionClass.APPROX)
    with pytest.raises(ConfigError, match="before start"):
        ctl.observe(1)
    s = ctl.start(4096, batch_size=4)
    ctl.observe([s.depth, 0, 1, s.depth])
    assert ctl.stats.steps == 4
    ctl.observe([2, 5], depth=[3, 0])          # the second request drafted nothing
    assert ctl.stats.steps == 5 and ctl.stats.seen[2] >= 1
    with pytest.raises(ConfigError, match="2 accepted counts but 3 depths"):
        ctl.observe([1, 1], depth=[1, 1, 1])
    with pytest.raises(ConfigError, match="hysteresis"):
        AdaptiveController(PROFILE, PrecisionClass.STRICT, hysteresis=-1.0)


@pytest.mark.parametrize("precision", list(PrecisionClass), ids=lambda p: p.value)
def test_never_leaves_the_class_even_when_asked_or_when_faster(precision):
    """Whatever the measurements favour (approximate options made much faster) and whatever
    the candidates list (only out-of-class schedules / periods), the planner and the
    controller return strategies inside the user's class: measured data choose among the
    options the class allows, never widen them (the runtime applies them as chosen)."""
    from specsa.orchestrator.planner import knobs_error

    fast_approx = make_profile(shared=0.05, reuse_gain=0.9)
    asks = [Candidates(),
            Candidates(schedules=(Schedule.SHARED_INDEX,), refresh_periods=(4,)),
            Candidates(schedules=(Schedule.SHARED_INDEX,), allow_ar=True),
            Candidates(refresh_periods=(2, 4))]
    for cand in asks:
        for a in (0.0, 0.5, 0.95):
            try:
                s = plan_strategy(fast_approx, const_stats(a), precision, 8192, 1, cand)
            except ConfigError:
                continue      # nothing allowed among these candidates and no AR fallback
            assert knobs_error(precision, s.schedule, s.refresh_period) is None, (cand, s)
    ctl = AdaptiveController(fast_approx, precision, warmup=1, update_interval=1,
                             probe_interval=3)
    rng = random.Random(0)
    ctl.start(4096)
    for step in range(200):
        s = ctl.next_strategy(4096 + step)
        assert knobs_error(precision, s.schedule, s.refresh_period) is None, s
        ctl.observe(rng.randrange(0, s.depth + 1) if s.speculate else 0)
