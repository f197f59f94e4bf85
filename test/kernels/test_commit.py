"""Fused commit (kernels/commit/fused.py) vs naive_commit: bit-identical caches, and the committed
compressed tokens equal compression of the committed sequence (the reuse is exact)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' @triton.jit

import pytest  # noqa: E402
from conftest import assert_close, on_device  # noqa: E402
from test_compress_kernel import DEFAULT, SMALL, make_pool  # noqa: E402

from specsa.kernels.commit import fused_commit, naive_commit, naive_read_cmp, naive_read_kv  # noqa: E402
from specsa.kernels.compression import compress  # noqa: E402
from specsa.kernels.nsa.masked import build_tree_visibility, provisional_cmp  # noqa: E402
from specsa.kernels.common.tree import tree_path  # noqa: E402

# compiled kernels take device tensors; these tests build CPU ones (conftest.on_device)
fused_commit = on_device(fused_commit)


def _same(a, b):
    return torch.equal(torch.nan_to_num(a.float(), nan=12345.0), torch.nan_to_num(b.float(), nan=12345.0))


@pytest.mark.parametrize("params,ps,hkv,dim,dtype,P,trees,leaves", [
    pytest.param(SMALL, 16, 2, 64, torch.float32, [29, 61, 8], [[-1, 0, 0, 1, 3, 2], [-1, 0, 1, 2, 3], [-1]],
                 [4, 3, 0], id="small-ps16-fp32"),
    pytest.param(SMALL, 1, 1, 128, torch.bfloat16, [30, 5], [[-1, 0, 1, 1, 2, 4, 5], [-1, 0]], [6, 0],
                 id="small-ps1-bf16"),
    pytest.param(DEFAULT, 64, 2, 64, torch.float16, [1085], [[-1, 0, 1, 2, 2, 3, 4, 5]], [6],
                 id="default-ps64-fp16"),
])
def test_fused_commit(params, ps, hkv, dim, dtype, P, trees, leaves):
    nb = len(P)
    pool = make_pool(P, ps, hkv, dim, dtype, params, extra=max(len(t) for t in trees))
    tails_k, tails_v, pk, pv, pcidx = [], [], [], [], []
    path_rows, path_cmp = [], []
    row0 = prow0 = 0
    for b in range(nb):
        parents = torch.tensor(trees[b])
        nt = len(trees[b])
        k_tree = torch.randn(nt, hkv, dim).to(dtype).float()
        v_tree = torch.randn(nt, hkv, dim).to(dtype).float()
        vis = build_tree_visibility(P[b], parents, params)
        pk.append(provisional_cmp(pool["k"][b], k_tree, parents, params))
        pv.append(provisional_cmp(pool["v"][b], v_tree, parents, params))
        pcidx.append(vis.cmp_idx)
        path = tree_path(leaves[b], trees[b])
        path_rows.append([row0 + u for u in path])
        nodes = vis.cmp_nodes.tolist()
        path_cmp.append([prow0 + r for r, v in enumerate(nodes) if v in path])
        # the committed sequence after acceptance, for the semantic check below
        pool["k"][b] = torch.cat([pool["k"][b], k_tree[path]])
        pool["v"][b] = torch.cat([pool["v"][b], v_tree[path]])
        tails_k.append(k_tree)
        tails_v.append(v_tree)
        row0 += nt
        prow0 += len(nodes)
    a = max(len(r) for r in path_rows) + 1          # spare column: padding must be ignored
    c = max([len(r) for r in path_cmp] + [0]) + 1
    pad = lambda rows, w: torch.tensor([r + [-1] * (w - len(r)) for r in rows], dtype=torch.int32)  # noqa: E731
    args = dict(block_table=pool["block_table"], seq_lens=torch.tensor(P, dtype=torch.int32),
                k_tail=torch.cat(tails_k).to(dtype), v_tail=torch.cat(tails_v).to(dtype),
                path_rows=pad(path_rows, a), prov_k=torch.cat(pk).to(dtype).contiguous(),
                prov_v=torch.cat(pv).to(dtype).contiguous(), prov_cidx=torch.cat(pcidx).to(torch.int32),
                path_cmp=pad(path_cmp, c), params=params)
    caches = [pool[n] for n in ("k_cache", "v_cache", "ck_cache", "cv_cache")]
    ref = [x.clone() for x in caches]
    fused_commit(*caches, **args)
    naive_commit(*ref, **args)
    for name, x, y in zip(("k", "v", "ck", "cv"), caches, ref):
        assert _same(x, y), f"{name} cache differs from naive_commit"
    for b in range(nb):
        n = pool["k"][b].shape[0]
        assert_close(naive_read_kv(pool["k_cache"], pool["block_table"][b], n), pool["k"][b], dtype, "kv")
        nc = params.num_cmp(n)
        got = naive_read_cmp(pool["ck_cache"], pool["block_table"][b], nc, ps, params)
        if nc:
            assert_close(got, compress(pool["k"][b], params), dtype, f"committed compressed tokens req {b}")
