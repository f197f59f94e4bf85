"""Autoregressive NSA generation for a batch of requests (the `--mode ar` baseline).

Phase 1, chunked prefill: every step feeds each still-prefilling request its next chunk of
at most `chunk_size` prompt tokens (a chain block) and commits it; the last chunk's logits
give the first generated token. Phase 2, decode: every step feeds each live request its
last sampled token (a one-node block), commits it and samples the next. A request stops at
a stop token (kept in its output) or after max_new_tokens, and its pages are freed at once.

    results, stats = generate(model, [ids_a, ids_b], SamplingConfig(max_new_tokens=32))
    results[0].tokens, stats.decode_tokens_per_s

Precision knobs: `knobs` (default `model.verify_knobs`) must stay inside their precision class
(`specsa.orchestrator.planner.knobs_error`); autoregressive decoding applies their refresh
period (REUSE classes: layers between refresh layers reuse the last refresh layer's
selection) to prefill and decode forwards alike; a schedule has nothing to group here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from specsa.config import CacheConfig, ConfigError, SamplingConfig, VerifyKnobs
from specsa.model.block import BlockInput
from specsa.model.cache import PagedKVCache, PendingKV
from specsa.model.decoder import NSADecoder

from .sampling import make_generator, sample

# progress(phase, n): "prefill" once per prefill forward (one chunk per prefilling request),
# "decode" with the number of tokens just generated. The CLI draws tqdm bars from it.
Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]         # generated tokens (a final stop token included)
    prompt_tokens: int
    finish_reason: str        # "stop" | "length"


@dataclass(frozen=True)
class GenerationStats:
    steps: int                # forward passes in total
    prefill_steps: int
    decode_steps: int
    prefill_s: float
    decode_s: float
    prefill_tokens: int
    decode_tokens: int        # tokens sampled by decode steps (first tokens come from prefill)
    # refresh period of the forwards -> how many ran with it; (forward, layer) pairs that
    # computed their block selection / reused the last refresh layer's
    refresh_period_counts: dict | None = None
    layers_refreshed: int = 0
    layers_reused: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "prefill_steps": self.prefill_steps,
                "decode_steps": self.decode_steps, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "prefill_tokens": self.prefill_tokens,
                "decode_tokens": self.decode_tokens,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "knob_counts": {"refresh_period": dict(self.refresh_period_counts or {})},
                "selection": {"layers_refreshed": self.layers_refreshed,
                              "layers_reused": self.layers_reused}}



def token_lists(prompts) -> list[list[int]]:
    """Prompts as lists of ints; an empty prompt is a configuration error (it has no last
    token to decode from)."""
    prompts = [[int(t) for t in p] for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} is empty (need at least one token)")
    return prompts

def cache_for(model: NSADecoder, total_tokens: Sequence[int], page_size: int = 16) -> CacheConfig:
    """A cache exactly large enough for requests of these total lengths."""
    pages = sum(-(-n // page_size) for n in total_tokens)
    return CacheConfig(page_size=page_size, num_pages=max(pages, 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)   # honest wall-clock timings of async kernels


def prefill(model: NSADecoder, cache: PagedKVCache, prompts: Sequence[Sequence[int]],
            rids: Sequence[int], out: list[list[int]], sampling: SamplingConfig,
            gen: torch.Generator | None, chunk_size: int, progress: Progress | None = None,
            *, knobs: VerifyKnobs | None = None, on_forward: Callable[[], None] | None = None,
            on_commit: Callable[[int, PendingKV], None] | None = None
            ) -> tuple[list[int], int]:
    """Chunked prefill of every prompt (chunks of `chunk_size`, committed whole); the last
    chunk's logits give each request its first token, appended to out[i]  # mutable.
    Shared by autoregressive and speculative generation so both commit identical KV and
    sample the identical first token. knobs: the forwards' precision knobs (None: the
    model's); on_forward: called after every forward (counters read `model.last_forward`).
    on_commit(rid, pending):
    called after each request's chunk is committed (an EAGLE drafter takes the target's
    hidden states there). Returns (indices of live requests, forward passes)."""
    done = [0] * len(prompts)
    steps = 0
    live = [i for i in range(len(prompts)) if sampling.max_new_tokens > 0]
    while any(done[i] < len(prompts[i]) for i in live):
        batch = [i for i in live if done[i] < len(prompts[i])]
        blocks = [BlockInput(rids[i], list(prompts[i][done[i]:done[i] + chunk_size]))
                  for i in batch]
        logits, pending = model(cache, blocks, last_only=True, knobs=knobs)
        if on_forward is not None:
            on_forward()
        for i, b in zip(batch, blocks):
            cache.commit(rids[i], pending)
            if on_commit is not None:
                on_commit(rids[i], pending)
            done[i] += len(b.tokens)
        finished = [j for j, i in enumerate(batch) if done[i] == len(prompts[i])]
        if finished:
            for j, t in zip(finished, sample(logits[finished], sampling, gen).tolist()):
                out[batch[j]].append(t)
        steps += 1
        if progress is not None:
            progress("prefill", 1)
    return live, steps


def generate(model: NSADecoder, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
             cache: PagedKVCache | None = None, page_size: int = 16, chunk_size: int = 256,
             progress: Progress | None = None, knobs: VerifyKnobs | None = None
             ) -> tuple[list[GenerationResult], GenerationStats]:
    """Generate for every prompt (token id lists of any, different lengths).

    cache: an existing cache to run in (its free-page count is restored at the end);
    default: a new one sized to prompts + max_new_tokens with `page_size`.
    progress: called as progress("prefill", 1) per prefill forward and
    progress("decode", n) for every n tokens generated (the CLI's progress bars).
    knobs: precision knobs (default `model.verify_knobs`); their refresh period applies.
    Raises CacheFullError (naming the sizes) when a request cannot fit, ConfigError for
    knobs outside their precision class.
    """
    knobs = _ar_knobs(model, knobs)
    counts = _LayerCounts(model)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size}")
    prompts = token_lists(prompts)
    totals = [len(p) + sampling.max_new_tokens for p in prompts]
    if cache is None:
        cache = model.new_cache(cache_for(model, totals, page_size))
    for i, n in enumerate(totals):
        cache.check_fits(n, f"request {i} (prompt {len(prompts[i])} + max_new_tokens "
                            f"{sampling.max_new_tokens})")
    gen = make_generator(sampling.seed, model.device)
    stop = set(sampling.stop_token_ids)
    rids = _fresh_rids(cache, len(prompts))
    out: list[list[int]] = [[] for _ in prompts]
    reason = ["length"] * len(prompts)
    dev = model.device
    for r in rids:
        cache.add_request(r)
    try:
        # -- phase 1: chunked prefill ------------------------------------------------------
        _sync(dev)
        t0 = time.perf_counter()
        live, prefill_steps = prefill(model, cache, prompts, rids, out, sampling, gen,
                                      chunk_size, progress, knobs=knobs, on_forward=counts.add)
        _sync(dev)
        prefill_s = time.perf_counter() - t0
        # -- phase 2: decode ---------------------------------------------------------------
        if progress is not None:
            progress("decode", sum(len(o) for o in out))   # first tokens come from prefill
        live = [i for i in live if not _finished(out[i], sampling, stop, reason, i)]
        t0 = time.perf_counter()
        decode_steps, decode_tokens = _decode(model, cache, rids, out, live, sampling, gen, stop,
                                              reason, progress, knobs, counts.add)
        _sync(dev)
        decode_s = time.perf_counter() - t0
    finally:
        for r in rids:
            if r is not None and cache.has(r):
                cache.free_request(r)
    results = [GenerationResult(tokens=out[i], prompt_tokens=len(prompts[i]),
                                finish_reason=reason[i]) for i in range(len(prompts))]
    stats = GenerationStats(steps=prefill_steps + decode_steps, prefill_steps=prefill_steps,
                            decode_steps=decode_steps, prefill_s=prefill_s, decode_s=decode_s,
                            prefill_tokens=sum(len(p) for p in prompts),
                            decode_tokens=decode_tokens,
                            refresh_period_counts={str(knobs.refresh_period): counts.forwards},
                            layers_refreshed=counts.refreshed, layers_reused=counts.reused)
    return results, stats


def _ar_knobs(model: NSADecoder, knobs: VerifyKnobs | None) -> VerifyKnobs:
    """The knobs (default the model's), checked against their precision class; AR decoding
    keeps only their precision and refresh period."""
    from specsa.orchestrator.planner import knobs_error

    knobs = model.verify_knobs if knobs is None else knobs
    why = knobs_error(knobs.precision, knobs.schedule, knobs.refresh_period)
    if why:
        raise ConfigError(why)
    return VerifyKnobs(precision=knobs.precision, refresh_period=knobs.refresh_period)


class _LayerCounts:
    """Forwards run and layers that refreshed / reused their selection (model.last_forward)."""

    def __init__(self, model: NSADecoder):
        self.model = model
        self.forwards = self.refreshed = self.reused = 0

    def add(self) -> None:
        info = self.model.last_forward
        self.forwards += 1
        self.refreshed += info.refreshed
        self.reused += info.reused


def _decode(model: NSADecoder, cache: PagedKVCache, rids: list, out: list[list[int]],
            live: list[int], sampling: SamplingConfig, gen, stop: set[int], reason: list[str],
            progress: Progress | None, knobs: VerifyKnobs, on_forward: Callable[[], None]
            ) -> tuple[int, int]:
    """Batched one-token decode of the `live` requests until each finishes; a finished
    request's pages are freed at once and its rid set to None. Returns (steps, tokens)."""
    steps = tokens = 0
    while live:
        logits, pending = model(cache, [BlockInput(rids[i], [out[i][-1]]) for i in live],
                                last_only=True, knobs=knobs)
        on_forward()
        toks = sample(logits, sampling, gen).tolist()
        for i, t in zip(live, toks):
            cache.commit(rids[i], pending)
            out[i].append(t)
        steps += 1
        tokens += len(live)
        if progress is not None:
            progress("decode", len(live))
        for i in [i for i in live if _finished(out[i], sampling, stop, reason, i)]:
            cache.free_request(rids[i])
            rids[i] = None
        live = [i for i in live if rids[i] is not None]
    return steps, tokens


def _finished(toks: list[int], sampling: SamplingConfig, stop: set[int], reason: list[str],
              i: int) -> bool:
    if toks and toks[-1] in stop:
        reason[i] = "stop"
        return True
    return len(toks) >= sampling.max_new_tokens


def _fresh_rids(cache: PagedKVCache, n: int) -> list[int]:
    base = max(cache.requests(), default=-1) + 1
    return list(range(base, base + n))
