"""Shared test fixtures: seeds, NaN poisoning, one tolerance table by dtype."""
from __future__ import annotations

import os

# Without a GPU, Triton kernels run in the interpreter; it is chosen when a kernel is
# decorated, so this must happen before any test module imports specsa.kernels.
try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest
import torch

# Same strictness locally and in CI.
TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "") -> None:
    """NaN-aware closeness: max-abs short-circuit, else RMS-relative error ratio."""
    dtype = dtype or actual.dtype
    tol = TOL[dtype]
    a, e = actual.float(), expected.float()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: output has NaN (unwritten tile?)"
    diff = (a - e).abs().max().item()
    if diff <= tol:
        return
    rms_err = (a - e).pow(2).mean().sqrt().item()
    rms_ref = e.pow(2).mean().sqrt().item() + 1e-12
    assert rms_err / rms_ref <= tol, f"{what}: max abs {diff:.3e}, rms ratio {rms_err / rms_ref:.3e} > {tol}"


def poisoned(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An output buffer filled with NaN, so an unwritten element fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def has_cuda() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
