"""NSA self-attention layer of the decoder (Llama/Qwen2 projections + NSA core).

Projections, RoPE and the output projection are batched over all tokens of all requests;
the NSA core runs per request (`masked_nsa` over that request's committed context + block),
which is the CPU / eager path. Keys are post-RoPE (they are what the cache stores), scale is
1/sqrt(head_dim) (DESIGN.md section 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specsa.config import Combine, Compression, NSAConfig
from specsa.kernels.nsa import TreeVisibility, masked_nsa, provisional_cmp

from .cache import PagedKVCache
from .config import ModelConfig
from .rope import apply_rotary


@dataclass(frozen=True)
class RequestView:
    """One request inside a batched forward: rows offset..offset+n-1 of the flat token batch,
    its tree visibility (on the model device), the committed-context slots, and where its
    provisional compressed tokens go in the PendingKV."""

    rid: int
    offset: int
    n: int
    prefix_len: int
    parents: torch.Tensor          # [n] int64, on device
    vis: TreeVisibility            # tensors on device
    kv_slots: torch.Tensor         # [P] int64
    cmp_slots: torch.Tensor        # [num_cmp(P)] int64
    cmp_offset: int


class LearnedCompression(nn.Module):
    """phi weights of native NSA (CONTRACTS.md section 5): weight [Hkv, l], bias [Hkv, D]."""

    def __init__(self, num_kv_heads: int, block: int, head_dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_kv_heads, block), 1.0 / block))
        self.bias = nn.Parameter(torch.zeros(num_kv_heads, head_dim)) if bias else None


class NSAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, nsa: NSAConfig, *, gate_bias: bool = False,
                 compress_bias: bool = False):
        super().__init__()
        hq, hkv, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.hq, self.hkv, self.head_dim, self.scale = hq, hkv, d, cfg.scale
        self.nsa, self.params = nsa, nsa.params
        self.q_proj = nn.Linear(h, hq * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(hq * d, h, bias=cfg.o_bias)
        self.gate_proj = (nn.Linear(h, 3 * hq, bias=gate_bias)
                          if nsa.combine is Combine.GATED else None)
        learned = nsa.compress is Compression.LEARNED
        self.compress_k = LearnedCompression(hkv, nsa.block, d, compress_bias) if learned else None
        self.compress_v = LearnedCompression(hkv, nsa.block, d, compress_bias) if learned else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: PagedKVCache, layer: int, views: list[RequestView]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] (normed layer input) -> (out [N, hidden], k, v [N, Hkv, D] post-RoPE,
        ck, cv [C, Hkv, D] provisional compressed tokens of all requests, in view order)."""
        n = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(n, self.hq, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(n, self.hkv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.hkv, self.head_dim)
        gates = None
        if self.gate_proj is not None:
            # row 3*h + c of gate_proj is gate c (cmp, slc, win) of head h (CONTRACTS.md 5)
            gates = torch.sigmoid(self.gate_proj(x).float()).view(n, self.hq, 3)
        o = torch.empty(n, self.hq, self.head_dim, dtype=x.dtype, device=x.device)
        cks, cvs = [], []
        for rv in views:
            rows = slice(rv.offset, rv.offset + rv.n)
            kc, vc, ckc, cvc = cache.gather(layer, rv.kv_slots, rv.cmp_slots)
            pk, pv = self._provisional(kc, vc, k[rows], v[rows], rv)
            masked_nsa(q[rows], torch.cat([kc, k[rows]]), torch.cat([vc, v[rows]]),
                       rv.vis.q_pos, rv.vis.k_pos, rv.vis.kv_visible,
                       torch.cat([ckc, pk]), torch.cat([cvc, pv]), rv.vis.c_idx,
                       rv.vis.c_visible, self.params, self.scale,
                       None if gates is None else gates[rows], out=o[rows])
            cks.append(pk)
            cvs.append(pv)
        return self.o_proj(o.view(n, -1)), k, v, torch.cat(cks), torch.cat(cvs)

    def _provisional(self, kc, vc, kb, vb, rv: RequestView) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed tokens closed inside the block, cast to the cache dtype so that a
        committed copy later reads back exactly what verification attended to."""
        keep = min(rv.prefix_len, self.params.block - 1)
        wk = bk = wv = bv = None
        if self.compress_k is not None:
            wk, bk = self.compress_k.weight, self.compress_k.bias
            wv, bv = self.compress_v.weight, self.compress_v.bias
        pk = provisional_cmp(kc[rv.prefix_len - keep:], kb, rv.parents, self.params, wk, bk,
                             ctx_len=rv.prefix_len)
        pv = provisional_cmp(vc[rv.prefix_len - keep:], vb, rv.parents, self.params, wv, bv,
                             ctx_len=rv.prefix_len)
        return pk.to(kb.dtype), pv.to(vb.dtype)
