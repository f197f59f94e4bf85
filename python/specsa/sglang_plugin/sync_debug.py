"""Where a SpecSA decode step makes the host wait for the GPU.

Why: SGLang's overlap scheduler prepares step N+1 on the host while the GPU runs step N; any
operation inside a step whose result the host needs (`.item()`, `.tolist()`, a boolean-mask
index, `nonzero`, a copy to the CPU) stalls the host until the GPU catches up, and the step
then costs host time plus GPU time instead of the larger of the two. The SGLang tree path had
one per step (branch_tail.py). `SPECSA_SYNC_DEBUG=<file.json>` turns on torch's CUDA sync
debug mode ("warn") inside every decode step of the SpecSA worker only, catches each warning
with the Python stack that raised it, and writes

    {"steps": n, "sites": [{"where": innermost frame, "count": n, "message": ..., "stack": [...]}]}

(the file is rewritten at most every `every_s` seconds, at a step end). Diagnostic only: torch
warns, nothing changes in what runs.
"""
from __future__ import annotations

import os
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .step_timing import write_json_atomic

_SYNC_WORDS = "synchronizing CUDA operation"


class SyncDebug:
    def __init__(self, path: str, every_s: float = 0.5, cuda: bool | None = None):
        self.path = Path(path)
        self.every_s = every_s
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.sites: dict[str, dict] = {}
        self.steps = 0
        self._flushed = 0.0

    def _record(self, message: str) -> None:
        here = os.path.dirname(__file__)
        frames = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                  if "warnings" not in os.path.basename(f.filename)
                  and not f.filename.startswith(here + os.sep + "sync_debug")][-10:]
        where = frames[-1] if frames else "?"
        site = self.sites.setdefault(where, {"where": where, "count": 0,
                                             "message": message[:240], "stack": frames})
        site["count"] += 1

    @contextmanager
    def step(self):
        """Wrap one decode step: every synchronising CUDA call inside it is recorded."""
        self.steps += 1
        prev_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if _SYNC_WORDS in str(message):
                self._record(str(message))
            else:
                prev_show(message, category, filename, lineno, file, line)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            prev_mode = torch.cuda.get_sync_debug_mode() if self.cuda else None
            if self.cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode(prev_mode)
        now = time.monotonic()
        if now - self._flushed >= self.every_s:
            self._flushed = now
            self.flush()

    def summary(self) -> dict:
        sites = sorted(self.sites.values(), key=lambda s: -s["count"])
        return {"steps": self.steps, "sites": sites}

    def flush(self) -> None:
        write_json_atomic(self.path, self.summary())
