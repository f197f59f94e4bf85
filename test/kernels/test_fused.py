"""Fused selected + window + combine kernel (kernels/fused) and split merge vs the fp32 references,
under TRITON_INTERPRET=1 on CPU. Also hosts the case builders the other verify tests import."""
from __future__ import annotations


import random


import pytest
import torch

from conftest import assert_close, poisoned

from specsa.kernels.common.launch import split_counters
from specsa.kernels.common.params import NSAParams
from specsa.kernels.fused import (VerifyArgs, build_geometry, decode_geometry, fused_decode,
                                  naive_fused_tree, split_workspace)
from specsa.kernels.selection.naive import forced_blocks

from conftest import DEV  # noqa: E402
SMALL = NSAParams(block=8, stride=4, select=8, topn=4, init_blocks=1, local_blocks=2, window=12)


def random_parents(t: int, chain: bool, rng: random.Random) -> list[int]:
    if chain:
        return list(range(-1, t - 1))
    return [-1] + [rng.randrange(0, u) for u in range(1, t)]


def random_sel(t_pos: int, hkv: int, params: NSAParams, rng: random.Random,
               pool: list[int] | None = None) -> torch.Tensor:
    """A valid selection for a query at t_pos: forced blocks + random others (from `pool` first,
    to create overlap), sorted, -1 padded."""
    nsel = params.num_sel(t_pos + 1)
    out = torch.full((hkv, params.topn), -1, dtype=torch.int32)
    for h in range(hkv):
        chosen = set(forced_blocks(t_pos, params))
        others = [j for j in range(nsel) if j not in chosen]
        rng.shuffle(others)
        if pool is not None:
            others = [j for j in pool if j < nsel and j not in chosen] + others
        for j in others:
            if len(chosen) >= min(params.topn, nsel):
                break
            chosen.add(j)
        s = sorted(chosen)
        out[h, :len(s)] = torch.tensor(s, dtype=torch.int32)
    return out


def make_case(prefix_lens, tree_sizes, hq, hkv, d, page_size, params, dtype=torch.float32,
              chain=False, seed=0, gated=None):
    """Random paged caches, trees, tail KV and selections for a batch of requests."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    gated = params.gated if gated is None else gated
    b = len(prefix_lens)
    pages_per = [-(-p // page_size) for p in prefix_lens]
    num_pages = sum(pages_per) + 3
    perm = torch.randperm(num_pages, generator=gen).tolist()
    k_cache = torch.randn(num_pages, page_size, hkv, d, generator=gen)
    v_cache = torch.randn(num_pages, page_size, hkv, d, generator=gen)
    bt = torch.zeros(b, max(1, max(pages_per)), dtype=torch.int32)
    k_ctx, v_ctx, parents, i = [], [], [], 0
    for r, p in enumerate(prefix_lens):
        pg = perm[i:i + pages_per[r]]
        i += pages_per[r]
        bt[r, :len(pg)] = torch.tensor(pg, dtype=torch.int32)
        k_ctx.append(k_cache[pg].reshape(-1, hkv, d)[:p])
        v_ctx.append(v_cache[pg].reshape(-1, hkv, d)[:p])
        parents.append(random_parents(tree_sizes[r], chain, rng))
    nq = sum(tree_sizes)
    q = torch.randn(nq, hq, d, generator=gen)
    k_new = torch.randn(nq, hkv, d, generator=gen)
    v_new = torch.randn(nq, hkv, d, generator=gen)
    sels = []
    for r, par in enumerate(parents):
        dep = []
        pool = None
        for u, pu in enumerate(par):
            dep.append(0 if pu < 0 else dep[pu] + 1)
            s = random_sel(prefix_lens[r] + dep[u], hkv, params, rng, pool)
            pool = s[0][s[0] >= 0].tolist() if rng.random() < 0.7 else None
            sels.append(s)
    sel = torch.stack(sels)
    o_cmp = torch.randn(nq, hq, d, generator=gen) if gated else None
    gates = torch.rand(nq, hq, 3, generator=gen) if gated else None
    cast = lambda x: None if x is None else x.to(dtype).to(DEV)
    return dict(q=cast(q), k_new=cast(k_new), v_new=cast(v_new), k_cache=cast(k_cache),
                v_cache=cast(v_cache), block_table=bt.to(DEV), sel=sel.to(DEV),
                o_cmp=cast(o_cmp), gates=cast(gates), parents=parents, prefix_lens=list(prefix_lens),
                k_ctx=k_ctx, v_ctx=v_ctx, sizes=list(tree_sizes))


def reference(case, params, scale):
    """fp32 per-query reference of the whole batch (naive_fused_tree per request)."""
    outs, off = [], 0
    for r, par in enumerate(case["parents"]):
        t = len(par)
        sl = slice(off, off + t)
        f = lambda x: None if x is None else x[sl].float().cpu()
        outs.append(naive_fused_tree(f(case["q"]), case["k_ctx"][r].float(), case["v_ctx"][r].float(),
                                     f(case["k_new"]), f(case["v_new"]), par, case["sel"][sl].cpu(),
                                     params, scale, f(case["o_cmp"]), f(case["gates"])))
        off += t
    return torch.cat(outs)


@pytest.mark.parametrize("g,page_size,gated,splits,nbi", [
    pytest.param(4, 16, False, 1, 1, id="G4-ps16-union-S1"),
    pytest.param(1, 1, True, 3, 1, id="G1-ps1-gated-S3"),
    pytest.param(6, 16, True, 2, 1, id="G6-ps16-gated-S2"),
    pytest.param(4, 16, False, 2, 4, id="G4-ps16-union-S2-4blocks-per-iter"),
])
def test_fused_decode_matches_reference(g, page_size, gated, splits, nbi):
    params = NSAParams(**{**SMALL.__dict__, "gated": gated})
    hkv, d = 2, 16
    case = make_case([37, 5, 70], [1, 1, 1], g * hkv, hkv, d, page_size, params, seed=g)
    geo = decode_geometry(case["prefix_lens"], case["block_table"], params, splits)
    out = poisoned(3, g * hkv, d, device=DEV)
    fused_decode(VerifyArgs(case["q"], case["k_new"], case["v_new"], case["k_cache"], case["v_cache"],
                            geo, params, 0.25, sel=case["sel"], o_cmp=case["o_cmp"],
                            gates=case["gates"], out=out), blocks_per_iter=nbi)
    assert_close(out.cpu(), reference(case, params, 0.25), what="decode")


@pytest.mark.parametrize("gated", [False, True], ids=["union", "gated"])
def test_last_split_merges_and_resets_its_counters(gated):
    # the kernel's last split per (row, KV head) merges the partials in place: more splits
    # than key tiles (empty splits, lse -inf, must get weight 0), one workspace reused by two
    # launches on different inputs (as CUDA-graph replays and the layers of a step reuse it),
    # the counters zero after each launch
    params = NSAParams(**{**SMALL.__dict__, "gated": gated})
    hkv, g, d, splits = 2, 4, 16, 8
    ws = None
    for seed in (1, 2):
        case = make_case([37, 5, 70], [1, 1, 1], g * hkv, hkv, d, 16, params, seed=seed)
        geo = decode_geometry(case["prefix_lens"], case["block_table"], params, splits)
        if ws is None:
            ws = split_workspace(splits, 2 if gated else 1, 3, g * hkv, d, 3 * hkv, DEV)
            ws.done.fill_(0)
        out = poisoned(3, g * hkv, d, device=DEV)
        fused_decode(VerifyArgs(case["q"], case["k_new"], case["v_new"], case["k_cache"],
                                case["v_cache"], geo, params, 0.25, sel=case["sel"],
                                o_cmp=case["o_cmp"], gates=case["gates"], out=out, workspace=ws))
        assert_close(out.cpu(), reference(case, params, 0.25), what=f"decode, launch {seed}")
        assert int(ws.done.abs().sum()) == 0, ws.done
        # without a workspace: the device's shared counters, zero again after the launch
        out = poisoned(3, g * hkv, d, device=DEV)
        fused_decode(VerifyArgs(case["q"], case["k_new"], case["v_new"], case["k_cache"],
                                case["v_cache"], geo, params, 0.25, sel=case["sel"],
                                o_cmp=case["o_cmp"], gates=case["gates"], out=out))
        assert_close(out.cpu(), reference(case, params, 0.25), what=f"decode, shared {seed}")
        shared = split_counters(DEV, 3 * hkv)
        assert int(shared.abs().sum()) == 0, shared


def test_split_workspace_too_small_is_rejected():
    params = SMALL
    case = make_case([37, 5], [1, 1], 8, 2, 16, 16, params, seed=0)
    geo = decode_geometry(case["prefix_lens"], case["block_table"], params, 2)
    ws = split_workspace(2, 1, 2, 8, 16, 3, DEV)             # 4 (rows x KV heads) needed
    with pytest.raises(ValueError, match="split counters"):
        fused_decode(VerifyArgs(case["q"], case["k_new"], case["v_new"], case["k_cache"],
                                case["v_cache"], geo, params, 0.25, sel=case["sel"], workspace=ws))


def test_geometry_rejects_bad_trees():
    bt = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="parents"):
        build_geometry([[-1, 1]], [4], bt, [[0, 1]], 1, 8, 1)
    with pytest.raises(ValueError, match="1..64"):
        build_geometry([list(range(-1, 64))], [4], bt, [list(range(65))], 1, 8, 1)
