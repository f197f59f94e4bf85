"""Per-step verification metadata: frozen dataclasses built by `NSAVerifier.prepare`, read by every
layer's `run`. Construct by keyword only."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specsa.config import PrecisionClass, Schedule, Traversal
from specsa.kernels.common.params import NSAParams
from specsa.kernels.fused import SplitWorkspace, VerifyGeometry


@dataclass(frozen=True)
class VerifyMetadata:
    """One verification step's frozen geometry.

    schedule / traversal / precision: what prepare() was asked for; group_size C (1 for
    INDEPENDENT); num_splits split-KV factor; geometry: device metadata (VerifyGeometry);
    union: (idx [NG, Hkv, CAP] int32, own int64, cnt [NG, Hkv] int32) buffers for the merged
    schedules, None for INDEPENDENT; workspace: split-KV partial buffers or None;
    union_capacity CAP = C * topn; sizes: tree sizes per request; num_queries Nq.
    """

    schedule: Schedule
    traversal: Traversal
    precision: PrecisionClass
    params: NSAParams
    group_size: int
    num_splits: int
    geometry: VerifyGeometry
    union: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    workspace: SplitWorkspace | None
    union_capacity: int
    sizes: tuple[int, ...]
    num_queries: int
