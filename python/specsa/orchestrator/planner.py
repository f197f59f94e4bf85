"""Throughput-aware planner (docs/DESIGN.md section 5): pick the draft/verify strategy that maximises expected
accepted tokens per second inside the user's precision class, or no speculation at all.

`plan_strategy` is a pure function of (profile, statistics, precision class, context, batch,
candidates); `AdaptiveController` wraps it with state for the speculative loop.

Objective, per request (the batch shares each step, so the argmax is the same for the batch):

    tokens_per_s(s) = 1000 * E[accepted + 1 | shape, stats] / (draft_ms(shape) + verify_ms(s))
    tokens_per_s(AR) = 1000 / decode_ms(context, batch, R)   (R: best refresh period allowed)

Expected accepted length. a_k = stats.rate(k) (top-1 acceptance at depth k given depth k was
reached). A draft of `topk` = w, `depth` = D and `tokens` = N nodes (root excluded) is modelled
as w candidates per level (EAGLE-2 keeps the best w per depth), levels = min(D, ceil(N / w)),
b_k = min(w, N - w(k-1)) candidates at level k. The path continues past level k with
probability p_k = 1 - (1 - a_k)^b_k (siblings tested independently, each like a top-1 draft);

    E[accepted] = sum_{k=1..levels} prod_{j<=k} p_j

For chains (w = 1) this is the exact expectation under per-depth rates. For trees it is the
usual optimistic estimate: it assumes the accepted node is one whose children were expanded.

Precision classes (PRECISION_RULES, mirrored in configs/precision_classes.json):
    STRICT        schedules INDEPENDENT, EXACT_MERGED; refresh period 1 (no index reuse)
    REUSE         STRICT's schedules; any profiled refresh period
    APPROX        + SHARED_INDEX; refresh period 1
    APPROX_REUSE  all schedules; any profiled refresh period

    s = plan_strategy(profile, AcceptanceStats.initial(0.7), PrecisionClass.STRICT,
                      context_len=32768, batch_size=1)
    s.speculate, s.topk, s.depth, s.tokens, s.schedule, s.group_size, s.tokens_per_s
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from specsa.config import ConfigError, PrecisionClass, Schedule, Traversal, parse_enum

from specsa.draft_tree import TreeSpec

from .profile import Profile
from .acceptance_stats import AcceptanceStats

PRECISION_RULES: dict[PrecisionClass, tuple[frozenset[Schedule], bool]] = {
    PrecisionClass.STRICT: (frozenset({Schedule.INDEPENDENT, Schedule.EXACT_MERGED}), False),
    PrecisionClass.REUSE: (frozenset({Schedule.INDEPENDENT, Schedule.EXACT_MERGED}), True),
    PrecisionClass.APPROX: (frozenset(Schedule), False),
    PrecisionClass.APPROX_REUSE: (frozenset(Schedule), True),
}


def allowed(precision: PrecisionClass, schedule: Schedule, refresh_period: int) -> bool:
    """Whether (schedule, refresh period) stays inside the precision class."""
    schedules, reuse = PRECISION_RULES[precision]
    return schedule in schedules and (refresh_period == 1 or reuse)


def knobs_error(precision: PrecisionClass, schedule: Schedule | None,
                refresh_period: int) -> str | None:
    """Why (schedule, refresh period) leaves the precision class, as a sentence; None if not."""
    schedules, reuse = PRECISION_RULES[precision]
    if schedule is not None and schedule not in schedules:
        return (f"schedule {schedule.value} is approximate and needs an APPROX precision class "
                f"(approx or approx_reuse), but precision is {precision.value}")
    if refresh_period != 1 and not reuse:
        return (f"refresh period {refresh_period} reuses block selections across layers and "
                f"needs a REUSE precision class (reuse or approx_reuse), but precision is "
                f"{precision.value}")
    return None


_CHAINS = tuple(TreeSpec.chain(g) for g in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16))
_TREES = tuple(TreeSpec(topk=w, depth=d, tokens=w * d)
               for w, ds in ((2, (2, 3, 4, 6, 8)), (3, (3, 4, 5)), (4, (2, 3, 4, 6)), (8, (2, 4)))
               for d in ds)


@dataclass(frozen=True)
class Candidates:
    """The search space. None = everything the profile measured (and the class allows).

    drafter: the profile's draft-cost name (None: the profile's first); allow_ar: whether
    plain autoregressive decoding competes."""

    shapes: tuple[TreeSpec, ...] = _CHAINS + _TREES
    schedules: tuple[Schedule, ...] | None = None
    traversals: tuple[Traversal, ...] | None = None
    group_sizes: tuple[int, ...] | None = None
    refresh_periods: tuple[int, ...] | None = None
    drafter: str | None = None
    allow_ar: bool = True

    def __post_init__(self) -> None:
        for s in self.shapes:
            if s.tokens < s.depth:
                raise ConfigError(f"Candidates: {s} has tokens ({s.tokens}) < depth ({s.depth}) "
                                  "and cannot reach the last level")


@dataclass(frozen=True)
class Strategy:
    """What the next verify steps do. speculate=False: plain decode (depth = tokens = 0).

    expected_tokens = E[accepted + 1] per request-step; step_ms = draft + verify (or decode)
    milliseconds; tokens_per_s = 1000 * expected_tokens / step_ms per request."""

    speculate: bool
    topk: int
    depth: int
    tokens: int
    traversal: Traversal
    schedule: Schedule
    group_size: int
    refresh_period: int
    expected_tokens: float
    step_ms: float
    tokens_per_s: float

    @property
    def shape(self) -> TreeSpec | None:
        return TreeSpec(self.topk, self.depth, self.tokens) if self.speculate else None

    @property
    def verify_tokens(self) -> int:
        """Verifier queries per request (draft nodes + the root)."""
        return self.tokens + 1

    def knobs(self) -> tuple:
        """Everything except the predictions: equal knobs = same behaviour."""
        return (self.speculate, self.topk, self.depth, self.tokens, self.traversal,
                self.schedule, self.group_size, self.refresh_period)


def expected_accepted(shape: TreeSpec, stats: AcceptanceStats) -> float:
    """E[accepted draft tokens] for `shape` under `stats` (model in the module docstring)."""
    w, total, prod = shape.topk, 0.0, 1.0
    levels = min(shape.depth, -(-shape.tokens // w))
    for k in range(1, levels + 1):
        b = min(w, shape.tokens - w * (k - 1))
        prod *= 1.0 - (1.0 - stats.rate(k)) ** b
        total += prod
    return total


def ar_strategy(profile: Profile, context_len: int, batch_size: int = 1,
                precision: PrecisionClass = PrecisionClass.STRICT) -> Strategy:
    """Plain decoding: the fastest decode-table refresh period the class allows."""
    best = None
    for r in profile.refresh_periods(None):
        if allowed(precision, Schedule.INDEPENDENT, r):
            ms = profile.decode_ms(context_len, batch_size, r)
            if best is None or ms < best[0]:
                best = (ms, r)
    ms, r = best if best else (profile.decode_ms(context_len, batch_size, 1), 1)
    return Strategy(speculate=False, topk=1, depth=0, tokens=0, traversal=Traversal.CHAIN,
                    schedule=Schedule.INDEPENDENT, group_size=1, refresh_period=r,
                    expected_tokens=1.0, step_ms=ms, tokens_per_s=1000.0 / ms)


def score_strategy(profile: Profile, stats: AcceptanceStats, strategy: Strategy,
                   context_len: int, batch_size: int = 1, drafter: str | None = None) -> Strategy:
    """`strategy` with its predictions recomputed for these statistics, context and batch."""
    if not strategy.speculate:
        ms = profile.decode_ms(context_len, batch_size, strategy.refresh_period)
        return replace(strategy, step_ms=ms, tokens_per_s=1000.0 / ms)
    shape = strategy.shape
    e = 1.0 + expected_accepted(shape, stats)
    cost = profile.draft_cost(drafter) if drafter else profile.draft[0]
    ms = cost.ms(shape.depth, shape.tokens, batch_size) + profile.verify_ms(
        context_len, shape.tokens + 1, strategy.schedule, strategy.traversal,
        strategy.group_size, strategy.refresh_period, batch_size)
    return replace(strategy, expected_tokens=e, step_ms=ms, tokens_per_s=1000.0 * e / ms)


def plan_strategy(profile: Profile, stats: AcceptanceStats,
                  precision: PrecisionClass | str, context_len: int, batch_size: int = 1,
                  candidates: Candidates = Candidates()) -> Strategy:
    """The strategy with the highest expected accepted tokens per second inside `precision`.

    Deterministic: candidates are scored in a fixed order and a later one replaces the best
    only when strictly faster, so plain decoding (scored first) wins ties, then shorter drafts.
    Shapes whose T = tokens + 1 lies outside the profile's measured range are skipped (no
    extrapolation). Raises ConfigError for bad arguments; ProfileError if the profile lacks the
    drafter or decode table. With allow_ar=False and no feasible candidate, ConfigError.
    """
    precision = parse_enum(PrecisionClass, precision, "precision")
    if not isinstance(context_len, int) or context_len < 1:
        raise ConfigError(f"context_len must be a positive integer, got {context_len!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    cost = profile.draft_cost(candidates.drafter) if candidates.drafter else profile.draft[0]
    best = ar_strategy(profile, context_len, batch_size, precision) if candidates.allow_ar else None
    t_lo, t_hi = profile.token_range()
    for shape in candidates.shapes:
        if not t_lo <= shape.tokens + 1 <= t_hi:
            continue
        e = 1.0 + expected_accepted(shape, stats)
        draft_ms = cost.ms(shape.depth, shape.tokens, batch_size)
        for sched, trav, c, r in _verify_options(profile, precision, candidates, shape):
            ms = draft_ms + profile.verify_ms(context_len, shape.tokens + 1, sched, trav, c, r,
                                              batch_size)
            rate = 1000.0 * e / ms
            if best is None or rate > best.tokens_per_s * (1.0 + 1e-12):
                best = Strategy(speculate=True, topk=shape.topk, depth=shape.depth,
                                tokens=shape.tokens, traversal=trav, schedule=sched,
                                group_size=c, refresh_period=r, expected_tokens=e,
                                step_ms=ms, tokens_per_s=rate)
    if best is None:
        raise ConfigError(f"no speculative strategy of the candidates fits the profile inside "
                          f"precision class {precision.value} (and allow_ar=False)")
    return best


def _verify_options(profile: Profile, precision: PrecisionClass, cand: Candidates,
                    shape: TreeSpec) -> list[tuple[Schedule, Traversal, int, int]]:
    """(schedule, traversal, C, R) combinations the profile measured and the class allows."""
    out = []
    for sched in profile.schedules():
        if cand.schedules is not None and sched not in cand.schedules:
            continue
        travs = profile.traversals(sched)
        if shape.topk == 1:
            ok = [Traversal.CHAIN] if Traversal.CHAIN in travs else []
        else:
            ok = [t for t in (Traversal.BFS, Traversal.DFS) if t in travs]
        if cand.traversals is not None:
            ok = [t for t in ok if t in cand.traversals]
        sizes = (1,) if sched is Schedule.INDEPENDENT else profile.group_sizes(sched)
        if cand.group_sizes is not None and sched is not Schedule.INDEPENDENT:
            sizes = tuple(c for c in sizes if c in cand.group_sizes)
        periods = profile.refresh_periods(sched)
        if cand.refresh_periods is not None:
            periods = tuple(r for r in periods if r in cand.refresh_periods)
        for trav in ok:
            for c in sizes:
                for r in periods:
                    if allowed(precision, sched, r):
                        out.append((sched, trav, c, r))
    return out


class AdaptiveController:
    """Stateful wrapper the speculative loop calls: per-prompt plan, per-step adaptation.

    Policy (stated as formulas, like SGLang's AdaptiveStepSlot):
    - every verify step: stats <- stats.updated(accepted, depth, width) (per-depth EMA, alpha);
    - warm-up: the first `warmup` speculative steps keep the per-prompt plan (made from the
      prior / carried-over statistics);
    - every `update_interval` steps afterwards: best = plan_strategy(...); switch iff
          best.tokens_per_s > score(current).tokens_per_s * (1 + hysteresis)
      where score(current) re-predicts the current strategy under the same statistics,
      context and batch (the stabiliser against flapping between near-equal strategies);
    - while not speculating nothing is tested, so the statistics freeze; after `probe_interval`
      plain-decode steps the controller probes the best speculative strategy for
      `update_interval` steps, then re-plans as usual (SGLang's zero-step probe).

        ctl = AdaptiveController(profile, PrecisionClass.STRICT)
        s = ctl.start(context_len=len(prompt))
        while generating:
            s = ctl.next_strategy(context_len=cur_len)   # before drafting
            ... draft with TreeSpec(s.topk, s.depth, s.tokens), verify, accept ...
            ctl.observe(accepted)                          # accepted draft tokens this step
    """

    def __init__(self, profile: Profile, precision: PrecisionClass | str,
                 candidates: Candidates = Candidates(), *, stats: AcceptanceStats | None = None,
                 warmup: int = 4, update_interval: int = 4, hysteresis: float = 0.05,
                 probe_interval: int = 32) -> None:
        for name, v in (("warmup", warmup), ("update_interval", update_interval),
                        ("probe_interval", probe_interval)):
            if not isinstance(v, int) or v < (0 if name == "warmup" else 1):
                raise ConfigError(f"AdaptiveController.{name} must be a "
                                  f"{'non-negative' if name == 'warmup' else 'positive'} "
                                  f"integer, got {v!r}")
        if not hysteresis >= 0.0:
            raise ConfigError(f"AdaptiveController.hysteresis must be >= 0, got {hysteresis!r}")
        self.profile, self.candidates = profile, candidates
        self.precision = parse_enum(PrecisionClass, precision, "precision")
        self.stats = stats or AcceptanceStats.initial()
        self.warmup, self.update_interval = warmup, update_interval
        self.hysteresis, self.probe_interval = hysteresis, probe_interval
        self.strategy: Strategy | None = None
        self.switches = 0
        self._since_plan = 0
        self._warm_steps = 0

    def start(self, context_len: int, batch_size: int = 1) -> Strategy:
        """Per-prompt plan from the current statistics; resets the step counters."""
        self.strategy = plan_strategy(self.profile, self.stats, self.precision, context_len,
                                      batch_size, self.candidates)
        self._since_plan = self._warm_steps = 0
        return self.strategy

    def observe(self, accepted: int | Sequence[int],
                depth: int | Sequence[int] | None = None) -> None:
        """Accepted draft tokens of the last verify step, one int per request of the batch
        (`Acceptance.accepted`). depth: the drafted depth per request (or one for all) when it
        differs from the strategy's (a tree pruned at max_new_tokens, an empty draft); 0 means
        nothing was drafted, so nothing is learnt from that request."""
        if self.strategy is None:
            raise ConfigError("AdaptiveController.observe() called before start()")
        s = self.strategy
        acc = [accepted] if isinstance(accepted, int) else [int(a) for a in accepted]
        d0 = s.depth if s.speculate else 0
        deps = [d0 if depth is None else depth] * len(acc) if depth is None or \
            isinstance(depth, int) else [int(d) for d in depth]
        if len(deps) != len(acc):
            raise ConfigError(f"observe(): {len(acc)} accepted counts but {len(deps)} depths")
        for a, d in zip(acc, deps):
            self.stats = self.stats.updated(min(a, d), d, s.topk)
        self._since_plan += 1
        if any(deps):
            self._warm_steps += 1

    def next_strategy(self, context_len: int, batch_size: int = 1) -> Strategy:
        """The strategy for the next step (re-planned when due, with hysteresis)."""
        if self.strategy is None:
            return self.start(context_len, batch_size)
        cur = self.strategy
        if not cur.speculate:
            if self._since_plan >= self.probe_interval:
                probe = plan_strategy(self.profile, self.stats, self.precision, context_len,
                                      batch_size, replace(self.candidates, allow_ar=False))
                self._switch(probe)
            return self.strategy
        if self._warm_steps < self.warmup or self._since_plan < self.update_interval:
            return cur
        best = plan_strategy(self.profile, self.stats, self.precision, context_len,
                             batch_size, self.candidates)
        now = score_strategy(self.profile, self.stats, cur, context_len, batch_size,
                             self.candidates.drafter)
        if best.knobs() != cur.knobs() and \
                best.tokens_per_s > now.tokens_per_s * (1.0 + self.hysteresis):
            self._switch(best)
        else:
            self.strategy, self._since_plan = now, 0
        return self.strategy

    def _switch(self, new: Strategy) -> None:
        self.strategy, self._since_plan = new, 0
        self.switches += 1
