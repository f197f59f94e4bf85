"""INDEPENDENT / EXACT_MERGED / SHARED_INDEX verification schedules and the on-device union
(TRITON_INTERPRET=1): each vs the fp32 references, EXACT_MERGED == INDEPENDENT."""
from __future__ import annotations


import random


import pytest
import torch

from conftest import assert_close, poisoned
from test_fused import DEV, SMALL, make_case, reference

from specsa.kernels.common.index import merge_group_selections
from specsa.kernels.common.params import NSAParams
from specsa.kernels.fused import VerifyArgs, build_geometry
from specsa.kernels.nsa.naive import naive_nsa_tree
from specsa.kernels.schedules import exact_merged_verify, independent_verify, shared_index_verify


def _orders(parents, kind):
    out = []
    for par in parents:
        if kind == "bfs":
            dep = []
            for u, p in enumerate(par):
                dep.append(0 if p < 0 else dep[p] + 1)
            out.append(sorted(range(len(par)), key=lambda u: (dep[u], u)))
        elif kind == "rev":
            out.append(list(range(len(par)))[::-1])
        else:
            out.append(list(range(len(par))))
    return out


def _run(fn, case, geo, params, scale, **knobs):
    nq, hq, d = case["q"].shape
    out = poisoned(nq, hq, d, dtype=case["q"].dtype, device=DEV)
    fn(VerifyArgs(case["q"], case["k_new"], case["v_new"], case["k_cache"], case["v_cache"], geo,
                  params, scale, sel=case["sel"], o_cmp=case["o_cmp"], gates=case["gates"], out=out),
       **knobs)
    return out


CASES = [
    pytest.param(1, 1, False, False, 4, 1, "bfs", id="G1-ps1-union-tree-C4"),
    pytest.param(4, 16, False, True, 3, 2, "dfs", id="G4-ps16-union-chain-C3-S2"),
    pytest.param(6, 16, True, False, 5, 3, "bfs", id="G6-ps16-gated-tree-C5-S3"),
    pytest.param(4, 1, True, False, 2, 1, "rev", id="G4-ps1-gated-tree-C2"),
]


@pytest.mark.parametrize("g,page_size,gated,chain,C,splits,order", CASES)
def test_schedules_match_reference(g, page_size, gated, chain, C, splits, order):
    params = NSAParams(**{**SMALL.__dict__, "gated": gated})
    hkv, d, scale = 2, 16, 0.3
    case = make_case([45, 19], [7, 5], g * hkv, hkv, d, page_size, params, chain=chain, seed=C + g)
    ref = reference(case, params, scale)
    ords = _orders(case["parents"], order)
    geo1 = build_geometry(case["parents"], case["prefix_lens"], case["block_table"], ords, 1,
                          params.window, splits)
    out_ind = _run(independent_verify, case, geo1, params, scale)
    assert_close(out_ind.cpu(), ref, what="independent")
    geoc = build_geometry(case["parents"], case["prefix_lens"], case["block_table"], ords, C,
                          params.window, splits)
    out_ex = _run(exact_merged_verify, case, geoc, params, scale, blocks_per_iter=2 if splits > 1 else 1)
    assert_close(out_ex.cpu(), ref, what="exact_merged")
    assert_close(out_ex.cpu(), out_ind.cpu(), what="exact_merged vs independent")


def test_shared_index_uses_the_representatives_blocks():
    params = SMALL
    hkv, d, scale, C = 2, 16, 0.3, 3
    case = make_case([50], [6], 4 * hkv, hkv, d, 16, params, seed=11)
    ords = [list(range(6))]
    geo = build_geometry(case["parents"], case["prefix_lens"], case["block_table"], ords, C,
                         params.window, 2, shared=True)
    out = _run(shared_index_verify, case, geo, params, scale)
    src = geo.sel_src.cpu().long()
    order = geo.order.cpu().long()
    rep_sel = case["sel"].clone()
    rep_sel[order] = case["sel"][src]
    ref = reference({**case, "sel": rep_sel}, params, scale)
    assert_close(out.cpu(), ref, what="shared_index")


def test_union_index_merges_sorted_lists_with_ownership():
    rng = random.Random(3)
    nq, hkv, topn, C = 7, 3, 5, 3
    sel = torch.full((nq, hkv, topn), -1, dtype=torch.int32)
    for i in range(nq):
        for h in range(hkv):
            k = rng.randint(1, topn)
            sel[i, h, :k] = torch.tensor(sorted(rng.sample(range(12), k)), dtype=torch.int32)
    order = [4, 0, 6, 1, 2, 5, 3]
    g_start = torch.tensor([0, 3, 6], dtype=torch.int32)
    g_len = torch.tensor([3, 3, 1], dtype=torch.int32)
    idx, own, cnt = merge_group_selections(sel.to(DEV), torch.tensor(order, dtype=torch.int32, device=DEV),
                                           g_start.to(DEV), g_len.to(DEV), C)
    idx, own, cnt = idx.cpu(), own.cpu(), cnt.cpu()
    for g in range(3):
        members = order[int(g_start[g]):int(g_start[g]) + int(g_len[g])]
        for h in range(hkv):
            lists = [set(x for x in sel[q, h].tolist() if x >= 0) for q in members]
            union = sorted(set().union(*lists))
            n = int(cnt[g, h])
            assert idx[g, h, :n].tolist() == union
            for k, blk in enumerate(union):
                bits = sum(1 << c for c, s in enumerate(lists) if blk in s)
                assert int(own[g, h, k]) == bits


def test_union_matches_contract_reference_end_to_end():
    """Union mode, selections from the composed NSA reference itself (naive_nsa_tree)."""
    params = SMALL
    hkv, d, scale = 2, 16, 0.25
    case = make_case([40], [6], 4 * hkv, hkv, d, 16, params, seed=5)
    par = case["parents"][0]
    o_ref, sel_ref = naive_nsa_tree(case["q"].cpu(), case["k_ctx"][0], case["v_ctx"][0],
                                    case["k_new"].cpu(), case["v_new"].cpu(),
                                    torch.tensor(par), params, scale)
    case["sel"] = sel_ref.to(torch.int32).to(DEV)
    geo = build_geometry(case["parents"], case["prefix_lens"], case["block_table"],
                         [list(range(6))], 3, params.window, 2)
    out = _run(exact_merged_verify, case, geo, params, scale)
    assert_close(out.cpu(), o_ref, what="exact_merged vs naive_nsa_tree")
