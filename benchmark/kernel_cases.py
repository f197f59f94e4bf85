"""Inputs, byte floors and the torch reference of benchmark/kernels.py: draft-tree shapes,
synthetic selections with a controlled adjacent-query overlap, the measured overlap, the
memory floor of a step, refresh group cuts."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from specsa.kernels.common.params import NSAParams  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- inputs ----------------
def tree_parents(t: int, chain: bool) -> list[int]:
    """Chain, or a binary tree (node u under (u-1)//2): depth log2(T), siblings everywhere."""
    return list(range(-1, t - 1)) if chain else [-1] + [(u - 1) // 2 for u in range(1, t)]


def synthetic_sel(pos: torch.Tensor, order: list[int], hkv: int, p: NSAParams, overlap: float,
                  gen: torch.Generator) -> torch.Tensor:
    """sel [T, Hkv, topn] int32 for one request: forced blocks + free blocks; walking the flat
    order, each free block of the previous query is kept with probability rho, the rest drawn
    fresh (top-k of random scores keeps them distinct). rho is set from the target overlap."""
    t = pos.shape[0]
    forced_n = p.init_blocks + p.local_blocks
    free = p.topn - forced_n
    rho = max(0.0, min(1.0, (overlap - forced_n / p.topn) / max(1e-9, free / p.topn)))
    nsel = p.num_sel(int(pos.max()) + 1)
    sel = torch.full((t, hkv, p.topn), -1, dtype=torch.int64, device=pos.device)
    prev = None
    for u in order:
        tu = int(pos[u])
        cur = tu // p.select
        forced = sorted(set(range(min(p.init_blocks, cur + 1)))
                        | {j for j in range(cur - p.local_blocks + 1, cur + 1) if j >= 0})
        score = torch.rand(hkv, nsel, generator=gen, device="cpu").to(pos.device)
        score[:, cur + 1:] = -2.0
        score[:, forced] = -1.0
        if prev is not None:
            keep = torch.rand(prev.shape, generator=gen).to(pos.device) < rho
            score.scatter_(1, prev, torch.where(keep, 2.0, score.gather(1, prev)))
            score[:, forced] = -1.0
            score[:, cur + 1:] = -2.0
        n_free = min(free, max(0, cur + 1 - len(forced)))
        pick = score.topk(n_free, dim=1).indices
        prev = pick
        row = torch.cat([torch.tensor(forced, device=pos.device).expand(hkv, -1), pick], 1)
        row = row.sort(1).values
        sel[u, :, :row.shape[1]] = row
    return sel.to(torch.int32)


def measured_overlap(sel: torch.Tensor, orders: list[list[int]], sizes: list[int], topn: int) -> float:
    tot, n, off = 0.0, 0, 0
    for order, t in zip(orders, sizes):
        for a, b in zip(order[:-1], order[1:]):
            sa, sb = sel[off + a], sel[off + b]                       # [Hkv, topn]
            eq = (sa[:, :, None] == sb[:, None, :]) & (sa[:, :, None] >= 0)
            tot += float(eq.any(2).sum(1).float().mean()) / topn
            n += 1
        off += t
    return tot / max(1, n)


def floor_bytes(sel, prefix_lens, sizes, params, hq, hkv, d, elt=2) -> dict:
    """Bytes each read once: union over the request of (sel-block tokens < P U window), tail,
    compressed tokens, q and out."""
    attn_tok, cmp_tok, off = 0, 0, 0
    for P, t in zip(prefix_lens, sizes):
        s = sel[off:off + t]
        w_lo = max(0, P - params.window + 1)
        for h in range(hkv):
            blocks = torch.unique(s[:, h][s[:, h] >= 0]).tolist()
            toks = sum(max(0, min(b * params.select + params.select, w_lo) - b * params.select)
                       for b in blocks)
            attn_tok += toks + (P - w_lo) + t
        cmp_tok += params.num_cmp(P) * hkv
        off += t
    nq = sum(sizes)
    qo = 2 * nq * hq * d * elt
    attn = attn_tok * 2 * d * elt + qo
    return {"attn_bytes": attn, "full_bytes": attn + cmp_tok * 2 * d * elt,
            "dense_bytes": sum(P + t for P, t in zip(prefix_lens, sizes)) * hkv * 2 * d * elt + qo}


# ---------------------------------------------------------------- reference -------------
def torch_reference(case, params, scale, gates=None, o_cmp=None):
    """Vectorised fp32 reference of one batch (per request: all keys, explicit masks)."""
    outs, off = [], 0
    kc, vc, bt = case["k_cache"], case["v_cache"], case["block_table"]
    ps = kc.shape[1]
    for b, (P, par) in enumerate(zip(case["prefix_lens"], case["parents"])):
        t = len(par)
        npg = -(-P // ps)
        k = torch.cat([kc[bt[b, :npg].long()].reshape(-1, *kc.shape[2:])[:P],
                       case["k_new"][off:off + t]]).float()
        v = torch.cat([vc[bt[b, :npg].long()].reshape(-1, *vc.shape[2:])[:P],
                       case["v_new"][off:off + t]]).float()
        dep = [0] * t
        anc = torch.eye(t, dtype=torch.bool, device=k.device)
        for u in range(1, t):
            dep[u] = dep[par[u]] + 1
            anc[u] |= anc[par[u]]
        tq = P + torch.tensor(dep, device=k.device)
        kpos = torch.cat([torch.arange(P, device=k.device), tq])
        vis = torch.cat([torch.ones(t, P, dtype=torch.bool, device=k.device), anc], 1)  # [T, N]
        s = case["sel"][off:off + t].long()                                            # [T, H, n]
        nblk = int(kpos.max()) // params.select + 1
        bm = torch.zeros(t, s.shape[1], nblk + 1, dtype=torch.bool, device=k.device)
        bm.scatter_(2, torch.where(s < 0, nblk, s), True)
        selm = bm[:, :, kpos // params.select] & vis[:, None]
        winm = (kpos[None] >= tq[:, None] - params.window + 1) & vis                     # [T, N]
        g = case["q"].shape[1] // k.shape[1]
        q = case["q"][off:off + t].float()
        logits = torch.einsum("thd,nhd->thn", q, k.repeat_interleave(g, 1)) * scale
        vv = v.repeat_interleave(g, 1)

        def attend(mask):
            lg = logits.masked_fill(~mask, float("-inf"))
            p = torch.softmax(lg, -1).nan_to_num(0.0)
            return torch.einsum("thn,nhd->thd", p, vv)

        if gates is None:
            outs.append(attend((selm | winm[:, None]).repeat_interleave(g, 1)))
        else:
            gt = gates[off:off + t].float()
            o = (gt[..., 0:1] * o_cmp[off:off + t].float()
                 + gt[..., 1:2] * attend(selm.repeat_interleave(g, 1))
                 + gt[..., 2:3] * attend(winm[:, None].expand(-1, q.shape[1], -1)))
            outs.append(o)
        off += t
    return torch.cat(outs)


def refresh_group_cuts(case, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, g_start, g_len) int32 on DEV: each request's rows in flat order, cut every c."""
    order, g_start, g_len = [], [], []
    off = 0
    for t, ordr in zip(case["sizes"], case["orders"]):
        for s0 in range(0, t, c):
            g_start.append(len(order))
            g_len.append(len(ordr[s0:s0 + c]))
            order.extend(off + u for u in ordr[s0:s0 + c])
        off += t
    i32 = {"dtype": torch.int32, "device": DEV}
    return (torch.tensor(order, **i32), torch.tensor(g_start, **i32), torch.tensor(g_len, **i32))


# ---------------------------------------------------------------- one point ------------
