"""NSA settings of an SGLang server, parsed once at the plugin edge into `NSAConfig`.

Sources, later ones override earlier ones:
1. `NSAConfig()` defaults (training-free: union combine, mean compression);
2. the checkpoint's `config.json["nsa"]` (CONTRACTS.md section 5);
3. the environment variable `SPECSA_NSA`: `key=value,...` (the `--nsa` syntax of the specsa
   CLI), a JSON object, or the path of a JSON file holding an object.

SGLang owns the command line, so the environment variable is this plugin's "flag"; it is read
here and nowhere below.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from specsa.config import Combine, Compression, ConfigError, NSAConfig, VerifyKnobs
from specsa.kernels.common.params import NSAParams

ENV_NSA = "SPECSA_NSA"
# which implementation computes the target's NSA attention: auto (Triton kernels on CUDA, the
# torch reference path on CPU), triton (on CPU only under TRITON_INTERPRET=1: tests), torch
ENV_ATTN = "SPECSA_SGLANG_ATTN"
# which of the draft worker's CUDA graphs SpecSA keeps: all (SGLang's draft decode and draft
# extend graphs), decode (draft extend runs eagerly), none. The target's graphs are not affected.
ENV_DRAFT_GRAPHS = "SPECSA_DRAFT_GRAPHS"
DEFAULT_DRAFT_GRAPHS = "all"
# what the draft model attends to on CUDA: "window" (sink + recent window through the fused NSA
# kernel, draft_backend.py; optionally "window=W,sink=S"), or "dense" (SGLang's Triton backend
# over the whole context). Lossless either way: the target verifies every draft token.
ENV_DRAFT_ATTN = "SPECSA_DRAFT_ATTN"


def _env_overrides(raw: str) -> dict | str:
    text = raw.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{ENV_NSA}: invalid JSON ({e})") from None
    if text.endswith(".json") or os.path.isfile(text):
        try:
            with open(text) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{ENV_NSA}: cannot read JSON file {text!r} ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{ENV_NSA}: {text!r} must hold a JSON object")
        return data.get("nsa", data)
    return text


def checkpoint_nsa(hf_config) -> dict | None:
    """The `nsa` entry of a transformers config (config.json), or None."""
    nsa = getattr(hf_config, "nsa", None)
    if nsa is None and hasattr(hf_config, "to_dict"):
        nsa = hf_config.to_dict().get("nsa")
    if nsa is not None and not isinstance(nsa, dict):
        raise ConfigError(f"config.json 'nsa' must be an object, got {type(nsa).__name__}")
    return nsa


def resolve_nsa_config(hf_config, env: dict | None = None) -> NSAConfig:
    """NSAConfig for a checkpoint: defaults <- config.json["nsa"] <- $SPECSA_NSA."""
    env = os.environ if env is None else env
    cfg = NSAConfig()
    ckpt = checkpoint_nsa(hf_config)
    if ckpt:
        cfg = NSAConfig.from_dict({**cfg.to_dict(), **ckpt})
    raw = env.get(ENV_NSA, "")
    if raw.strip():
        cfg = cfg.with_overrides(_env_overrides(raw))
    return cfg


def is_native(cfg: NSAConfig) -> bool:
    """Native NSA needs per-layer gate / compression weights from the checkpoint."""
    return cfg.combine is Combine.GATED or cfg.compress is Compression.LEARNED


def attn_impl(device: str, env: dict | None = None) -> str:
    """'triton' or 'torch' for the target backend on `device` (see ENV_ATTN)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_ATTN, "auto").strip().lower() or "auto"
    if raw not in ("auto", "triton", "torch"):
        raise ConfigError(f"{ENV_ATTN}={raw!r}: choose auto, triton or torch")
    on_cuda = str(device).startswith("cuda")
    if raw == "auto":
        return "triton" if on_cuda else "torch"
    if raw == "triton" and not on_cuda and env.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"{ENV_ATTN}=triton on {device} needs the Triton interpreter "
                          "(TRITON_INTERPRET=1); use it on CUDA")
    return raw


def draft_graphs(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    raw = env.get(ENV_DRAFT_GRAPHS, DEFAULT_DRAFT_GRAPHS).strip().lower() or DEFAULT_DRAFT_GRAPHS
    if raw not in ("all", "decode", "none"):
        raise ConfigError(f"{ENV_DRAFT_GRAPHS}={raw!r}: choose all, decode or none")
    return raw


# SGLang's overlap scheduling for speculative steps: auto (default: on with CUDA, off on the CPU
# harness, where nothing runs asynchronously so there is nothing to gain), on or off. Measured on
# an H100 at batch 1 with a chain: -18% ms/token, identical tokens; greedy identity with it on is
# tested on the CPU harness for chains, trees, EAGLE-3 heads, concurrent requests and SPECSA_PLAN
ENV_OVERLAP = "SPECSA_OVERLAP"


def overlap_schedule(device: str = "cuda", env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    raw = env.get(ENV_OVERLAP, "auto").strip().lower() or "auto"
    if raw not in ("auto", "on", "off", "1", "0"):
        raise ConfigError(f"{ENV_OVERLAP}={raw!r}: choose auto, on or off")
    if raw == "auto":
        return device.startswith("cuda")
    return raw in ("on", "1")


# per-phase timing of SpecSA decode steps (step_timing.py): a JSON file path, or unset
ENV_STEP_TIMING = "SPECSA_STEP_TIMING"
# torch.profiler over a few decode steps: "<dir>[,skip[,steps]]", or unset
ENV_TORCH_PROFILE = "SPECSA_TORCH_PROFILE"
# every Triton JIT compile of the scheduler process, one JSON line each: a file path, or unset
ENV_JIT_LOG = "SPECSA_JIT_LOG"
# host syncs inside SpecSA decode steps (sync_debug.py): a JSON file path, or unset
ENV_SYNC_DEBUG = "SPECSA_SYNC_DEBUG"


def _path_setting(name: str, env: dict | None) -> str | None:
    # the diagnostics variables hold a file path; empty or unset means off
    env = os.environ if env is None else env
    return env.get(name, "").strip() or None


def step_timing_path(env: dict | None = None) -> str | None:
    return _path_setting(ENV_STEP_TIMING, env)


def sync_debug_path(env: dict | None = None) -> str | None:
    return _path_setting(ENV_SYNC_DEBUG, env)


def jit_log_path(env: dict | None = None) -> str | None:
    return _path_setting(ENV_JIT_LOG, env)


def torch_profile_spec(env: dict | None = None) -> str | None:
    env = os.environ if env is None else env
    raw = env.get(ENV_TORCH_PROFILE, "").strip()
    if not raw:
        return None
    parts = raw.split(",")
    if len(parts) > 3 or not all(p.strip().isdigit() for p in parts[1:]):
        raise ConfigError(f"{ENV_TORCH_PROFILE}={raw!r}: use <dir>[,skip[,steps]]")
    return raw



@dataclass(frozen=True)
class DraftWindow:
    """What a draft query attends to on CUDA: block 0 (`sink` tokens), the last `window`
    committed positions and its own new tokens (draft_backend.py)."""

    sink: int = 64
    window: int = 1024

    def params(self) -> NSAParams:
        # one selected block (the sink) of `sink` tokens, union combine with the window
        return NSAParams(block=self.sink, stride=self.sink, select=self.sink, topn=1,
                         init_blocks=1, local_blocks=0, window=self.window, gated=False)


def draft_attention(env: dict | None = None) -> DraftWindow | None:
    """None (dense: SGLang's Triton backend) or the DraftWindow (see ENV_DRAFT_ATTN):
    "window", "window=W" or "window=W,sink=S"."""
    env = os.environ if env is None else env
    raw = env.get(ENV_DRAFT_ATTN, "window").strip().lower() or "window"
    if raw == "dense":
        return None
    bad = ConfigError(f"{ENV_DRAFT_ATTN}={raw!r}: choose dense, window, window=W or "
                      "window=W,sink=S (positive integers)")
    if raw == "window":
        return DraftWindow()
    kw = {}
    for part in raw.split(","):
        key, eq, val = part.partition("=")
        if not eq or key not in ("window", "sink") or key in kw or not val.isdigit() \
                or int(val) < 1:
            raise bad
        kw[key] = int(val)
    if "window" not in kw:
        raise bad
    return DraftWindow(**kw)


# how the target verifies inside a precision class: "precision=reuse,refresh_period=4", a JSON
# object with those keys, or the path of a JSON file holding one (VerifyKnobs); default STRICT
ENV_VERIFY = "SPECSA_VERIFY"


def verify_knobs(env: dict | None = None) -> VerifyKnobs:
    """The server's VerifyKnobs, validated against its precision class (ConfigError names the
    variable and the problem)."""
    from specsa.orchestrator.planner import knobs_error
    env = os.environ if env is None else env
    raw = env.get(ENV_VERIFY, "").strip()
    if not raw:
        return VerifyKnobs()
    spec: str | dict = raw
    if raw.startswith("{") or raw.endswith(".json") or os.path.isfile(raw):
        try:
            spec = json.loads(raw) if raw.startswith("{") else json.load(open(raw))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{ENV_VERIFY}: cannot read {raw!r} as JSON ({e})") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"{ENV_VERIFY}: expected a JSON object, got {type(spec).__name__}")
    knobs = VerifyKnobs.parse(spec, ENV_VERIFY)
    why = knobs_error(knobs.precision, knobs.schedule, knobs.refresh_period)
    if why:
        raise ConfigError(f"{ENV_VERIFY}: {why}")
    return knobs


# the per-step orchestrator of the SpecSA worker (step_policy.py): unset/"off" = the static
# --speculative-num-steps; "auto[,steps=0:1:3][,profile=PATH]" = the planner picks the draft
# length every step from a latency profile and the measured acceptance; "sweep[,steps=...]
# [,every=N]" = cycle through the candidate lengths every N steps (to measure a profile)
ENV_PLAN = "SPECSA_PLAN"


@dataclass(frozen=True)
class StepPlan:
    """How the SpecSA worker chooses its draft length per step (candidates: draft steps of a
    chain, 0 = plain decoding; None = the default set under --speculative-num-steps)."""

    mode: str = "off"
    steps: tuple[int, ...] | None = None
    profile: str | None = None
    every: int = 8

    def candidates(self, max_steps: int) -> tuple[int, ...]:
        """The candidate draft lengths, each <= max_steps (SGLang sizes its buffers for
        --speculative-num-steps)."""
        steps = self.steps if self.steps is not None else \
            tuple(sorted({0, 1, (max_steps + 1) // 2, max_steps}))
        if max(steps) > max_steps:
            raise ConfigError(f"{ENV_PLAN}: steps {':'.join(map(str, steps))} exceed "
                              f"--speculative-num-steps {max_steps} (the largest candidate)")
        return steps


def step_plan(env: dict | None = None) -> StepPlan:
    """The worker's StepPlan from $SPECSA_PLAN (ConfigError names the variable and the fix)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_PLAN, "").strip().lower()
    if raw in ("", "off"):
        return StepPlan()
    mode, *parts = [p.strip() for p in raw.split(",")]
    usage = (f"{ENV_PLAN}={raw!r}: use off, auto[,steps=0:1:3][,profile=PATH] or "
             "sweep[,steps=0:1:3][,every=N]")
    if mode not in ("auto", "sweep"):
        raise ConfigError(usage)
    kw: dict = {}
    for part in parts:
        key, eq, val = part.partition("=")
        if not eq or key in kw or key not in ("steps", "profile", "every") or \
                (key == "every" and mode != "sweep") or (key == "profile" and mode != "auto"):
            raise ConfigError(usage)
        if key == "profile":
            kw[key] = env.get(ENV_PLAN, "").split("profile=", 1)[1].split(",")[0].strip()
        else:
            nums = val.split(":")
            if not all(n.isdigit() for n in nums) or (key == "every" and int(val or 0) < 1):
                raise ConfigError(usage)
            kw[key] = tuple(sorted({int(n) for n in nums})) if key == "steps" else int(val)
    if "steps" in kw and (kw["steps"] == (0,) or not kw["steps"]):
        raise ConfigError(f"{ENV_PLAN}: steps must include a length >= 1")
    return StepPlan(mode=mode, **kw)


def state_draft_tokens(server_args) -> int:
    """Draft tokens per request of the runtime state being built. SGLang's adaptive mode (the
    per-step orchestrator, step_policy.py) builds one set of backends per draft length and
    overrides the count in its runtime context meanwhile; server_args keeps the maximum."""
    try:
        from sglang.srt.runtime_context import get_spec
        n = get_spec().speculative_num_draft_tokens
        if n:
            return int(n)
    except Exception:  # noqa: BLE001 - an SGLang without the context: server_args is right
        pass
    return int(getattr(server_args, "speculative_num_draft_tokens", None) or 1)
