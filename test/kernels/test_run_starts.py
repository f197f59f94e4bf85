"""run_starts (kernels/common/runs.py) against the cummax formula it replaced, on random flag
sequences, and its bad input."""
from __future__ import annotations

import pytest
import torch

from specsa.kernels.common.runs import run_starts


def _cummax_reference(brk: torch.Tensor) -> torch.Tensor:
    i = torch.arange(brk.shape[0], dtype=torch.int64)
    return torch.cummax(torch.where(brk, i, 0), 0).values


@pytest.mark.parametrize("n,p", [(1, 0.5), (2, 0.0), (17, 0.3), (1000, 0.05), (4099, 0.9),
                                 (70001, 0.001)])
def test_run_starts_matches_cummax(n, p):
    g = torch.Generator().manual_seed(n)
    brk = torch.rand(n, generator=g) < p
    brk[0] = True
    got = run_starts(brk)
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert torch.equal(got, _cummax_reference(brk))


def test_run_starts_example_empty_and_bad_first_flag():
    assert run_starts(torch.tensor([True, False, False, True, False])).tolist() == [0, 0, 0, 3, 3]
    assert run_starts(torch.zeros(0, dtype=torch.bool)).numel() == 0
    with pytest.raises(ValueError, match="brk\\[0\\] must be True"):
        run_starts(torch.tensor([False, True]))
