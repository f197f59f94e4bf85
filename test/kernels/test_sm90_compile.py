"""Kernels compile for Hopper (sm_90) on a machine without a GPU: Triton ships ptxas, so a
compiler failure that only shows on the H200 is caught here. Regression: compress_gather with an
int64 index tensor and 16-byte-aligned pointers failed in TritonGPURemoveLayoutConversions
(Triton 3.6); the launcher now passes int32 indices."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from specsa.kernels.common.params import NSAParams

# Compiled in a child process: the test session runs kernels in the interpreter
# (TRITON_INTERPRET=1 is fixed at import), which cannot produce GPU code.
_COMPILE = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from specsa.kernels.compression.blocks import compress_gather_kernel
names = ["k_cache","v_cache","k_tail","v_tail","idx","out_k","out_v","wk","bk","wv","bv"]
sig = {n: "*bf16" for n in names}
sig.update({"idx": sys.argv[1], "wk": "*fp32", "bk": "*fp32", "wv": "*fp32", "bv": "*fp32"})
learned = sys.argv[2] == "1"
const = {"HKV": 8, "D": 128, "BD": 128, "L": 32, "BL": 32, "LEARNED": learned, "HAS_BIAS": learned}
sig.update({k: "constexpr" for k in const})
attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(names))}
try:
    triton.compile(ASTSource(fn=compress_gather_kernel, signature=sig, constexprs=const,
                             attrs=attrs), target=GPUTarget("cuda", 90, 32))
except Exception as e:
    msg = str(e)
    sys.exit(3 if "PassManager" in msg else 4)
"""


@pytest.mark.parametrize("learned", [False, True], ids=["mean", "learned"])
def test_compress_gather_compiles_for_sm90_with_int32_indices(learned):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, "*i32", "1" if learned else "0"],
                       env=env, capture_output=True, text=True, timeout=300)
    if r.returncode == 4:
        pytest.skip("no sm_90 compiler toolchain in this environment")
    assert r.returncode == 0, f"sm_90 compile failed:\n{r.stderr[-2000:]}"


def test_compress_gather_launcher_converts_int64_indices():
    from conftest import on_device

    from specsa.kernels.compression import compress_gather

    compress_gather = on_device(compress_gather)

    p = NSAParams(block=4, stride=2, select=8, topn=2, window=8)
    kc = torch.randn(3, 4, 2, 16)
    vc = torch.randn_like(kc)
    kt = torch.randn(2, 2, 16)
    idx64 = torch.tensor([[0, 1, -1, -2], [4, 5, 6, -1]], dtype=torch.int64)
    a = compress_gather(kc, vc, kt, kt.clone(), idx64, p)
    b = compress_gather(kc, vc, kt, kt.clone(), idx64.to(torch.int32), p)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="int32 or int64"):
        compress_gather(kc, vc, kt, kt.clone(), idx64.to(torch.int16), p)
