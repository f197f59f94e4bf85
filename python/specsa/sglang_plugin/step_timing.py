"""Where one speculative decode step goes inside SGLang: per-phase GPU and host time.

Enabled by `SPECSA_STEP_TIMING=<file.json>` (settings.step_timing_path). The SpecSA worker then
marks the phase boundaries of every decode step

    draft | verify_prep | target_fwd | accept | draft_extend

with a CUDA event and a host clock each, synchronises at the end of the step (timing only:
this costs the overlap SGLang would otherwise keep) and appends one entry
{bs, seq_max, steps, predicted_ms, gpu_ms{phase}, host_ms{phase}, plan_host_ms, step_gpu_ms, step_host_ms} to a
ring buffer that it writes to the file at the end of a step, at most every `every_s` seconds
(so the last entries reach the file with a later step). GPU time of a phase is the time
between its two events on the compute stream, idle gaps waiting for the host included; host
time is the Python time between the marks. `plan_host_ms` (a key the results files already
carry) is the part of the host time the specsa target backend spent building the step's
metadata (init_forward_metadata*), added by the backend.

`SPECSA_TORCH_PROFILE=<dir>[,skip[,steps]]` additionally runs torch.profiler over `steps`
decode steps after `skip` and writes key_averages tables (by device and by host time) there.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

PHASES = ("draft", "verify_prep", "target_fwd", "accept", "draft_extend")


class StepTimer:
    def __init__(self, path: str, every_s: float = 0.5, keep: int = 1024):
        self.path = Path(path)
        self.every_s, self.keep = every_s, keep
        self._flushed = 0.0
        self.entries: list[dict] = []
        self.active = False
        self._marks: list[tuple[str, torch.cuda.Event | None, float]] = []
        self.metadata_host_s = 0.0
        self._meta: dict = {}
        self._cuda = torch.cuda.is_available()

    def _event(self):
        if not self._cuda:
            return None
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def begin(self, bs: int, seq_max: int, steps: int | None = None,
              predicted_ms: float | None = None) -> None:
        """steps: the step's draft length; predicted_ms: the orchestrator's prediction of the
        step's time (step_policy.py, auto mode)."""
        self.active = True
        self.metadata_host_s = 0.0
        self._meta = {"bs": int(bs), "seq_max": int(seq_max), "steps": steps,
                      "predicted_ms": predicted_ms}
        self._marks = [("start", self._event(), time.perf_counter())]

    def mark(self, name: str) -> None:
        if self.active:
            self._marks.append((name, self._event(), time.perf_counter()))

    def add_metadata_host(self, seconds: float) -> None:
        if self.active:
            self.metadata_host_s += seconds

    def end(self) -> None:
        if not self.active:
            return
        self.active = False
        if self._cuda:
            torch.cuda.synchronize()
        gpu, host = {}, {}
        for (_, e0, t0), (name, e1, t1) in zip(self._marks, self._marks[1:]):
            host[name] = host.get(name, 0.0) + 1e3 * (t1 - t0)
            if e0 is not None:
                gpu[name] = gpu.get(name, 0.0) + e0.elapsed_time(e1)
        (_, e_first, t_first), (_, e_last, t_last) = self._marks[0], self._marks[-1]
        entry = dict(self._meta, gpu_ms=gpu, host_ms=host,
                     plan_host_ms=1e3 * self.metadata_host_s,
                     step_host_ms=1e3 * (t_last - t_first),
                     step_gpu_ms=e_first.elapsed_time(e_last) if e_first is not None else None)
        self.entries.append(entry)
        if len(self.entries) > self.keep:
            del self.entries[: len(self.entries) - self.keep]
        if time.perf_counter() - self._flushed >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._flushed = time.perf_counter()
        write_json_atomic(self.path, {"phases": list(PHASES), "entries": self.entries})


def write_json_atomic(path: Path, obj) -> None:
    """Replace `path` with obj's JSON in one rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class TorchProfile:
    """torch.profiler over decode steps [skip, skip + steps) of the scheduler process."""

    def __init__(self, spec: str):
        parts = spec.split(",")
        self.dir = Path(parts[0])
        self.skip = int(parts[1]) if len(parts) > 1 else 20
        self.steps = int(parts[2]) if len(parts) > 2 else 8
        self.seen = 0
        self.prof = None

    def step_begin(self) -> None:
        if self.seen == self.skip:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                             if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()

    def step_end(self) -> None:
        self.seen += 1
        if self.prof is not None and self.seen == self.skip + self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            self.dir.mkdir(parents=True, exist_ok=True)
            ka = self.prof.key_averages()
            for key in ("device_time_total", "cpu_time_total"):
                try:
                    table = ka.table(sort_by=key, row_limit=60)
                except Exception as e:  # noqa: BLE001 - a missing column must not kill serving
                    table = f"{key}: {e}"
                (self.dir / f"torch_profile_{key}.txt").write_text(
                    f"{self.steps} decode steps after {self.skip}\n{table}\n")
            self.prof = None
