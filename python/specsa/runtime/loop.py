"""Speculative NSA generation for a batch: draft -> fit trees -> verify -> accept -> commit.

    results, stats = speculative_generate(model, [ids], drafter, SamplingConfig(max_new_tokens=64))
    results[0].tokens            # == generate(model, [ids], same sampling)[0][0].tokens (greedy)
    stats.accept_histogram       # [k] = request-steps that accepted k draft tokens

Per step and request, the context's last token is the root (emitted, KV not cached). The
drafter proposes a tree below it; one target forward verifies the trees of all live requests
(nothing is written to the cache); acceptance picks the root-to-leaf path and a bonus token;
`cache.commit` stores the kept path's KV and provisional compressed tokens (reuse, no
recompute) and everything else simply never reaches the cache. Prefill, stop tokens and
max_new_tokens behave exactly as `specsa.runtime.generate` (same chunking, a stop token is
kept and ends the request), so greedy output is token-identical to autoregressive NSA.

Precision knobs (`VerifyKnobs`, docs/DESIGN.md section 5): a fixed plan passes `knobs`; the
verify forwards run with all of them, prefill with its precision and refresh period only (a
layer refreshes or reuses in every forward; SHARED_INDEX groups verifier queries only). Under
a controller (`--plan auto`) every step runs with the knobs of the strategy the planner chose
(schedule, group size, refresh period, traversal, draft shape), and prefill with the refresh
period of the per-prompt plan. `SpecStats.knob_counts` counts, per verify step, the values
the target forward applied (`NSADecoder.last_forward`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from specsa.config import ConfigError, SamplingConfig, Traversal, VerifyKnobs
from specsa.model.block import BlockInput
from specsa.model.cache import PagedKVCache, PendingKV
from specsa.model.decoder import NSADecoder
from specsa.runtime.accept import Acceptance, greedy_accept, sample_accept, sampling_probs
from specsa.runtime.drafters.base import Draft, DraftError, Drafter, DraftRequest
from specsa.runtime.generate import GenerationResult, Progress, cache_for, prefill, token_lists
from specsa.runtime.sampling import make_generator
from specsa.draft_tree import MAX_TREE_NODES, DraftTree

# (request id, verified tree, target logits [T, V], acceptance): lets benchmarks and tests
# observe every verify step without the loop knowing about them.

StepHook = Callable[[int, DraftTree, torch.Tensor, Acceptance], None]


@dataclass
class SpecStats:
    prefill_steps: int = 0
    verify_steps: int = 0            # target forwards after prefill
    request_steps: int = 0           # (request, verify step) pairs
    decode_tokens: int = 0           # tokens emitted by verify steps (after truncation)
    draft_tokens: int = 0            # draft nodes verified (roots excluded)
    accept_histogram: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0            # wall time after prefill (draft + verify + accept)
    # per verify step, the knob values the target forward applied: name -> {value: steps}
    knob_counts: dict = field(default_factory=dict)
    layers_refreshed: int = 0        # (forward, layer) pairs that computed their selection
    layers_reused: int = 0           # ... that took the last refresh layer's (REUSE classes)
    # with a controller: (the planner's predicted step ms, the measured step ms) per step, so
    # a profile can be checked against the steps it prices (the measured step also holds
    # acceptance and commit, which the profile does not price)
    planned_steps: list[tuple[float, float]] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def mean_accept_len(self) -> float:
        """Tokens emitted per request-step before truncation: accepted drafts + the bonus."""
        n = sum(self.accept_histogram)
        return sum((k + 1) * c for k, c in enumerate(self.accept_histogram)) / n if n else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Emitted tokens per target forward per request (1.0 for autoregressive decoding)."""
        return self.decode_tokens / self.request_steps if self.request_steps else 0.0

    def to_dict(self) -> dict:
        return {"prefill_steps": self.prefill_steps, "verify_steps": self.verify_steps,
                "request_steps": self.request_steps, "decode_tokens": self.decode_tokens,
                "draft_tokens": self.draft_tokens, "accept_histogram": self.accept_histogram,
                "mean_accept_len": self.mean_accept_len,
                "tokens_per_forward": self.tokens_per_forward, "draft_s": self.draft_s,
                "verify_s": self.verify_s, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "knob_counts": self.knob_counts,
                "selection": {"layers_refreshed": self.layers_refreshed,
                              "layers_reused": self.layers_reused},
                **({"planner": self.planner_summary()} if self.planned_steps else {})}

    def planner_summary(self) -> dict:
        """Median predicted vs measured step time of the controller's steps."""
        pred = statistics.median(p for p, _ in self.planned_steps)
        meas = statistics.median(m for _, m in self.planned_steps)
        return {"steps": len(self.planned_steps), "predicted_ms": pred, "measured_ms": meas,
                "measured_over_predicted": meas / pred if pred > 0 else None}

    def count_forward(self, model: NSADecoder, step: dict | None = None) -> None:
        """Add the last forward's selection counts; with `step` (a verify step's knob values
        besides the forward's own), count its knob values too."""
        info = model.last_forward
        if info is None:
            return
        self.layers_refreshed += info.refreshed
        self.layers_reused += info.reused
        if step is None:
            return
        vals = dict(step)
        vals.update(schedule=None if info.schedule is None else info.schedule.value,
                    group_size=info.group_size, refresh_period=info.refresh_period)
        for name, v in vals.items():
            d = self.knob_counts.setdefault(name, {})
            d[str(v)] = d.get(str(v), 0) + 1


def speculative_generate(model: NSADecoder, prompts: Sequence[Sequence[int]], drafter: Drafter,
                         sampling: SamplingConfig, *, cache: PagedKVCache | None = None,
                         page_size: int = 16, chunk_size: int = 256,
                         traversal: Traversal | None = None, hook: StepHook | None = None,
                         controller=None, progress: Progress | None = None,
                         knobs: VerifyKnobs | None = None
                         ) -> tuple[list[GenerationResult], SpecStats]:
    """Generate for every prompt with speculative decoding.

    traversal: renumber each tree in CHAIN / BFS / DFS order before verification (the order
    the kernels flatten queries in); None keeps the drafter's order. Output is the same.
    controller: an `specsa.orchestrator.AdaptiveController`; it picks the draft shape (or no
    speculation) and traversal per step from measured acceptance. Output is unchanged by it
    in the STRICT class: it only changes what is drafted, never what is accepted.
    progress: as in `specsa.runtime.generate.generate` (prefill forwards, generated tokens).
    knobs: precision knobs of a fixed plan (default `model.verify_knobs`); with a controller,
    only their precision may be given and must equal the controller's (it picks the rest).
    Raises ConfigError for knobs outside their precision class, DraftError if the drafter's
    vocabulary differs from the target's, CacheFullError (naming the sizes) if a request or a
    verified tree cannot fit the cache.
    """
    knobs = _check_knobs(model, knobs, controller)
    prompts, cache = _prepare(model, prompts, drafter, sampling, cache, page_size, chunk_size)
    gen = make_generator(sampling.seed, model.device)
    acc_gen = None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed + 7)
    stats = SpecStats()
    base = max(cache.requests(), default=-1) + 1
    rids: list[int | None] = list(range(base, base + len(prompts)))
    out: list[list[int]] = [[] for _ in prompts]
    reason = ["length"] * len(prompts)
    for r in rids:
        cache.add_request(r)
    try:
        t0 = time.perf_counter()
        if controller is not None:
            # the per-prompt plan (context = the prompt) also sets prefill's refresh period
            s0 = controller.start(max(len(p) for p in prompts), len(prompts))
            knobs = VerifyKnobs(precision=controller.precision, refresh_period=s0.refresh_period)
        live = _prefill(model, cache, prompts, rids, out, sampling, gen, chunk_size, stats,
                        progress, _prefill_knobs(knobs), observe=_observer(drafter))
        stats.prefill_s = time.perf_counter() - t0
        emitted = sum(len(o) for o in out)
        if progress is not None:
            progress("decode", emitted)                  # first tokens come from prefill
        live = _retire(live, out, rids, reason, sampling, cache, drafter)
        t0 = time.perf_counter()
        if controller is not None and live:
            controller.start(max(cache.length(rids[i]) for i in live), len(live))
        while live:
            trav, step_knobs = traversal, knobs
            t_step = time.perf_counter()
            if controller is not None:
                trav, step_knobs = _apply_strategy(controller, drafter, cache,
                                                   [rids[i] for i in live], traversal)
            _step(model, cache, drafter, [(rids[i], prompts[i], out[i]) for i in live],
                  sampling, trav, acc_gen, stats, hook, controller, step_knobs)
            if controller is not None:
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)   # the step's commit included
                stats.planned_steps.append((controller.strategy.step_ms,
                                            (time.perf_counter() - t_step) * 1e3))
            live = _retire(live, out, rids, reason, sampling, cache, drafter)
            if progress is not None:
                now = sum(len(o) for o in out)
                progress("decode", now - emitted)
                emitted = now
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)   # honest wall time of async kernels
        stats.decode_s = time.perf_counter() - t0
    finally:
        for r in rids:
            if r is not None:
                if cache.has(r):
                    cache.free_request(r)
                drafter.release(r)
    return [GenerationResult(tokens=out[i], prompt_tokens=len(prompts[i]),
                             finish_reason=reason[i]) for i in range(len(prompts))], stats


def _step(model: NSADecoder, cache: PagedKVCache, drafter: Drafter,
          live: list[tuple[int, list[int], list[int]]], sampling: SamplingConfig,
          traversal: Traversal | None, gen: torch.Generator | None, stats: SpecStats,
          hook: StepHook | None, controller=None, knobs: VerifyKnobs | None = None) -> None:
    """One speculative step for the live requests (rid, prompt, out); extends each out.
    knobs: the verify forward's precision knobs (None: the model's)."""
    rids = [rid for rid, _, _ in live]
    reqs = [DraftRequest(rid, tuple(p + o)) for rid, p, o in live]
    if controller is not None and not controller.strategy.speculate:
        # the planner chose plain decoding: a root-only tree is one autoregressive step
        drafts = [Draft(tree=DraftTree(tokens=[r.root], parents=[-1], prefix_len=r.prefix_len))
                  for r in reqs]
    else:
        drafts = _draft(drafter, reqs, stats)
    trees = _fit_trees(cache, drafts, rids,
                       [sampling.max_new_tokens - len(o) for _, _, o in live], traversal)
    t0 = time.perf_counter()
    logits, pending = _verify(model, cache, rids, trees, knobs, traversal)
    stats.verify_s += time.perf_counter() - t0
    step = {"traversal": "drafter" if traversal is None else traversal.value,
            "tokens": max(t.size for t, _, _ in trees)}
    if controller is not None:
        s = controller.strategy
        step.update(speculate=s.speculate, topk=s.topk, depth=s.depth)
    stats.count_forward(model, step)
    off = 0
    accepted: list[int] = []
    depths: list[int] = []
    for (rid, prompt, out), (tree, q, rep) in zip(live, trees):
        rows = logits[off:off + tree.size]
        off += tree.size
        a = _accept(tree, q, rep, rows, sampling, gen)
        kept = _kept_tokens(a.tokens, out, sampling)
        _commit(cache, rid, pending, a.nodes[:len(kept)])
        _observe_target(drafter, rid, pending, a.nodes[:len(kept)])
        out.extend(kept)
        stats.decode_tokens += len(kept)
        stats.draft_tokens += tree.size - 1
        _histogram_add(stats, a.accepted)
        if hook is not None:
            hook(rid, tree, rows, a)
        drafter.observe(rid, prompt + out)
        accepted.append(a.accepted)
        depths.append(int(tree.depth.max()))
    if controller is not None:
        controller.observe(accepted, depth=depths)
    stats.verify_steps += 1
    stats.request_steps += len(live)


def _apply_strategy(controller, drafter: Drafter, cache: PagedKVCache, rids: list[int],
                    traversal: Traversal | None) -> tuple[Traversal | None, VerifyKnobs]:
    """Ask the controller for this step's strategy, point the drafter at its shape and return
    the traversal and verification knobs (schedule, group size, refresh period) to run."""
    s = controller.next_strategy(max(cache.length(r) for r in rids), len(rids))
    if s.speculate:
        drafter.spec = s.shape
    knobs = VerifyKnobs(precision=controller.precision, schedule=s.schedule,
                        group_size=s.group_size, refresh_period=s.refresh_period)
    return (traversal if traversal is not None else s.traversal), knobs


def _check_knobs(model: NSADecoder, knobs: VerifyKnobs | None, controller
                 ) -> VerifyKnobs:
    """The fixed plan's knobs (default: the model's), checked against their precision class
    (specsa.orchestrator.planner.knobs_error: ConfigError with its sentence)."""
    from specsa.orchestrator.planner import knobs_error

    if controller is not None:
        if knobs is not None and (knobs.precision is not controller.precision or
                                  knobs != VerifyKnobs(precision=knobs.precision)):
            raise ConfigError("with a controller (--plan auto) the planner chooses schedule, "
                              "group size and refresh period; pass the precision class only, "
                              "the controller's")
        return VerifyKnobs(precision=controller.precision)
    knobs = model.verify_knobs if knobs is None else knobs
    why = knobs_error(knobs.precision, knobs.schedule, knobs.refresh_period)
    if why:
        raise ConfigError(why)
    return knobs


def _prefill_knobs(knobs: VerifyKnobs) -> VerifyKnobs:
    """Prefill runs with the plan's precision and refresh period, never a grouped schedule."""
    return VerifyKnobs(precision=knobs.precision, refresh_period=knobs.refresh_period)


def _prepare(model, prompts, drafter, sampling, cache, page_size, chunk_size
             ) -> tuple[list[list[int]], PagedKVCache]:
    """Validate the inputs (clear errors) and size a cache when none is given."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size}")
    dv = drafter.vocab_size
    if dv is not None and dv != model.cfg.vocab_size:
        raise DraftError(f"drafter vocabulary size {dv} differs from the target's "
                         f"{model.cfg.vocab_size}")
    prompts = token_lists(prompts)
    totals = [len(p) + sampling.max_new_tokens for p in prompts]
    if cache is None:
        # headroom for the largest draft tree verified beside the committed tokens (the
        # orchestrator may change the shape between steps; kernels verify <= MAX_TREE_NODES nodes)
        cache = model.new_cache(cache_for(model, [n + MAX_TREE_NODES for n in totals],
                                          page_size))
    for i, n in enumerate(totals):
        cache.check_fits(n, f"request {i} (prompt {len(prompts[i])} + max_new_tokens "
                            f"{sampling.max_new_tokens})")
    return prompts, cache


# -- the five named steps -------------------------------------------------------------------
def _draft(drafter: Drafter, reqs: list[DraftRequest], stats: SpecStats) -> list[Draft]:
    t0 = time.perf_counter()
    drafts = drafter.propose(reqs)
    stats.draft_s += time.perf_counter() - t0
    if len(drafts) != len(reqs):
        raise DraftError(f"drafter returned {len(drafts)} drafts for {len(reqs)} requests")
    for r, d in zip(reqs, drafts):
        if d.tree.prefix_len != r.prefix_len or int(d.tree.tokens[0]) != r.root:
            raise DraftError(f"request {r.rid}: draft tree is not rooted at the last token "
                             f"{r.root} at position {r.prefix_len}")
    return drafts


def _fit_trees(cache: PagedKVCache, drafts: list[Draft], rids: list[int], remaining: list[int],
               traversal: Traversal | None) -> list[tuple[DraftTree, torch.Tensor | None, bool]]:
    """Prune nodes that could only yield tokens past max_new_tokens, check the trees fit the
    cache, and renumber them in the requested traversal order."""
    fitted = []
    for rid, d, rem in zip(rids, drafts, remaining):
        tree, q = d.tree, d.draft_probs
        if int(tree.depth.max()) > rem - 1:
            keep = (tree.depth <= rem - 1).nonzero().flatten()
            tree, q = _subtree(tree, keep), None if q is None else q[keep]
        cache.check_fits(cache.length(rid) + tree.size,
                         f"verification of request {rid}'s draft tree ({tree.size} nodes after "
                         f"{cache.length(rid)} committed tokens)")
        if traversal is not None:
            tree, perm = tree.permuted(traversal)
            q = None if q is None else q[perm]
        fitted.append((tree, q, d.replacement))
    return fitted


def _verify(model: NSADecoder, cache: PagedKVCache, rids: list[int],
            trees: list[tuple[DraftTree, torch.Tensor | None, bool]],
            knobs: VerifyKnobs | None = None, traversal: Traversal | None = None
            ) -> tuple[torch.Tensor, PendingKV]:
    """One target forward over every live request's tree (writes nothing to the cache)."""
    return model(cache, [BlockInput(rid, t[0].tokens, t[0].parents) for rid, t in zip(rids, trees)],
                 knobs=knobs, traversal=traversal)


def _accept(tree: DraftTree, q: torch.Tensor | None, replacement: bool, logits: torch.Tensor,
            sampling: SamplingConfig, gen: torch.Generator | None) -> Acceptance:
    if sampling.greedy:
        return greedy_accept(tree, logits)
    return sample_accept(tree, sampling_probs(logits, sampling), q, gen, replacement)


def _commit(cache: PagedKVCache, rid: int, pending: PendingKV, nodes: Sequence[int]) -> None:
    """Kept path only: root + accepted drafts whose successor token was kept."""
    cache.commit(rid, pending, list(nodes))


def _observer(drafter: Drafter):
    """The drafter's `observe_target(rid, pending, nodes=None)`, or None: drafters that read
    the target's hidden states (EAGLE heads) take each committed block there (nodes: the
    committed path of a verified tree; None: a whole prefill chunk)."""
    return getattr(drafter, "observe_target", None)


def _observe_target(drafter: Drafter, rid: int, pending: PendingKV, nodes: Sequence[int]) -> None:
    observe = _observer(drafter)
    if observe is not None:
        observe(rid, pending, list(nodes))


# -- helpers --------------------------------------------------------------------------------
def _prefill(model, cache, prompts, rids, out, sampling, gen, chunk_size, stats,
             progress=None, knobs: VerifyKnobs | None = None, *, observe=None) -> list[int]:
    """Chunked prefill exactly as autoregressive generation does it (the same function)."""
    live, steps = prefill(model, cache, prompts, rids, out, sampling, gen, chunk_size, progress,
                          knobs=knobs, on_forward=lambda: stats.count_forward(model),
                          on_commit=observe)
    stats.prefill_steps += steps
    return live


def _kept_tokens(emitted: Sequence[int], so_far: list[int], sampling: SamplingConfig) -> list[int]:
    """Truncate at the first stop token (kept) and at max_new_tokens, as AR decoding stops."""
    stop, kept = set(sampling.stop_token_ids), []
    for t in emitted:
        if len(so_far) + len(kept) >= sampling.max_new_tokens:
            break
        kept.append(int(t))
        if t in stop:
            break
    return kept


def _retire(live, out, rids, reason, sampling, cache, drafter) -> list[int]:
    stop, still = set(sampling.stop_token_ids), []
    for i in live:
        if out[i] and out[i][-1] in stop:
            reason[i] = "stop"
        elif len(out[i]) < sampling.max_new_tokens:
            still.append(i)
            continue
        cache.free_request(rids[i])
        drafter.release(rids[i])
        rids[i] = None
    return still


def _histogram_add(stats: SpecStats, k: int) -> None:
    while len(stats.accept_histogram) <= k:
        stats.accept_histogram.append(0)
    stats.accept_histogram[k] += 1


def _subtree(tree: DraftTree, keep: torch.Tensor) -> DraftTree:
    """Nodes `keep` (ascending, closed under ancestors), renumbered."""
    where = torch.full((tree.size,), -1, dtype=torch.long)
    where[keep] = torch.arange(keep.numel())
    par = tree.parents[keep]
    return DraftTree(tokens=tree.tokens[keep], parents=torch.where(par < 0, par, where[par.clamp(min=0)]),
                     prefix_len=tree.prefix_len, max_nodes=tree.max_nodes)
