"""Latency profiles: what one GPU (or CPU) measured for one model, as data the planner reads.

A profile lives in `configs/profiles/<gpu>/<model>.json` (schema in configs/profiles/README.md,
written by `benchmark/profile_planner.py`). It holds three tables:

- verify: milliseconds of one whole target verification step (all layers, projections, LM head)
  keyed by (context, tokens T = verifier queries per request including the root, traversal,
  schedule, group size C, refresh period R, batch);
- decode: milliseconds of one autoregressive decode step, keyed by (context, batch);
- draft: per drafter name, `step_ms` per draft forward (one per tree depth level) and
  `token_ms` per drafted token and request.

Lookup (`Profile.verify_ms`, `Profile.decode_ms`):
- schedule: exact match. traversal: exact, else the other tree order (BFS <-> DFS cost the same
  for INDEPENDENT); CHAIN never stands in for a tree or the reverse.
- group size, refresh period, batch: the nearest measured value in log2 distance (ties to the
  smaller), because these are discrete knobs the benchmark sweeps sparsely.
- context and T: bilinear interpolation of the latency in (log2 context, log2 T), clamped to
  the measured range (the planner never asks for a T outside it). Each (traversal, schedule, C,
  R, batch) slice must be a full context x T grid; `from_dict` checks that.

    prof = load_profile("configs/profiles/cpu/tiny.json")
    prof.verify_ms(context=300, tokens=5, schedule=Schedule.INDEPENDENT,
                   traversal=Traversal.CHAIN)          # interpolated between measured points
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from specsa.config import ConfigError, Schedule, Traversal

SCHEMA = "specsa.profile/1"
# the repository's profiles, configs/profiles/<gpu>/<model>.json (gpu: `gpu_folder`)
PROFILES_DIR = Path(__file__).resolve().parents[3] / "configs" / "profiles"


def gpu_folder(device_name: str) -> str:
    """The folder under PROFILES_DIR for a device name as torch reports it ('cpu' on CPU)."""
    low = device_name.lower()
    return next((s for s in ("h200", "h100", "a100", "b200") if s in low),
                "cpu" if "cpu" in low else low.replace(" ", "_"))


# the runtime's own step profiles live one level down (configs/profiles/<gpu>/runtime/): its
# eager steps cost more than SGLang's graph-replayed ones for the same model shape
RUNTIME_SUBDIR = "runtime"


def shape_key(num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int,
              head_dim: int, vocab_size: int) -> tuple[int, ...]:
    return (num_layers, hidden_size, num_heads, num_kv_heads, head_dim, vocab_size)


def match_profile(folder: Path, want: tuple[int, ...]) -> "Profile | None":
    """The first profile in `folder` (sorted by file name, not recursive) whose model shape
    key (`shape_key`) is `want`; None if there is none."""
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        prof = load_profile(path)
        m = prof.model
        if shape_key(m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim,
                     m.vocab_size) == want:
            return prof
    return None


class ProfileError(ConfigError):
    """A profile file is malformed or cannot answer a query; the message names the field."""


@dataclass(frozen=True)
class ModelShape:
    """The model the profile was measured on (checked by callers that know their model)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    nsa: tuple[tuple[str, object], ...] = ()    # NSAConfig.to_dict() items, sorted


@dataclass(frozen=True)
class VerifyEntry:
    context: int
    tokens: int
    traversal: Traversal
    schedule: Schedule
    group_size: int
    refresh_period: int
    batch: int
    ms: float


@dataclass(frozen=True)
class DecodeEntry:
    context: int
    batch: int
    ms: float
    refresh_period: int = 1


@dataclass(frozen=True)
class DraftCost:
    """draft_ms(depth, tokens, batch) = depth * step_ms + tokens * batch * token_ms."""

    name: str
    step_ms: float
    token_ms: float

    def ms(self, depth: int, tokens: int, batch: int = 1) -> float:
        return depth * self.step_ms + tokens * batch * self.token_ms


@dataclass(frozen=True)
class _Grid:
    """One slice: latency on a full (log2 context) x (log2 T) grid."""

    contexts: tuple[int, ...]
    tokens: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]      # [context][T]

    def at(self, context: float, tokens: float) -> float:
        i, fi = _bracket(self.contexts, context)
        j, fj = _bracket(self.tokens, tokens)
        row = lambda a: self.ms[a][j] * (1 - fj) + self.ms[a][j + 1] * fj if fj else self.ms[a][j]
        return row(i) * (1 - fi) + row(i + 1) * fi if fi else row(i)


@dataclass(frozen=True)
class Profile:
    gpu: str
    model: ModelShape
    verify: tuple[VerifyEntry, ...]
    decode: tuple[DecodeEntry, ...]
    draft: tuple[DraftCost, ...]
    metadata: tuple[tuple[str, object], ...] = ()
    # lookup index built once: (schedule, traversal) -> {(C, R, batch): _Grid}
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        slices: dict[tuple, list[VerifyEntry]] = {}
        for e in self.verify:
            slices.setdefault((e.schedule, e.traversal, e.group_size, e.refresh_period, e.batch),
                              []).append(e)
        self._index.clear()
        for (sc, tr, c, r, b), rows in slices.items():
            self._index.setdefault((sc, tr), {})[(c, r, b)] = _grid(
                rows, (sc.value, tr.value, c, r, b), "profile")

    # -- what the profile offers (the planner enumerates only these) ---------------------
    def schedules(self) -> tuple[Schedule, ...]:
        have = {sc for sc, _ in self._index}
        return tuple(s for s in Schedule if s in have)

    def traversals(self, schedule: Schedule) -> tuple[Traversal, ...]:
        have = {tr for sc, tr in self._index if sc is schedule}
        return tuple(t for t in Traversal if t in have)

    def group_sizes(self, schedule: Schedule) -> tuple[int, ...]:
        return tuple(sorted({k[0] for (sc, _), g in self._index.items() if sc is schedule
                             for k in g}))

    def refresh_periods(self, schedule: Schedule | None = None) -> tuple[int, ...]:
        """Refresh periods measured for `schedule` (None: those of the decode table)."""
        if schedule is None:
            return tuple(sorted({e.refresh_period for e in self.decode}))
        return tuple(sorted({k[1] for (sc, _), g in self._index.items() if sc is schedule
                             for k in g}))

    def token_range(self) -> tuple[int, int]:
        ts = [e.tokens for e in self.verify]
        return min(ts), max(ts)

    def draft_cost(self, name: str) -> DraftCost:
        for d in self.draft:
            if d.name == name:
                return d
        raise ProfileError(f"profile for {self.gpu}/{self.model.name} has no draft cost for "
                           f"drafter {name!r} (has: {', '.join(d.name for d in self.draft)})")

    # -- lookups ------------------------------------------------------------------------
    def verify_ms(self, context: int, tokens: int, schedule: Schedule, traversal: Traversal,
                  group_size: int = 1, refresh_period: int = 1, batch: int = 1) -> float:
        """One verification step (all requests of the batch), milliseconds."""
        if not any(sc is schedule for sc, _ in self._index):
            raise ProfileError(f"profile has no verify entries for schedule {schedule.value}")
        grids = self._index.get((schedule, traversal))
        if grids is None:
            alt = {Traversal.BFS: Traversal.DFS, Traversal.DFS: Traversal.BFS}.get(traversal)
            grids = self._index.get((schedule, alt))
            if grids is None:
                raise ProfileError(f"profile has no verify entries for schedule "
                                   f"{schedule.value} with traversal {traversal.value}")
        keys = list(grids)
        c = _nearest(sorted({k[0] for k in keys}), group_size)
        keys = [k for k in keys if k[0] == c]
        r = _nearest(sorted({k[1] for k in keys}), refresh_period)
        keys = [k for k in keys if k[1] == r]
        b = _nearest(sorted({k[2] for k in keys}), batch)
        return grids[(c, r, b)].at(context, tokens)

    def decode_ms(self, context: int, batch: int = 1, refresh_period: int = 1) -> float:
        """One autoregressive decode step (all requests of the batch), milliseconds."""
        if not self.decode:
            raise ProfileError("profile has no decode entries")
        r = _nearest(sorted({e.refresh_period for e in self.decode}), refresh_period)
        rows = [e for e in self.decode if e.refresh_period == r]
        b = _nearest(sorted({e.batch for e in rows}), batch)
        rows = sorted((e for e in rows if e.batch == b), key=lambda e: e.context)
        ctx = tuple(e.context for e in rows)
        i, f = _bracket(ctx, context)
        return rows[i].ms * (1 - f) + rows[i + 1].ms * f if f else rows[i].ms

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        m = self.model
        return {
            "schema": SCHEMA, "gpu": self.gpu,
            "model": {"name": m.name, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
                      "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
                      "head_dim": m.head_dim, "vocab_size": m.vocab_size, "nsa": dict(m.nsa)},
            "metadata": dict(self.metadata),
            "decode": [{"context": e.context, "batch": e.batch, "refresh_period": e.refresh_period,
                        "ms": e.ms} for e in self.decode],
            "draft": [{"name": d.name, "step_ms": d.step_ms, "token_ms": d.token_ms}
                      for d in self.draft],
            "verify": [{"context": e.context, "tokens": e.tokens, "traversal": e.traversal.value,
                        "schedule": e.schedule.value, "group_size": e.group_size,
                        "refresh_period": e.refresh_period, "batch": e.batch, "ms": e.ms}
                       for e in self.verify],
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> "Profile":
        """Validate and build; every error names the file and the offending field."""
        _need(isinstance(d, dict), f"{where}: top level must be a JSON object")
        _need(d.get("schema") == SCHEMA, f"{where}: schema must be {SCHEMA!r}, got "
                                         f"{d.get('schema')!r}")
        gpu = d.get("gpu")
        _need(isinstance(gpu, str) and gpu, f"{where}: gpu must be a non-empty string")
        md = d.get("model")
        _need(isinstance(md, dict), f"{where}: model must be an object")
        shape = {k: _int(md, k, f"{where}: model", 1) for k in
                 ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size")}
        name = md.get("name")
        _need(isinstance(name, str) and name, f"{where}: model.name must be a non-empty string")
        nsa = md.get("nsa", {})
        _need(isinstance(nsa, dict), f"{where}: model.nsa must be an object")
        meta = d.get("metadata", {})
        _need(isinstance(meta, dict), f"{where}: metadata must be an object")
        verify = tuple(_verify_entry(e, f"{where}: verify[{i}]")
                       for i, e in enumerate(_list(d, "verify", where)))
        _need(verify, f"{where}: verify must not be empty")
        decode = tuple(DecodeEntry(context=_int(e, "context", f"{where}: decode[{i}]", 1),
                                   batch=_int(e, "batch", f"{where}: decode[{i}]", 1),
                                   ms=_ms(e, f"{where}: decode[{i}]"),
                                   refresh_period=_int({"refresh_period": 1, **e},
                                                       "refresh_period", f"{where}: decode[{i}]", 1))
                       for i, e in enumerate(_list(d, "decode", where)))
        _need(decode, f"{where}: decode must not be empty (the planner compares against it)")
        draft = tuple(DraftCost(name=_str(e, "name", f"{where}: draft[{i}]"),
                                step_ms=_ms(e, f"{where}: draft[{i}]", "step_ms", zero=True),
                                token_ms=_ms(e, f"{where}: draft[{i}]", "token_ms", zero=True))
                      for i, e in enumerate(_list(d, "draft", where)))
        _need(draft, f"{where}: draft must list at least one drafter's cost")
        _unique(verify, decode, draft, where)
        slices: dict[tuple, list[VerifyEntry]] = {}
        for e in verify:
            slices.setdefault((e.schedule.value, e.traversal.value, e.group_size,
                               e.refresh_period, e.batch), []).append(e)
        for key, rows in sorted(slices.items()):
            _grid(rows, key, where)     # a slice that is not a full grid: error naming the file
        prof = cls(gpu=gpu, model=ModelShape(name=name, nsa=tuple(sorted(nsa.items())), **shape),
                   verify=verify, decode=decode, draft=draft,
                   metadata=tuple(sorted(meta.items())))
        return prof


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile {p} does not exist (write one with "
                           "benchmark/profile_planner.py)") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"profile {p}: not valid JSON ({e})") from None
    return Profile.from_dict(data, str(p))


def save_profile(profile: Profile, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    return p


# -- helpers ------------------------------------------------------------------------------
def _need(ok: object, msg: str) -> None:
    if not ok:
        raise ProfileError(msg)


def _list(d: dict, key: str, where: str) -> list:
    v = d.get(key)
    _need(isinstance(v, list), f"{where}: {key} must be a list, got {type(v).__name__}")
    return v


def _int(e: object, key: str, where: str, lo: int) -> int:
    _need(isinstance(e, dict), f"{where} must be an object")
    v = e.get(key)
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"{where}.{key} must be an integer >= {lo}, got {v!r}")
    return v


def _str(e: dict, key: str, where: str) -> str:
    v = e.get(key) if isinstance(e, dict) else None
    _need(isinstance(v, str) and v, f"{where}.{key} must be a non-empty string, got {v!r}")
    return v


def _ms(e: dict, where: str, key: str = "ms", zero: bool = False) -> float:
    v = e.get(key) if isinstance(e, dict) else None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= 0 if zero else v > 0)
    _need(ok, f"{where}.{key} must be a finite number {'>= 0' if zero else '> 0'} "
              f"(milliseconds), got {v!r}")
    return float(v)


def _enum(e: dict, key: str, cls, where: str):
    v = e.get(key)
    try:
        return cls(str(v).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in cls)
        raise ProfileError(f"{where}.{key}: unknown value {v!r} (allowed: {allowed})") from None


def _verify_entry(e: object, where: str) -> VerifyEntry:
    _need(isinstance(e, dict), f"{where} must be an object")
    ent = VerifyEntry(context=_int(e, "context", where, 1), tokens=_int(e, "tokens", where, 1),
                      traversal=_enum(e, "traversal", Traversal, where),
                      schedule=_enum(e, "schedule", Schedule, where),
                      group_size=_int(e, "group_size", where, 1),
                      refresh_period=_int(e, "refresh_period", where, 1),
                      batch=_int(e, "batch", where, 1), ms=_ms(e, where))
    _need(ent.schedule is not Schedule.INDEPENDENT or ent.group_size == 1,
          f"{where}.group_size must be 1 for schedule independent, got {ent.group_size}")
    return ent


def _unique(verify, decode, draft, where: str) -> None:
    seen: set = set()
    for i, e in enumerate(verify):
        k = (e.context, e.tokens, e.traversal, e.schedule, e.group_size, e.refresh_period, e.batch)
        _need(k not in seen, f"{where}: verify[{i}] duplicates an earlier entry {k}")
        seen.add(k)
    keys = [(e.context, e.batch, e.refresh_period) for e in decode]
    _need(len(set(keys)) == len(keys),
          f"{where}: decode has duplicate (context, batch, refresh_period) entries")
    names = [x.name for x in draft]
    _need(len(set(names)) == len(names), f"{where}: draft has duplicate names")


def _grid(rows: list[VerifyEntry], key: tuple, where: str = "profile") -> _Grid:
    ctx = tuple(sorted({e.context for e in rows}))
    tok = tuple(sorted({e.tokens for e in rows}))
    table = {(e.context, e.tokens): e.ms for e in rows}
    missing = [(c, t) for c in ctx for t in tok if (c, t) not in table]
    _need(not missing, f"{where}: verify slice {key} is not a full context x tokens grid; "
                       f"missing (context, tokens) {missing[:4]}")
    return _Grid(ctx, tok, tuple(tuple(table[(c, t)] for t in tok) for c in ctx))


def _bracket(xs: tuple[int, ...], x: float) -> tuple[int, float]:
    """Index i and weight f of x between xs[i] and xs[i+1] in log2 space (clamped)."""
    if x <= xs[0] or len(xs) == 1:
        return 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, 0.0
    i = bisect.bisect_right(xs, x) - 1
    lo, hi = math.log2(xs[i]), math.log2(xs[i + 1])
    return i, (math.log2(x) - lo) / (hi - lo)


def _nearest(xs: list[int], x: int) -> int:
    return min(xs, key=lambda v: (abs(math.log2(v) - math.log2(max(x, 1))), v))
