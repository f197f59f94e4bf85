"""One decode / verification step's metadata built on the device from the draft trees
(no host synchronisation, static shapes: what a CUDA graph replays).

Inputs per step, all device tensors: each request's committed length P [B], its draft tree as
parent indices [B, T] (node 0 is the root, parents precede children; -1 = child of the
committed context), and its page table [B, W]. Outputs, written in place into static buffers:
- node positions P + depth and ancestor bitmasks (the tree mask);
- provisional compressed tokens (docs/DESIGN.md section 2): node v closes a compression block
  when P + depth(v) = i*d + l - 1 for some i; its l sources are committed pool slots for
  positions < P and tail rows of v's ancestors for positions >= P (`compress_gather`'s index
  convention: slot >= 0, tail row r as -1 - r); every node sees the provisional tokens of its
  ancestors and itself;
- the verifier's group geometry: groups of C consecutive nodes of one request (the trees' node
  order: SGLang's drafts list nodes level by level, so siblings are mostly adjacent), each
  group's window start, the selection source per node (itself, or the group's deepest node for
  SHARED_INDEX);
- the committed positions whose compressed tokens the step rewrites first ([P - margin, P)).

The host-side reference for all of it is `specsa.provisional` + `kernels/fused/geometry.py`
(tested against each other in test/specsa/test_device_metadata.py). Depths and ancestor sets come
from pointer jumping: ceil(log2 T) rounds of gathers.

Two builders write the same buffers: `DeviceStepMetadata.fill` (torch ops, the reference) and
`DeviceStepMetadata.fill_from_pool` (one Triton launch, `kernels/stage/step_metadata.py`, straight
from SGLang's seq_lens, req_to_token and EAGLE links: what serving runs before every step; tested
bit-identical to the reference in test/specsa/test_step_metadata_kernel.py).
"""
from __future__ import annotations

import math

import torch

from specsa.kernels.common.params import NSAParams
from specsa.kernels.common.tree import MAX_TREE_NODES, batched_depths_ancestor_bits
from specsa.kernels.fused import VerifyGeometry
from specsa.kernels.stage import fill_step_metadata
from specsa.verify_layer import StepTensors


def parents_from_links(next_token: torch.Tensor, next_sibling: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] parents from EAGLE's first-child / next-sibling links (device, no sync).

    Each node but the root is some node's first child or the next sibling of a node with the
    same parent, so parent[first_child(u)] = u and parent[next_sibling(c)] = parent[c];
    sibling chains are followed by pointer jumping (ceil(log2 T) rounds)."""
    b, t = next_token.shape
    dev = next_token.device
    nt, ns = next_token.long(), next_sibling.long()
    u = torch.arange(t, device=dev).expand(b, t)
    # head[c] = the first child at the start of c's sibling chain's parent, via "previous
    # sibling" pointers: prev[next_sibling[c]] = c
    par = torch.full((b, t + 1), -1, dtype=torch.long, device=dev)     # column t: a sink
    par.scatter_(1, torch.where(nt >= 0, nt, t), torch.where(nt >= 0, u, -1))
    prev = torch.full((b, t + 1), t, dtype=torch.long, device=dev)
    prev.scatter_(1, torch.where(ns >= 0, ns, t), torch.where(ns >= 0, u, t))
    par, prev = par[:, :t], prev[:, :t]
    for _ in range(max(1, math.ceil(math.log2(max(t, 2))))):
        known = par >= 0
        step = prev.clamp(max=t - 1)
        par = torch.where(known | (prev >= t), par, par.gather(1, step))
        prev = torch.where(known | (prev >= t), prev, prev.gather(1, step))
    par[:, 0] = -1
    if out is not None:
        return out.copy_(par)
    return par


class DeviceStepMetadata:
    """Static device buffers of one step shape (B requests x T nodes, group size C)."""

    def __init__(self, bs: int, t: int, width: int, page_size: int, params: NSAParams,
                 group_size: int, shared: bool, margin: int, device, num_splits: int = 1):
        if not 1 <= t <= MAX_TREE_NODES:
            raise ValueError(f"a draft tree has {t} nodes; the tree mask supports "
                             f"1..{MAX_TREE_NODES}")
        self.bs, self.t, self.params, self.page_size = bs, t, params, page_size
        self.c, self.shared, self.margin = group_size, shared, margin
        n, dev = bs * t, torch.device(device)
        i32 = dict(dtype=torch.int32, device=dev)
        ng_req = -(-t // group_size)
        ar = torch.arange(n, **i32)
        # inputs
        self.prefix = torch.zeros(bs, **i32)
        self.parents = torch.zeros(bs, t, dtype=torch.long, device=dev)
        self.block_table = torch.zeros(bs, width, **i32)
        # the refresh / compression side
        self.q_req = torch.arange(bs, **i32).repeat_interleave(t)
        self.q_pos = torch.zeros(n, **i32)
        self.cmp_lens = torch.zeros(bs, **i32)
        self.upd_lo = torch.zeros(bs, **i32)
        self.prov_idx = torch.zeros(n, params.block, **i32)
        self.prov_cidx = torch.zeros(n, **i32)
        self.prov_vis = torch.full((n, t), -1, **i32)
        # the verifier's groups: C consecutive nodes of one request
        g_local = torch.arange(ng_req, **i32)
        g_start = (torch.arange(bs, **i32)[:, None] * t + g_local[None, :] * group_size)
        g_len = (t - g_local * group_size).clamp(max=group_size).expand(bs, ng_req)
        self.geo = VerifyGeometry(
            req_P=self.prefix, req_off=torch.arange(bs, **i32) * t,
            req_T=torch.full((bs,), t, **i32), block_table=self.block_table, q_pos=self.q_pos,
            q_anc=torch.zeros(n, dtype=torch.long, device=dev), order=ar,
            sel_src=ar.clone(), g_req=torch.arange(bs, **i32).repeat_interleave(ng_req),
            g_start=g_start.reshape(-1).contiguous(), g_len=g_len.reshape(-1).contiguous(),
            g_winlo=torch.zeros(bs * ng_req, **i32), C=group_size, t_max=t,
            num_splits=num_splits, direct=group_size == 1)

    @property
    def num_queries(self) -> int:
        return self.bs * self.t

    def step_tensors(self, verifier) -> StepTensors:
        """What `verify_layer` reads, over these buffers."""
        g = self.geo
        return StepTensors(block_table=self.block_table, q_req=self.q_req, q_pos=self.q_pos,
                           cmp_lens=self.cmp_lens, prov_idx=self.prov_idx,
                           prov_cidx=self.prov_cidx, prov_vis=self.prov_vis,
                           groups=(g.order, g.g_start, g.g_len), group_size=self.c,
                           verifier=verifier)

    def fill_from_pool(self, seq_lens: torch.Tensor, decode: bool, req_to_token: torch.Tensor,
                       pool_idx: torch.Tensor, window: int,
                       links: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`fill` in one kernel launch from SGLang's tensors (device, no host sync): seq_lens
        [>= B] (prefix = max(seq - 1, 0) for decode, seq for verification), req_to_token
        [rows, cols] int32 slot table and pool_idx [>= B] (each request's row; block_table
        [b, j] = req_to_token[pool_idx[b], j * PS] // PS), links = EAGLE's (next_token,
        next_sibling) [raw <= B, T] for requests 0 .. raw - 1 (parents_from_links) or None;
        the other requests' trees are chains. Bit-identical to `fill` on those inputs."""
        nt, ns = links if links is not None else (None, None)
        fill_step_metadata(
            seq_lens, req_to_token, pool_idx, decode=decode, window=window, params=self.params,
            page_size=self.page_size, group_size=self.c, margin=self.margin,
            prefix=self.prefix, parents=self.parents, block_table=self.block_table,
            q_pos=self.q_pos, q_anc=self.geo.q_anc, cmp_lens=self.cmp_lens, upd_lo=self.upd_lo,
            prov_idx=self.prov_idx, prov_cidx=self.prov_cidx, prov_vis=self.prov_vis,
            g_winlo=self.geo.g_winlo, sel_src=self.geo.sel_src if self.shared else None,
            next_token=nt, next_sibling=ns)

    def fill(self, prefix: torch.Tensor, parents: torch.Tensor, block_table: torch.Tensor,
             window: int) -> None:
        """Build one step's metadata in place from device tensors: prefix [B] committed lengths,
        parents [B, T], block_table [B, >= W'] page ids (the first W columns are used)."""
        p, bs, t, c = self.params, self.bs, self.t, self.c
        self.prefix.copy_(prefix)
        self.parents.copy_(parents)
        w = self.block_table.shape[1]
        self.block_table.copy_(block_table[:, :w])
        P = self.prefix.long()
        depth, anc = batched_depths_ancestor_bits(self.parents)
        pos = P[:, None] + depth                                           # [B, T]
        self.q_pos.copy_(pos.reshape(-1))
        self.geo.q_anc.copy_(anc.reshape(-1))
        self.cmp_lens.copy_(torch.where(P >= p.block, (P - p.block) // p.stride + 1, 0))
        self.upd_lo.copy_((P - self.margin).clamp(min=0))
        # provisional tokens: node v closes block i when pos(v) - l + 1 = i * d >= 0
        first = pos - (p.block - 1)
        closes = (first >= 0) & (first % p.stride == 0)
        self.prov_cidx.copy_(torch.where(closes, first // p.stride, 0).reshape(-1))
        j = torch.arange(p.block, device=P.device)
        src_pos = first[..., None] + j                                     # [B, T, l]
        committed = src_pos < P[:, None, None]
        ps = self.page_size
        safe = src_pos.clamp(min=0)
        pages = self.block_table.long().gather(1, (safe // ps).reshape(bs, -1)).reshape(safe.shape)
        slot = pages * ps + safe % ps
        # tail sources: v's ancestor at depth src_pos - P (the ancestor a with that depth)
        u = torch.arange(t, device=P.device)
        is_anc = ((anc[:, :, None] >> u[None, None, :]) & 1).bool()        # [B, v, a]
        want = src_pos - P[:, None, None]                                  # [B, T, l]
        hit = is_anc[:, :, None, :] & (depth[:, None, None, :] == want[..., None])
        tail_row = torch.arange(bs, device=P.device)[:, None, None] * t + hit.long().argmax(-1)
        src = torch.where(committed, slot, -1 - tail_row)
        self.prov_idx.copy_(torch.where(closes[..., None], src, 0).reshape(-1, p.block))
        # node u sees the provisional rows of its closing ancestors (self included): slot a of
        # u's list holds node a's row when a is one of them, else -1
        rows = torch.arange(bs, device=P.device)[:, None, None] * t + u[None, None, :]
        vis = torch.where(is_anc & closes[:, None, :], rows, -1)
        self.prov_vis.copy_(vis.reshape(bs * t, t))
        # groups: window start of the shallowest node, selection source
        ng = -(-t // c)
        pad = ng * c - t
        dpad = torch.nn.functional.pad(depth, (0, pad), value=1 << 30).view(bs, ng, c)
        winlo = (P[:, None] + dpad.min(-1).values - window + 1).clamp(min=0)
        self.geo.g_winlo.copy_(winlo.reshape(-1))
        if self.shared:
            dneg = torch.nn.functional.pad(depth, (0, pad), value=-1).view(bs, ng, c)
            # deepest node of the group; ties -> the latest (as kernels/fused/geometry.py)
            key = dneg * (c + 1) + torch.arange(c, device=P.device)
            rep = key.argmax(-1) + torch.arange(ng, device=P.device) * c           # [B, ng]
            src_q = rep[:, :, None].expand(bs, ng, c).reshape(bs, -1)[:, :t]
            self.geo.sel_src.copy_((src_q + torch.arange(bs, device=P.device)[:, None] * t)
                                   .reshape(-1))


def chain_parents(bs: int, t: int, device) -> torch.Tensor:
    return (torch.arange(t, device=device) - 1).expand(bs, t).contiguous()
