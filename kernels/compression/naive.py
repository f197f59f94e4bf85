"""Compression branch of NSA, fp32 reference (docs/DESIGN.md section 3, docs/CONTRACTS.md section 2).

Legend: L tokens of a linear path, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head dim,
l = params.block, d = params.stride, l' = params.select, Nc compressed tokens, Nsel
selection blocks. Query head h reads KV head h // G.
"""
from __future__ import annotations

import torch

from ..common.params import NSAParams


def compress_blocks(blocks: torch.Tensor, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """phi over gathered compression blocks; shared by `compress` and tree paths so that every
    caller does the same fp32 arithmetic (bit-identical compressed tokens).

    Args:
        blocks (torch.Tensor): shape [N, l, Hkv, D], the l cached keys (or values) of each block,
            oldest first.
        weight (torch.Tensor | None): shape [Hkv, l]; None = MEAN (arithmetic mean, W = 1/l).
        bias (torch.Tensor | None): shape [Hkv, D]; only with weight.
    Returns:
        torch.Tensor: shape [N, Hkv, D], float32.
    """
    if blocks.dim() != 4:
        raise ValueError(f"compress_blocks: blocks must be [N, l, Hkv, D], got {tuple(blocks.shape)}")
    b = blocks.float()
    _n, l, hkv, dim = b.shape
    if weight is None and bias is not None:
        raise ValueError("compress_blocks: bias given without weight (MEAN mode has no bias)")
    if weight is not None and tuple(weight.shape) != (hkv, l):
        raise ValueError(f"compress_blocks: weight must be [Hkv={hkv}, l={l}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (hkv, dim):
        raise ValueError(f"compress_blocks: bias must be [Hkv={hkv}, D={dim}], got {tuple(bias.shape)}")
    # An explicit left-to-right sum of elementwise terms: torch's mean/einsum pick reduction
    # orders by shape and CPU ISA (N=1 vs N=7 differed on AVX-512), which would make the tree
    # path's provisional token differ in the last bit from the one compressed at commit.
    w = None if weight is None else weight.float().to(b.device)
    out = b[:, 0] if w is None else b[:, 0] * w[None, :, 0, None]
    for j in range(1, l):
        out = out + (b[:, j] if w is None else b[:, j] * w[None, :, j, None])
    if w is None:
        return out / l
    return out if bias is None else out + bias.float().to(b.device)


def compress(k_seq: torch.Tensor, params: NSAParams, weight: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Compressed tokens of a linear sequence: token i = phi(k_seq[i*d : i*d+l]).

    Args:
        k_seq (torch.Tensor): shape [L, Hkv, D], keys (or values) at positions 0..L-1, any dtype.
        params (NSAParams): block l, stride d.
        weight (torch.Tensor | None): shape [Hkv, l] learned weights; None = MEAN.
        bias (torch.Tensor | None): shape [Hkv, D] or None.
    Returns:
        torch.Tensor: shape [Nc, Hkv, D] float32, Nc = params.num_cmp(L) (token i exists iff
        i*d + l <= L). Nc = 0 gives an empty [0, Hkv, D] tensor.

    Bytes: reads Nc*l*Hkv*D elements (each key l/d times when gathered naively; a fused kernel
    reads L*Hkv*D once), writes Nc*Hkv*D*4.

    Example: l=4, d=2, L=7 -> Nc=2: token 0 = mean(k[0:4]), token 1 = mean(k[2:6]); k[6] is
    not yet covered because token 2 would need k[4:8].
    """
    if k_seq.dim() != 3:
        raise ValueError(f"compress: k_seq must be [L, Hkv, D], got {tuple(k_seq.shape)}")
    length, hkv, dim = k_seq.shape
    nc = params.num_cmp(length)
    if nc == 0:
        return torch.zeros(0, hkv, dim, dtype=torch.float32, device=k_seq.device)
    idx = (torch.arange(nc, device=k_seq.device)[:, None] * params.stride
           + torch.arange(params.block, device=k_seq.device)[None, :])          # [Nc, l]
    return compress_blocks(k_seq[idx], weight, bias)


def _group_heads(hq: int, hkv: int, what: str) -> int:
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{what}: Hq={hq} must be a positive multiple of Hkv={hkv}")
    return hq // hkv


def naive_cmp_attention(q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed-branch attention of one query over its compressed tokens.

    Args:
        q (torch.Tensor): shape [Hq, D].
        ck, cv (torch.Tensor): shape [Nc, Hkv, D], the compressed tokens on the query's path.
        scale (float): softmax scale.
    Returns:
        (o [Hq, D] float32, p [Hq, Nc] float32): output and softmax probabilities (one softmax per
        query head). Both are zero when Nc == 0.

    Bytes: reads Hq*D + 2*Nc*Hkv*D elements, writes Hq*D + Hq*Nc floats.
    """
    if q.dim() != 2 or ck.dim() != 3 or ck.shape != cv.shape:
        raise ValueError(f"naive_cmp_attention: q [Hq, D], ck/cv [Nc, Hkv, D] expected, got "
                         f"{tuple(q.shape)}, {tuple(ck.shape)}, {tuple(cv.shape)}")
    hq, dim = q.shape
    nc, hkv, _ = ck.shape
    g = _group_heads(hq, hkv, "naive_cmp_attention")
    o = torch.zeros(hq, dim, dtype=torch.float32, device=q.device)
    p = torch.zeros(hq, nc, dtype=torch.float32, device=q.device)
    if nc == 0:
        return o, p
    for h in range(hq):
        kh = h // g
        logits = (ck[:, kh].float() @ q[h].float()) * scale                    # [Nc]
        p[h] = torch.softmax(logits, dim=0)
        o[h] = p[h] @ cv[:, kh].float()
    return o, p


def overlap_weights(c_idx: torch.Tensor, num_sel: int, params: NSAParams) -> torch.Tensor:
    """Eq. 9 weights W[c, j] = |[i*d, i*d+l) intersect [j*l', (j+1)*l')| / d with i = c_idx[c].

    Returns float32 [Nc, num_sel]. With d | l and d | l' the numerators are multiples of d, so
    the weights are small integers (exact in fp32): see kernels/README.md.
    """
    d, l, ls = params.stride, params.block, params.select
    start = c_idx.to(torch.int64)[:, None] * d                                  # [Nc, 1]
    j = torch.arange(num_sel, device=c_idx.device)[None, :]                     # [1, Nsel]
    lo = torch.maximum(start, j * ls)
    hi = torch.minimum(start + l, (j + 1) * ls)
    return (hi - lo).clamp(min=0).to(torch.float32) / d


def naive_block_scores(p: torch.Tensor, t: int, params: NSAParams,
                       c_idx: torch.Tensor | None = None,
                       num_kv_heads: int | None = None) -> torch.Tensor:
    """Selection-block scores of one query at position t (Eq. 9 overlap mapping + group sum).

    Args:
        p (torch.Tensor): compressed probabilities, shape [Hq, Nc] (then num_kv_heads is required,
            query head h belongs to KV head h // G) or [Hkv, G, Nc].
        t (int): query position; candidates are blocks j with j*l' <= t.
        params (NSAParams): block, stride, select.
        c_idx (torch.Tensor | None): shape [Nc] int, index i of each compressed token (block
            [i*d, i*d+l)); default arange(Nc).
        num_kv_heads (int | None): Hkv when p is [Hq, Nc].
    Returns:
        torch.Tensor: shape [Hkv, params.num_sel(t+1)] float32,
        score[h, j] = sum_{g, c} p[h*G+g, c] * |[i_c*d, i_c*d+l) intersect [j*l', (j+1)*l')| / d.

    Bytes: reads Hq*Nc floats, writes Hkv*Nsel floats (the overlap table is computed, not read).

    Example: l=4, d=2, l'=4 -> token i=1 covers [2, 6): half in block 0, half in block 1, so it
    adds p*2/2 = p to both blocks; token i=0 covers [0, 4) and adds 2p to block 0.
    """
    if p.dim() == 2:
        if num_kv_heads is None:
            raise ValueError("naive_block_scores: p is [Hq, Nc]; pass num_kv_heads to group heads")
        g = _group_heads(p.shape[0], num_kv_heads, "naive_block_scores")
        p = p.reshape(num_kv_heads, g, p.shape[1])
    elif p.dim() != 3:
        raise ValueError(f"naive_block_scores: p must be [Hq, Nc] or [Hkv, G, Nc], got {tuple(p.shape)}")
    nc = p.shape[2]
    if c_idx is None:
        c_idx = torch.arange(nc, device=p.device)
    if c_idx.shape != (nc,):
        raise ValueError(f"naive_block_scores: c_idx must be [Nc={nc}], got {tuple(c_idx.shape)}")
    w = overlap_weights(c_idx, params.num_sel(t + 1), params)                  # [Nc, Nsel]
    per_head = torch.einsum("hgc,cj->hgj", p.float(), w)                        # [Hkv, G, Nsel]
    return per_head.sum(dim=1)
