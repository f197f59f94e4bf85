"""Configuration: frozen dataclasses and enums, parsed once at the edge (CLI, plugin).

Nothing below the edge reads environment variables or server args; it receives these objects.
Every constructor validates and raises `ConfigError` naming the bad field.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace

from specsa.kernels.common.params import NSAParams


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class Combine(enum.Enum):
    GATED = "gated"   # native NSA: sigmoid gates mix the three branch outputs
    UNION = "union"   # training-free: one softmax over selected-block tokens U window tokens


class Compression(enum.Enum):
    MEAN = "mean"        # training-free: arithmetic mean of the l cached keys/values
    LEARNED = "learned"  # native: per-position weights (+ bias) from the checkpoint


class PrecisionClass(enum.Enum):
    STRICT = "strict"              # exact NSA; greedy output identical to autoregressive
    REUSE = "reuse"                # cross-layer index reuse (refresh/reuse layers)
    APPROX = "approx"              # shared-index groups
    APPROX_REUSE = "approx_reuse"  # both


class Traversal(enum.Enum):
    CHAIN = "chain"
    BFS = "bfs"   # siblings adjacent
    DFS = "dfs"   # parent and child adjacent


class Schedule(enum.Enum):
    INDEPENDENT = "independent"
    EXACT_MERGED = "exact_merged"
    SHARED_INDEX = "shared_index"


def positive_int_arg(flag: str):
    """argparse `type=` for a flag that takes an integer >= 1; the error names the flag."""
    import argparse

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {v}")
        return v
    return parse


def parse_enum(cls: type[enum.Enum], value: str | enum.Enum, field: str) -> enum.Enum:
    """Enum from its value string, with an error that lists the allowed values."""
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in cls)
        raise ConfigError(f"{field}: unknown value {value!r} (allowed: {allowed})") from None


@dataclass(frozen=True)
class NSAConfig:
    """NSA hyperparameters (docs/DESIGN.md section 3). Defaults are the NSA paper's.

    block (l) compression block, stride (d), select (l') selection block, topn (n) selected
    blocks counting the forced ones (init_blocks leading + local_blocks trailing), window (w).
    """

    block: int = 32
    stride: int = 16
    select: int = 64
    topn: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 512
    combine: Combine = Combine.UNION
    compress: Compression = Compression.MEAN

    def __post_init__(self) -> None:
        for name in ("block", "stride", "select", "topn", "window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"NSAConfig.{name} must be a positive integer, got {v!r}")
        for name in ("init_blocks", "local_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"NSAConfig.{name} must be a non-negative integer, got {v!r}")
        if self.block % self.stride:
            raise ConfigError(f"NSAConfig.stride ({self.stride}) must divide block ({self.block})")
        if self.select % self.stride:
            raise ConfigError(f"NSAConfig.stride ({self.stride}) must divide select ({self.select})")
        if self.block > self.select:
            raise ConfigError(f"NSAConfig.block ({self.block}) must be <= select ({self.select})")
        if self.topn < self.init_blocks + self.local_blocks:
            raise ConfigError(
                f"NSAConfig.topn ({self.topn}) must be >= init_blocks + local_blocks "
                f"({self.init_blocks} + {self.local_blocks})")
        object.__setattr__(self, "combine", parse_enum(Combine, self.combine, "NSAConfig.combine"))
        object.__setattr__(self, "compress",
                           parse_enum(Compression, self.compress, "NSAConfig.compress"))

    @property
    def params(self) -> NSAParams:
        """The plain-number view the kernels take."""
        return NSAParams(block=self.block, stride=self.stride, select=self.select,
                         topn=self.topn, init_blocks=self.init_blocks,
                         local_blocks=self.local_blocks, window=self.window,
                         gated=self.combine is Combine.GATED)

    # CLI / JSON keys -> field names (`--nsa block=8,stride=4,...`)
    _KEYS = {"block": "block", "stride": "stride", "select": "select", "topn": "topn",
             "window": "window", "combine": "combine", "compress": "compress",
             "init": "init_blocks", "init_blocks": "init_blocks",
             "local": "local_blocks", "local_blocks": "local_blocks"}

    def with_overrides(self, spec: str | dict | None) -> "NSAConfig":
        """Apply `key=value,...` (or a dict) on top of this config; unknown keys are errors."""
        if not spec:
            return self
        items = spec.items() if isinstance(spec, dict) else _split_kv(spec, "--nsa")
        kw = {}
        for key, val in items:
            if key not in self._KEYS:
                raise ConfigError(
                    f"--nsa: unknown key {key!r} (allowed: {', '.join(sorted(self._KEYS))})")
            name = self._KEYS[key]
            if name in ("combine", "compress"):
                kw[name] = val
            else:
                try:
                    kw[name] = int(val)
                except (TypeError, ValueError):
                    raise ConfigError(f"--nsa: {key} must be an integer, got {val!r}") from None
        return replace(self, **kw)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["combine"] = self.combine.value
        d["compress"] = self.compress.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NSAConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"NSA config: unknown keys {sorted(unknown)}")
        return cls(**d)


def _split_kv(spec: str, flag: str) -> list[tuple[str, str]]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ConfigError(f"{flag}: expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        out.append((k.strip().lower(), v.strip()))
    return out


@dataclass(frozen=True)
class VerifyKnobs:
    """How verification runs inside a precision class (docs/DESIGN.md section 5).

    precision: the user's class; schedule: None = the exact default for the step's size
    (specsa.schedule.default_schedule); group_size C: None = the default for the Q tile;
    refresh_period R: layer l refreshes its block selection when l % R == 0 and reuses the last
    refresh layer's selection otherwise (R = 1: every layer refreshes, exact). Whether a
    combination stays inside the class is checked by `specsa.orchestrator.planner.knobs_error`.
    """

    precision: PrecisionClass = PrecisionClass.STRICT
    schedule: Schedule | None = None
    group_size: int | None = None
    refresh_period: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision",
                           parse_enum(PrecisionClass, self.precision, "precision"))
        if self.schedule is not None:
            object.__setattr__(self, "schedule", parse_enum(Schedule, self.schedule, "schedule"))
        for name, lo in (("group_size", 1), ("refresh_period", 1)):
            v = getattr(self, name)
            if v is None and name == "group_size":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")

    _KEYS = ("precision", "schedule", "group_size", "refresh_period")

    @classmethod
    def parse(cls, spec: str | dict, flag: str) -> "VerifyKnobs":
        """From `key=value,...` or a dict; unknown keys and bad values name `flag`."""
        items = spec.items() if isinstance(spec, dict) else _split_kv(spec, flag)
        kw = {}
        for key, val in items:
            key = key.replace("-", "_")
            if key not in cls._KEYS:
                raise ConfigError(f"{flag}: unknown key {key!r} (allowed: {', '.join(cls._KEYS)})")
            if key in ("group_size", "refresh_period"):
                try:
                    val = int(val)
                except (TypeError, ValueError):
                    raise ConfigError(f"{flag}: {key} must be an integer, got {val!r}") from None
            kw[key] = val
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{flag}: {e}") from None

    def refreshes(self, layer: int) -> bool:
        """Does layer `layer` (0-based among the model's attention layers) refresh?"""
        return layer % self.refresh_period == 0


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry. page_size in {1, 16, 64} is tested; any positive value works."""

    page_size: int = 16
    num_pages: int = 4096

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ConfigError(f"CacheConfig.page_size must be a positive integer, got {self.page_size!r}")
        if not isinstance(self.num_pages, int) or self.num_pages < 1:
            raise ConfigError(f"CacheConfig.num_pages must be a positive integer, got {self.num_pages!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"SamplingConfig.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ConfigError(f"SamplingConfig.max_new_tokens must be >= 0, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
