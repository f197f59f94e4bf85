"""The launch recorder's description of a kernel launch (what test_compiled_launches compiles)
and the test helper that moves nested arguments to the device."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from conftest import _to
from launch_record import describe

HERE = Path(__file__).resolve()


@triton.jit
def _k(x, y, n, scale, F32: tl.constexpr, BLOCK: tl.constexpr = 16):
    o = tl.arange(0, BLOCK)
    tl.store(y + o, tl.load(x + o, mask=o < n) * scale, mask=o < n)


def test_describe_types_every_argument():
    x = torch.zeros(4, dtype=torch.bfloat16)
    rec = describe(_k.fn if hasattr(_k, "fn") else _k, (x, x.float(), 4, 0.5),
                   {"F32": tl.constexpr(True), "num_warps": 2})
    assert rec["signature"] == {"x": "*bf16", "y": "*fp32", "n": "i32", "scale": "fp32",
                                "F32": "constexpr", "BLOCK": "constexpr"}
    assert rec["constexprs"] == {"F32": True, "BLOCK": 16}
    assert rec["options"] == {"num_warps": 2}
    assert rec["name"] == "_k"


class _Pair(NamedTuple):
    a: torch.Tensor
    b: int


@dataclasses.dataclass(frozen=True)
class _Args:
    t: torch.Tensor
    pair: _Pair
    opt: torch.Tensor | None = None


def test_to_reaches_tensors_inside_dataclasses_in_argument_lists():
    args = [_Args(torch.ones(2), _Pair(torch.zeros(3), 7)), 5]
    moved = _to(args, "meta")
    assert moved[0].t.is_meta and moved[0].pair.a.is_meta and moved[0].pair.b == 7
    assert moved[0].opt is None and moved[1] == 5
    assert not args[0].t.is_meta                      # the caller's objects are untouched


_BAD = """
import triton
import triton.language as tl


@triton.jit
def rebinds_in_runtime_if(x, n):
    _ = tl.arange(0, 4).to(tl.int64)
    if n > 0:
        _ = tl.arange(0, 16)         # another type inside a run-time `if`: the interpreter runs
    tl.store(x, 1.0)                 # it, the compiler rejects it
"""


def test_compile_record_reports_a_front_end_error(tmp_path):
    # compile_record needs @triton.jit to build a compiler function (no TRITON_INTERPRET when
    # the kernel's module is imported): a child process imports a fresh module
    (tmp_path / "bad_kernel.py").write_text(_BAD)
    rec = {"module": "bad_kernel", "name": "rebinds_in_runtime_if",
           "signature": {"x": "*fp32", "n": "i32"}, "constexprs": {}, "options": {}}
    code = ("import json, sys; sys.path[:0] = [%r, %r]; from launch_record import compile_record;"
            " print(json.dumps(compile_record(json.loads(sys.argv[1]), full=False)))"
            % (str(tmp_path), str(HERE.parents[1])))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(rec)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    err = json.loads(r.stdout.strip().splitlines()[-1])
    assert err is not None and "redefines" in err, err
    # and the same kernel without the re-binding compiles
    fixed = _BAD.replace("        _ = tl.arange(0, 16)", "        pass")
    (tmp_path / "bad_kernel.py").write_text(fixed)
    r = subprocess.run([sys.executable, "-c", code, json.dumps(rec)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert json.loads(r.stdout.strip().splitlines()[-1]) is None, r.stdout[-2000:]
