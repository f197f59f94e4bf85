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
