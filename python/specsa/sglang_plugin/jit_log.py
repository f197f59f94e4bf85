"""Which Triton kernels compile while a server runs, and how long each compile takes.

Why: a Triton kernel launched with a new specialization (an integer argument that becomes
divisible by 16 or equal to 1, a new constexpr value, a new dtype) compiles on the host in the
middle of a decode step: 100-400 ms during which the GPU idles. CUDA graphs hide this for the
kernels they captured, not for the kernels launched eagerly around them (SGLang's and ours).
`SPECSA_JIT_LOG=<file>` (settings.jit_log_path) appends one JSON line per compile of the
scheduler process:

    {"t": unix time, "kernel": module.qualname, "ms": compile time, "warmup": bool,
     "constexprs": {...}, "signature": {...}}

so a benchmark can count the compiles inside its measured window (sglang_e2e.py does) and a
stall in a step timing can be traced to the kernel that caused it.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path


def _short(d) -> dict:
    """JSON-safe, bounded view of a hook's signature / constants mapping."""
    out = {}
    for k, v in list((d or {}).items())[:48]:
        out[str(k)] = v if isinstance(v, (int, float, bool, str)) or v is None else str(v)
    return out


class JitLog:
    """Installs Triton's JIT cache / post-compile hooks; chains any hooks already set."""

    def __init__(self, path: str):
        from triton import knobs
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._start: dict = {}
        rt = knobs.runtime
        self._prev_cache, self._prev_post = rt.jit_cache_hook, rt.jit_post_compile_hook
        rt.jit_cache_hook = self._before
        rt.jit_post_compile_hook = self._after

    def _before(self, *args, **kw):
        self._start[str(kw.get("key"))] = time.perf_counter()
        # a true return value would tell Triton to skip the compile
        return self._prev_cache(*args, **kw) if self._prev_cache else False

    def _after(self, *args, **kw):
        t0 = self._start.pop(str(kw.get("key")), None)
        fn, comp = kw.get("fn"), kw.get("compile") or {}
        rec = {"t": time.time(),
               "kernel": f"{getattr(fn, 'module', '')}.{getattr(fn, 'name', kw.get('repr', '?'))}",
               "ms": None if t0 is None else round(1e3 * (time.perf_counter() - t0), 1),
               "warmup": bool(kw.get("is_manual_warmup", False)),
               "constexprs": _short(comp.get("constants")),
               "signature": _short(comp.get("signature"))}
        with self._lock, self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return self._prev_post(*args, **kw) if self._prev_post else None


def read_jit_log(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


_installed: JitLog | None = None


def install_from_env() -> JitLog | None:
    """Install the log once per process when SPECSA_JIT_LOG is set (the scheduler process
    calls this when it builds the specsa attention backend)."""
    global _installed
    from .settings import jit_log_path
    path = jit_log_path()
    if path and _installed is None:
        _installed = JitLog(path)
    return _installed
