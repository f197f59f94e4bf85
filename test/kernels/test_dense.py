"""Dense paged tree verification kernel vs its fp32 reference (TRITON_INTERPRET=1)."""
from __future__ import annotations




import pytest
import torch

from conftest import assert_close, poisoned
from test_fused import DEV, SMALL, make_case

from specsa.kernels.dense import dense_tree_verify, naive_dense_tree
from specsa.kernels.fused import build_geometry


@pytest.mark.parametrize("g,page_size,C,splits", [
    pytest.param(4, 16, 4, 2, id="G4-ps16-C4-S2"),
    pytest.param(6, 1, 1, 1, id="G6-ps1-C1-S1"),
    pytest.param(1, 16, 7, 3, id="G1-ps16-C7-S3"),
])
def test_dense_tree_verify_matches_reference(g, page_size, C, splits):
    hkv, d, scale = 2, 16, 0.3
    case = make_case([33, 70], [7, 3], g * hkv, hkv, d, page_size, SMALL, seed=g + C)
    geo = build_geometry(case["parents"], case["prefix_lens"], case["block_table"],
                         [list(range(7)), [2, 0, 1]], C, SMALL.window, splits)
    out = poisoned(10, g * hkv, d, device=DEV)
    dense_tree_verify(case["q"], case["k_new"], case["v_new"], case["k_cache"], case["v_cache"],
                      geo, scale, out=out)
    refs, off = [], 0
    for r, par in enumerate(case["parents"]):
        sl = slice(off, off + len(par))
        o, _ = naive_dense_tree(case["q"][sl].cpu(), case["k_ctx"][r], case["v_ctx"][r],
                                case["k_new"][sl].cpu(), case["v_new"][sl].cpu(), par, scale)
        refs.append(o)
        off += len(par)
    assert_close(out.cpu(), torch.cat(refs), what="dense tree verify")
