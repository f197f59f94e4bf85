"""The prefill kernels (sparse free blocks, tile) compile for Hopper (sm_90) at the Llama-8B
shape (Hq 32, Hkv 8, D 128, bf16, page 16, default NSA) without a GPU, union and gated; the
report names registers / spills (ptxas -v) so a resource regression shows here first."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

_COMPILE = r"""
import importlib, os, subprocess, sys, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
which, gated, warps, rows = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
if which == "sparse":
    fn = importlib.import_module("specsa.kernels.prefill.sparse").prefill_sparse_kernel
    ptr = dict(block_table="*i32", q_pos="*i32", skey="*i32", sidx="*i64", item_start="*i32",
               part_lse="*fp32", qk_scale="fp32", stride_bt="i32", M="i32", MAXB="i32")
    const = dict(HQ=32, HKV=8, G=4, D=128, BD=128, LS=64, BT=64, NT=1, W=512, PS=16, NF=13,
                 CQ=rows // 4, R=rows, GATED=gated, F32=False)
else:
    fn = importlib.import_module("specsa.kernels.prefill.tile").prefill_tile_kernel
    ptr = dict(block_table="*i32", q_req="*i32", q_pos="*i32", g_start_p="*i32", g_len_p="*i32",
               sel="*i32", part_lse="*fp32", gates="*fp32", qk_scale="fp32", stride_bt="i32")
    const = dict(HQ=32, HKV=8, G=4, D=128, BD=128, R=rows, LS=64, W=512, PS=16, TOPN=16, INIT=1,
                 LOCAL=2, SLO=1, NF=13, BN=64, GATED=gated, HAS_PART=True, F32=False)
sig = {a: ("constexpr" if a in const else ptr.get(a, "*bf16")) for a in fn.arg_names}
attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
try:
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=2))
except Exception as e:
    print(repr(e)[-3000:], file=sys.stderr)
    sys.exit(3 if "PassManager" in str(e) or "out of resource" in str(e) or "CompilationError" in repr(e) else 4)
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
    f.write(k.asm["ptx"])
r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                   capture_output=True, text=True)
print(" ".join(l.strip() for l in r.stderr.splitlines() if "registers" in l or "spill" in l))
"""


@pytest.mark.parametrize("which,gated,warps,rows", [
    ("sparse", False, 4, 64), ("sparse", True, 4, 64), ("tile", False, 4, 64), ("tile", True, 8, 64),
])
def test_prefill_kernels_compile_for_sm90(which, gated, warps, rows):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, which, "1" if gated else "0", str(warps),
                        str(rows)], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 4 and "ptxas" not in r.stderr:
        pytest.skip(f"no sm_90 compiler toolchain in this environment: {r.stderr[-300:]}")
    assert r.returncode == 0, f"sm_90 compile of the {which} kernel failed:\n{r.stderr[-2000:]}"
    print(which, "gated" if gated else "union", r.stdout.strip())
