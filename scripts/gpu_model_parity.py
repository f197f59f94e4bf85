"""Issue 2 item 9: the same model code on CUDA gives the same greedy tokens as CPU float32.

    OUT=/tmp/out python scripts/gpu_model_parity.py

Builds tiny random checkpoints (training-free Llama G=4, native-NSA Qwen2 G=6), generates
greedily in the sparse NSA regime (small blocks, ~300-token prompts) on CPU fp32 and on
CUDA fp32 (and bf16, reported as token agreement), and writes $OUT/model_parity.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile

import torch

from specsa.config import SamplingConfig
from specsa.model import load_model
from specsa.model.tiny import build_tiny
from specsa.runtime.generate import generate


def run(model_dir, device, dtype, prompts, n):
    m = load_model(model_dir, device=device, dtype=dtype)
    res, stats = generate(m, prompts, SamplingConfig(max_new_tokens=n), page_size=16)
    return [r.tokens for r in res], stats.decode_tokens_per_s


def main() -> None:
    out = os.environ.get("OUT", tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (301, 257, 190)]
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": []}
    try:
        report["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"]).decode().strip()
    except Exception:
        report["commit"] = os.environ.get("SPECSA_COMMIT", "unknown")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in [("llama_union_G4", dict(kind="llama", native=False, num_heads=8, num_kv_heads=2, head_dim=16)),
                         ("qwen2_native_G6", dict(kind="qwen2", native=True, num_heads=6, num_kv_heads=1, head_dim=16))]:
            d = build_tiny(os.path.join(tmp, name), **kw)
            cpu, _ = run(d, "cpu", torch.float32, prompts, 24)
            gpu, tps = run(d, "cuda", torch.float32, prompts, 24)
            bf, _ = run(d, "cuda", torch.bfloat16, prompts, 24)
            agree = sum(a == b for x, y in zip(cpu, bf) for a, b in zip(x, y)) / sum(map(len, cpu))
            case = {"model": name, "fp32_cuda_equals_cpu": cpu == gpu, "bf16_token_agreement": agree,
                    "cuda_fp32_decode_tokens_per_s": tps}
            print(case, flush=True)
            report["cases"].append(case)
    with open(os.path.join(out, "model_parity.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
