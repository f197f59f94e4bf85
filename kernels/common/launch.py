"""Host-side launch helpers shared by the kernels' wrappers: tile sizes and the GPU's SM count."""
from __future__ import annotations

import torch
import triton

_SMS: dict = {}


def pow2(x: int, lo: int = 1) -> int:
    """The next power of two >= x, at least lo (Triton tiles are powers of two; the MMA wants
    >= 16 rows and columns, so most callers pass lo=16)."""
    return max(lo, triton.next_power_of_2(int(x)))


def num_sms(device: torch.device | str) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query costs microseconds per
    launch otherwise); 0 for any other device (the CPU interpreter: no split heuristics)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


_COUNTERS: dict = {}


def split_counters(device: torch.device | str, n: int) -> torch.Tensor:
    """n int32 split counters, zero, for a launch whose last split merges (the kernels reset
    each counter they count, so the buffer is zero again when the launch ends). One buffer per
    device, kept across launches: a fresh `torch.zeros` per launch would cost a fill kernel,
    the launch the in-kernel merge saves, inside every CUDA graph. Only launches without a
    caller workspace use it (the target's refresh and verify inside one model forward, which
    are stream-ordered: no two overlap); a workspace (`split_workspace`, `refresh_workspace`)
    has counters of its own. Grown outside graph capture only; a capture that needs more gets
    its own buffer (allocated and zeroed inside the graph)."""
    device = torch.device(device)
    buf = _COUNTERS.get(device)
    if buf is not None and buf.numel() >= n:
        return buf[:n]
    fresh = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _COUNTERS[device] = fresh
    return fresh[:n]
