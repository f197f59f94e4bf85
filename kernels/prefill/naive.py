"""NSA prefill reference: causal NSA of every prompt row (delegates to the composed reference
`specsa.kernels.nsa.naive`, the specification). Chunking changes nothing semantically: a row
at position t sees positions 0..t whichever chunk it is computed in."""
from __future__ import annotations

import torch

from ..common.params import NSAParams
from ..nsa.naive import CompressionWeights, naive_nsa_query


def naive_nsa_prefill_rows(q: torch.Tensor, k_seq: torch.Tensor, v_seq: torch.Tensor,
                           q_pos: list[int], params: NSAParams, scale: float,
                           cw: CompressionWeights | None = None,
                           gates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows q [N, Hq, D] at positions q_pos of one sequence k_seq, v_seq [L, Hkv, D] (L > max
    q_pos); gates [N, Hq, 3] or None. Returns (o [N, Hq, D] fp32, sel [N, Hkv, topn] int64)."""
    outs, sels = [], []
    for r, t in enumerate(q_pos):
        o, s = naive_nsa_query(q[r], k_seq[: t + 1], v_seq[: t + 1], params, scale, cw,
                               None if gates is None else gates[r])
        outs.append(o)
        sels.append(s)
    return torch.stack(outs), torch.stack(sels)
