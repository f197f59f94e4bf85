"""Run starts of a flagged sequence, on the device without a host sync.

The prefill index builders (prefill/sparse.py `sparse_items`, prefill/chunked.py `row_tiles`)
cut a sorted key list / a chunk's rows into runs and need, for every position, where its run
starts. They used `torch.cummax(torch.where(brk, i, 0), 0).values`: PyTorch's cummax is a
scan-with-indices kernel that cost ~0.9 ns per element on an H100 (280 us per layer for the
311K entries of a 3K-token prefill chunk, as much as the sparse attention kernel itself;
benchmark/results/h100/torch_profile_tree_b8_ae088ce). A prefix sum plus one scatter and one
gather give the same values with plain memory-bound kernels.
"""
from __future__ import annotations

import torch


def run_starts(brk: torch.Tensor) -> torch.Tensor:
    """[N] int64: for each i, the largest j <= i with brk[j] (the start of i's run).

    brk [N] bool marks run starts; brk[0] must be True (checked on CPU tensors only: a check on
    the GPU would sync). Equal to torch.cummax(torch.where(brk, arange(N), 0), 0).values.

    Example: brk [T, F, F, T, F] -> [0, 0, 0, 3, 3].
    """
    n = brk.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=brk.device)
    if brk.device.type == "cpu" and not bool(brk[0]):
        raise ValueError("run_starts: brk[0] must be True (position 0 starts the first run)")
    i = torch.arange(n, device=brk.device, dtype=torch.int64)
    run = torch.cumsum(brk, 0, dtype=torch.int64) - 1                  # run id of each i
    first = torch.zeros(n + 1, dtype=torch.int64, device=brk.device)
    # each run id is written once (at its start); the other positions go to the spare slot n
    first.scatter_(0, torch.where(brk, run, n), i)
    return first[run]
