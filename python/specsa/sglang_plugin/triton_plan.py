"""Per-step metadata of the Triton NSA path inside SGLang, in static buffers.

Decode and TARGET_VERIFY forwards have a fixed shape per batch size (every request carries T
new tokens: 1 for decode, `speculative_num_draft_tokens` for verification), so everything the
kernels read lives in buffers allocated once per (mode, batch size) and rewritten in place
before every forward. A CUDA graph captured around the layers therefore replays with the new
step's metadata; eager forwards use the very same buffers, so CPU tests (Triton interpreter)
exercise the code the graphs run.

Host inputs per step: the committed length P of each request (SGLang's seq_lens on the host)
and the draft tree (parents). Slots come from SGLang's req_to_token table on the device.

Layout contract with the kernels (docs/CONTRACTS.md section 4): SGLang's token pool of one
layer, [size + page_size, Hkv, D], is read as pages [num_pages, page_size, Hkv, D]; a token's
flat pool slot is page * page_size + offset, which is exactly SGLang's slot index, and the
block table entry of logical page j is req_to_token[r, j * page_size] // page_size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specsa.attention import NSAVerifier
from specsa.config import NSAConfig, Traversal, VerifyKnobs
from specsa.kernels.common.upload import copy_to_
from specsa.kernels.nsa.naive import tree_depths
from specsa.provisional import closing_blocks, visible_rows
from specsa.schedule import default_schedule


def block_table_from(rows: torch.Tensor, page_size: int, width: int) -> torch.Tensor:
    """[B, width] int32 page ids of the requests' logical pages, from their req_to_token rows
    (device op, no host sync)."""
    rows = rows[:, ::page_size][:, :width]
    bt = torch.div(rows, page_size, rounding_mode="floor").to(torch.int32)
    if bt.shape[1] < width:
        bt = torch.nn.functional.pad(bt, (0, width - bt.shape[1]))
    return bt


@dataclass
class StepBuffers:
    """Static metadata of one (mode, batch size): see the module docstring."""

    bs: int
    tokens_per_req: int
    bt: torch.Tensor          # [bs, W] int32
    q_req: torch.Tensor       # [N] int32
    q_pos: torch.Tensor       # [N] int32
    cmp_lens: torch.Tensor    # [bs] int32, num_cmp(P)
    upd_lo: torch.Tensor      # [bs] int32: compressed tokens closed by positions upd_lo..P-1
    upd_hi: torch.Tensor      # [bs] int32   are (re)written from the committed pool first
    prov_code: torch.Tensor   # [N, l] int64 host-planned sources: >= 0 position, < 0 tail row
    prov_idx: torch.Tensor    # [N, l] int32 compress_gather sources (pool slot or tail row)
    prov_cidx: torch.Tensor   # [N] int32 compressed index of each node's provisional token
    prov_vis: torch.Tensor    # [N, T] int32 provisional rows visible to each node, -1 padded
    verifier: NSAVerifier
    group_size: int = 1

    @property
    def num_tokens(self) -> int:
        return self.bs * self.tokens_per_req


class StepPlanner:
    """Allocates `StepBuffers` per (mode, batch size) and fills them for each step."""

    def __init__(self, nsa: NSAConfig, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, page_size: int, table_width: int, margin: int, device,
                 knobs: VerifyKnobs = VerifyKnobs()):
        self.knobs = knobs
        self.nsa, self.params = nsa, nsa.params
        self.hq, self.hkv, self.head_dim, self.scale = num_q_heads, num_kv_heads, head_dim, scale
        self.page_size, self.width, self.margin = page_size, table_width, margin
        self.device = torch.device(device)
        self._bufs: dict[tuple[str, int, int], StepBuffers] = {}

    def buffers(self, mode: str, bs: int, t: int) -> StepBuffers:
        key = (mode, bs, t)
        if key not in self._bufs:
            n, l, dev = bs * t, self.params.block, self.device
            i32 = dict(dtype=torch.int32, device=dev)
            self._bufs[key] = StepBuffers(
                bs=bs, tokens_per_req=t, bt=torch.zeros(bs, self.width, **i32),
                q_req=torch.zeros(n, **i32), q_pos=torch.zeros(n, **i32),
                cmp_lens=torch.zeros(bs, **i32), upd_lo=torch.zeros(bs, **i32),
                upd_hi=torch.zeros(bs, **i32),
                prov_code=torch.zeros(n, l, dtype=torch.int64, device=dev),
                prov_idx=torch.zeros(n, l, **i32), prov_cidx=torch.zeros(n, **i32),
                prov_vis=torch.full((n, t), -1, **i32),
                verifier=NSAVerifier(self.nsa, self.hq, self.hkv, self.head_dim, device=dev,
                                     scale=self.scale, graph_buffers=True))
        return self._bufs[key]

    def fill(self, buf: StepBuffers, prefix_lens: list[int], parents: list[list[int]],
             req_to_token: torch.Tensor, pool_idx: torch.Tensor) -> StepBuffers:
        """Rewrite `buf` in place for one step: P per request (host), trees (host), slots
        (device). Shapes never change, so captured graphs stay valid."""
        p, t, bs = self.params, buf.tokens_per_req, buf.bs
        if len(prefix_lens) != bs or len(parents) != bs or any(len(x) != t for x in parents):
            raise ValueError(f"specsa triton plan: expected {bs} requests of {t} tokens, got "
                             f"{len(prefix_lens)} lengths and trees of {[len(x) for x in parents]}")
        q_req, q_pos, cmp_lens, lo, code, cidx, vis = [], [], [], [], [], [], []
        for b, (P, par) in enumerate(zip(prefix_lens, parents)):
            q_req.extend([b] * t)
            q_pos.extend(P + dv for dv in tree_depths(par))
            cmp_lens.append(p.num_cmp(P))
            lo.append(max(0, P - self.margin))
            # committed sources as positions (mapped to slots on the device below); one row per
            # node, so the shapes never change: rows of nodes closing no block are unused
            blocks = closing_blocks(par, P, p, lambda t: t, b * t)
            code.extend([0] * p.block if x is None else x[0] for x in blocks)
            cidx.extend(0 if x is None else x[1] for x in blocks)
            rows = visible_rows(par, {v: b * t + v for v, x in enumerate(blocks) if x is not None})
            vis.extend(r + [-1] * (t - len(r)) for r in rows)

        # pinned, asynchronous copies: the host never waits for the GPU here
        copy_to_(buf.q_req, q_req)
        copy_to_(buf.q_pos, q_pos)
        copy_to_(buf.cmp_lens, cmp_lens)
        copy_to_(buf.upd_lo, lo)
        copy_to_(buf.upd_hi, list(prefix_lens))
        copy_to_(buf.prov_code, code)
        copy_to_(buf.prov_cidx, cidx)
        copy_to_(buf.prov_vis, vis)
        req_rows = req_to_token.index_select(0, pool_idx.long())
        buf.bt.copy_(block_table_from(req_rows, self.page_size, self.width))
        # committed sources -> SGLang slots (req_to_token), tail rows stay negative
        slots = req_rows.index_select(0, buf.q_req.long()).gather(1, buf.prov_code.clamp(min=0))
        buf.prov_idx.copy_(torch.where(buf.prov_code >= 0, slots, buf.prov_code).to(torch.int32))
        k = self.knobs
        plan = buf.verifier.plan(parents, prefix_lens, buf.bt,
                                 schedule=k.schedule or default_schedule(buf.num_tokens),
                                 traversal=Traversal.BFS, precision=k.precision,
                                 group_size=k.group_size)
        buf.group_size = plan.group_size
        return buf

