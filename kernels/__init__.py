"""specsa.kernels: NSA ops, one folder per op, each with an fp32 `naive.py` specification
beside its fast schedules. Depends on torch and triton only."""
from .common.params import NSAParams

__all__ = ["NSAParams"]
