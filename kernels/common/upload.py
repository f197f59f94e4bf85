"""Host-planned step metadata to the device without stalling the host on the GPU stream.

A host->device copy from pageable memory first waits for the stream (CUDA's documented sync
behaviour for pageable transfers), so every small per-step metadata copy would make the host
wait for the GPU to drain, leaving the GPU idle while the host plans the next step. Staging the
values in pinned memory (PyTorch's caching host allocator reuses those blocks) keeps the copy
asynchronous.
"""
from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A list / numpy array as a tensor on `device` (asynchronous on CUDA)."""
    dev = torch.device(device)
    pin = dev.type == "cuda"
    if isinstance(values, np.ndarray):
        t = torch.from_numpy(values).to(dtype)
        return (t.pin_memory() if pin else t).to(dev, non_blocking=pin)
    return torch.tensor(values, dtype=dtype, pin_memory=pin).to(dev, non_blocking=pin)


def copy_to_(dst: torch.Tensor, values) -> torch.Tensor:
    """Write a list / array into an existing device tensor of the same number of elements."""
    src = to_device(values, dst.dtype, dst.device)
    return dst.copy_(src.view(dst.shape), non_blocking=True)
