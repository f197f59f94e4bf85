"""GPU timing helpers for the kernel benchmarks: CUDA-graph replays timed with
events, L2 flushed between replays (cold L2), median reported; measured copy bandwidth as the
memory ceiling. Falls back to wall-clock timing without CUDA (CPU smoke runs only)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def copy_bandwidth(device: str = "cuda", nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    if not torch.cuda.is_available():
        return 1e11
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    del src, dst
    return nbytes / statistics.median(times)


class L2Flush:
    """Writes a buffer larger than L2 so the next kernel starts cold (outside the timed span)."""

    def __init__(self, device: str = "cuda") -> None:
        size = 256 << 20
        if torch.cuda.is_available():
            size = max(size, 4 * torch.cuda.get_device_properties(device).L2_cache_size)
            self.buf = torch.empty(size // 4, dtype=torch.int32, device=device)
        else:
            self.buf = None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def bench(fn: Callable[[], object], flush: L2Flush | None = None, reps: int = 25,
          graph: bool = True) -> dict:
    """Median / p20 / p80 microseconds of fn() (captured in a CUDA graph when graph=True)."""
    if not torch.cuda.is_available():
        fn()
        t0 = time.perf_counter()
        fn()
        us = (time.perf_counter() - t0) * 1e6
        return {"median_us": us, "p20_us": us, "p80_us": us, "reps": 1, "graph": False}
    fn()                                    # compile / autotune outside capture
    torch.cuda.synchronize()
    run = fn
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    run()
    torch.cuda.synchronize()
    evs = []
    for _ in range(reps):
        if flush is not None:
            flush()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        evs.append((s, e))
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) * 1e3 for s, e in evs)
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]
    return {"median_us": statistics.median(ts), "p20_us": q(0.2), "p80_us": q(0.8),
            "reps": reps, "graph": graph}
