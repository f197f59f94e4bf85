"""Kernels compile for Hopper (sm_90) on a machine without a GPU: Triton ships ptxas, so a
compiler failure that only shows on the H200 is caught here. Regression: compress_gather with an
int64 index tensor and 16-byte-aligned pointers failed in TritonGPURemoveLayoutConversions
(Triton 3.6); the launcher now passes int32 indices."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


# The two kernels of a verification step at the benchmark's shapes (Hq 32 / Hkv 8, D 128, bf16,
# page 16, default NSA): the grouped refresh (GPU default: reduce map, bitonic merge, 128 rows,
# 8 warps; one launch, and split with its in-kernel merge of the splits' lists) and the fused
# verify kernel with 2 selected blocks per iteration and its in-kernel split merge.
_COMPILE_STEP = r"""
import importlib, sys
which = sys.argv[1]
if which.startswith("refresh"):
    m = importlib.import_module("specsa.kernels.refresh.grouped")
    fn = m.score_topk_grouped_scores_kernel     # fused (one-launch) or split mode (+ its merge)
    split = which == "refresh-split"
    ptr = dict(q_req="*i32", q_pos="*i32", cmp_lens="*i32", order="*i32", g_start_p="*i32",
               g_len_p="*i32", block_table="*i32", prov_cidx="*i32", prov_vis="*i32", sel="*i32",
               lse="*fp32", m_part="*fp32", l_part="*fp32", cand="*i64",
               o_part="*fp32" if split else "*bf16", done="*i32", scale="fp32", stride_bt="i32",
               NQ="i32", NSPLIT="i32")
    const = dict(HQ=32, HKV=8, G=4, GP=4, CP=4 if split else 32, D=128, BD=128, L=32, DS=16,
                 LS=64, R=4, RP=4, K=2, PS=16, CPP=1, TOPN=16, BS=16, TB=64, INIT=1, LOCAL=2,
                 MP=4, MPP=4, NSP=16 if split else 1, HAS_PROV=True, WITH_OUT=split, F32=False,
                 MERGE=2, TS=64, FUSED=not split)
    if not split:
        const["NSPLIT"] = 1
    warps = 8
else:
    m = importlib.import_module("specsa.kernels.fused.verify")
    fn = m._nsa_verify_fwd_kernel
    ptr = {n: "*i32" for n in ("BT", "REQ_P", "REQ_OFF", "REQ_T", "QPOS", "ORDER", "SELSRC", "G_REQ",
                               "G_START", "G_LEN", "G_WINLO", "SEL", "UIDX", "UCNT")}
    ptr.update(QANC="*i64", UOWN="*i64", OPART="*fp32", LPART="*fp32", DONE="*i32", sm_scale="fp32",
               stride_bt="i32", NQ="i32", NSPLIT="i32")
    const = dict(HQ=32, HKV=8, G=4, D=128, BD=128, R=64, S=64, BS=64, BN=64, TP=16, W=512, TOPN=16,
                 CAP=256, PS=16, DIRECT=False, GATED=False, DENSE=False, FINAL=False, IEEE=False,
                 NBI=2)
    warps = 4
sys.path.insert(0, sys.argv[2])
from launch_record import compile_record
sig = {a: ("constexpr" if a in const else ptr.get(a, "*bf16")) for a in fn.arg_names}
err = compile_record({"module": m.__name__, "name": fn.__name__, "signature": sig,
                      "constexprs": const, "options": dict(num_warps=warps, num_stages=3)})
if err:
    print(err, file=sys.stderr)
    sys.exit(3 if "PassManager" in err or "out of resource" in err else 4)
"""


@pytest.mark.parametrize("which", ["refresh", "refresh-split", "verify"])
def test_step_kernels_compile_for_sm90(which):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_STEP, which,
                        str(Path(__file__).resolve().parents[1])], env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode == 4 and "ptxas" not in r.stderr and "CompilationError" not in r.stderr:
        pytest.skip(f"no sm_90 compiler toolchain in this environment: {r.stderr[-300:]}")
    assert r.returncode == 0, f"sm_90 compile of the {which} kernel failed:\n{r.stderr[-2000:]}"
