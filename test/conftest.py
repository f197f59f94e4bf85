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

import dataclasses
import random

import pytest
import torch

from launch_record import maybe_install

maybe_install()      # SPECSA_RECORD_LAUNCHES=<file>: every kernel launch's compile signature

# Where kernel tests put their tensors: the GPU when there is one (compiled kernels), else the
# CPU (interpreted kernels). References may run on either; comparisons move both to the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# Same strictness locally and in CI.
TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "") -> None:
    """NaN-aware closeness: max-abs short-circuit, else RMS-relative error ratio."""
    dtype = dtype or actual.dtype
    tol = TOL[dtype]
    a, e = actual.float().cpu(), expected.float().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: output has NaN (unwritten tile?)"
    diff = (a - e).abs().max().item()
    if diff <= tol:
        return
    rms_err = (a - e).pow(2).mean().sqrt().item()
    rms_ref = e.pow(2).mean().sqrt().item() + 1e-12
    assert rms_err / rms_ref <= tol, f"{what}: max abs {diff:.3e}, rms ratio {rms_err / rms_ref:.3e} > {tol}"


def poisoned(*shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """An output buffer filled with NaN, so an unwritten element fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def has_cuda() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _to(x, dev):
    """x with every tensor in it (also inside lists, tuples, dicts and dataclasses) on dev."""
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, (list, tuple)):
        ys = [_to(y, dev) for y in x]
        if all(a is b for a, b in zip(ys, x)):
            return x
        return type(x)(*ys) if hasattr(x, "_fields") else type(x)(ys)     # NamedTuple or not
    if isinstance(x, dict):
        return {k: _to(v, dev) for k, v in x.items()}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _to(getattr(x, f.name), dev)
                                        for f in dataclasses.fields(x) if f.init})
    return x


def _copy_back(src, moved):
    """In-place outputs: copy what the kernel wrote on the device into the caller's tensors."""
    if isinstance(src, torch.Tensor):
        back = moved.cpu()
        if moved.data_ptr() != src.data_ptr() and not torch.equal(back, src):
            src.copy_(back)
    elif isinstance(src, (list, tuple)) and isinstance(moved, (list, tuple)):
        for a, b in zip(src, moved):
            _copy_back(a, b)
    elif isinstance(src, dict):
        for k in src:
            _copy_back(src[k], moved[k])
    elif dataclasses.is_dataclass(src) and not isinstance(src, type):
        for f in dataclasses.fields(src):       # e.g. RefreshArgs.sel, VerifyArgs.out
            _copy_back(getattr(src, f.name), getattr(moved, f.name))


def on_device(fn):
    """Run a kernel launcher written for CPU-built test tensors on DEV: tensor arguments (also
    inside lists, dicts and dataclasses) go to DEV, every tensor argument is copied back
    afterwards (the kernels write outputs in place), tensor results come back to the CPU.
    On a CPU-only machine it returns fn itself (interpreted kernels take CPU tensors)."""
    if DEV == "cpu":
        return fn

    def run(*args, **kwargs):
        margs, mkw = _to(list(args), DEV), _to(dict(kwargs), DEV)
        res = fn(*margs, **mkw)
        _copy_back(list(args), margs)
        _copy_back(dict(kwargs), mkw)
        return _to(res, "cpu")

    run.__name__ = getattr(fn, "__name__", "kernel")
    return run


# draft trees as parent arrays, and SGLang's EAGLE links of them (device-metadata tests)
def random_tree(rng: random.Random, t: int) -> list[int]:
    return [-1] + [rng.randrange(u) for u in range(1, t)]


def links(parents: list[int]) -> tuple[list[int], list[int]]:
    """First-child / next-sibling links (children in index order), as SGLang builds them."""
    t = len(parents)
    first, sib, last = [-1] * t, [-1] * t, {}
    for u in range(1, t):
        p = parents[u]
        if first[p] < 0:
            first[p] = u
        else:
            sib[last[p]] = u
        last[p] = u
    return first, sib
