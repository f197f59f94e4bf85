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
import shutil
import tempfile
from pathlib import Path

import launch_record
import pytest
import torch

launch_record.maybe_install()   # SPECSA_RECORD_LAUNCHES=<file>: every launch's compile signature

# The sm_90 compile check (test/kernels/test_compiled_launches.py) compiles every launch of the
# kernel tests. When this session runs all of them under the interpreter, it records their
# launches as they run (the check then compiles those) instead of running them a second time in
# a subprocess: that rerun cost a quarter of the CI suite.
TEST_DIR = Path(__file__).resolve().parent
RECORDED_DIRS = ("kernels",)
RECORDED_FILES = ("specsa/test_step_metadata_kernel.py",)   # compares against device_metadata
COMPILE_CHECK = "kernels/test_compiled_launches.py"
NOT_RECORDED = ("kernels/test_sm90_compile.py", COMPILE_CHECK)
SESSION_LAUNCHES = {"path": None, "complete": True}
if os.environ.get("TRITON_INTERPRET") == "1" and not os.environ.get("SPECSA_RECORD_LAUNCHES"):
    SESSION_LAUNCHES["path"] = Path(tempfile.mkdtemp(prefix="specsa_launches_")) / "launches.jsonl"
    launch_record.install(str(SESSION_LAUNCHES["path"]), gated=True)
    launch_record.recording["on"] = False


def _rel(item) -> str:
    """The test's file relative to test/ ("" for one outside it)."""
    try:
        return item.path.resolve().relative_to(TEST_DIR).as_posix()
    except ValueError:
        return ""


def recorded_test(item) -> bool:
    """Whether the sm_90 compile check covers this test's launches (the kernel tests, not slow)."""
    rel = _rel(item)
    if not rel or rel in NOT_RECORDED or item.get_closest_marker("slow"):
        return False
    return rel in RECORDED_FILES or rel.split("/")[0] in RECORDED_DIRS


def pytest_deselected(items):
    # a filtered run (-k, -m) records only part of the kernel tests: the check reruns them
    if any(recorded_test(i) for i in items):
        SESSION_LAUNCHES["complete"] = False


def _xdist_groups(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`) a file's tests stay on one
    worker (its module- and class-scoped servers start once) and every test whose launches the
    compile check covers shares one worker with it (its records are that worker's)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = "kernel-launches" if recorded_test(item) or _rel(item) == COMPILE_CHECK \
            else (_rel(item) or str(item.path))
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(hookwrapper=True)
def pytest_collection_modifyitems(session, config, items):
    _xdist_groups(config, items)        # before xdist's own hook reads the groups
    yield                               # deselection (-k, -m) happens in here
    # the compile check goes last, after the tests whose launches it compiles
    items.sort(key=lambda i: _rel(i) == COMPILE_CHECK)          # stable: the rest keep order
    if config.getoption("lf", False):          # only the last failures run
        SESSION_LAUNCHES["complete"] = False
    covered = {_rel(i) for i in items if recorded_test(i)}
    expected = {p.relative_to(TEST_DIR).as_posix() for d in RECORDED_DIRS
                for p in (TEST_DIR / d).glob("test_*.py")} | set(RECORDED_FILES)
    if not expected - set(NOT_RECORDED) <= covered:
        SESSION_LAUNCHES["complete"] = False     # only some files were collected


def pytest_unconfigure(config):
    if SESSION_LAUNCHES["path"] is not None:
        shutil.rmtree(SESSION_LAUNCHES["path"].parent, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    launch_record.recording["on"] = recorded_test(item)
    try:
        yield
    finally:
        launch_record.recording["on"] = False

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
