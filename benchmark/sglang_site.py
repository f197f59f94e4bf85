"""Running SGLang with SpecSA from a source checkout on the GPU machine (no pip install there).

`stage_package()` copies python/specsa + kernels/ (as specsa.kernels) with a dist-info that
declares SGLang's entry points into a temporary site folder and puts it on PYTHONPATH (after
the SGLang bundle, whose transformers 5.12.1 must win); `stage_package(other_checkout,
on_path=False)` stages another commit for an A/B server in the same run. `write_model()` writes a config-only
model folder (weights come from `--load-format dummy`) for the real shapes in SHAPES.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "python" / "specsa" / "assets" / "tinytok"

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
          "max_position_embeddings": 262144, "torch_dtype": "bfloat16", "bos_token_id": 0,
          "eos_token_id": 1, "tie_word_embeddings": False, "hidden_act": "silu"}
_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6,
          "max_position_embeddings": 262144, "torch_dtype": "bfloat16", "bos_token_id": 0,
          "eos_token_id": 1, "tie_word_embeddings": False, "hidden_act": "silu"}

# target shapes and their draft shapes: "2l" = the target's width with 2 layers (with dummy
# weights SGLang seeds every parameter by its size, so this draft's embeddings, layers and head
# equal the target's: the acceptance ceiling of a cheap draft); "1b" = a 1B-class model of the
# same family and vocabulary (its cost, with whatever acceptance dummy weights give)
SHAPES = {
    "llama8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    vocab_size=128256, rope_theta=500000.0),
    "qwen2-7b": dict(_QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                     vocab_size=152064, rope_theta=1000000.0),
}
DRAFT_1B = {
    "llama8b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    vocab_size=128256, rope_theta=500000.0),
    "qwen2-7b": dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                     vocab_size=152064, rope_theta=1000000.0),
}


def draft_config(target: str, draft: str) -> dict:
    if draft == "2l":
        return dict(SHAPES[target], num_hidden_layers=2)
    if draft == "1b":
        return dict(DRAFT_1B[target])
    raise ValueError(f"unknown draft shape {draft!r} (choose 2l or 1b)")


def write_model(name: str, config: dict, root: Path | None = None) -> str:
    d = Path(root or tempfile.gettempdir()) / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=1))
    for f in TOKENIZER.iterdir():
        if f.is_file():
            shutil.copy(f, d)
    return str(d)


def stage_package(repo: Path = REPO, on_path: bool = True) -> Path:
    """specsa + specsa.kernels + a dist-info with the sglang entry points, in one folder.

    repo: the checkout to stage (another one serves an A/B run: the e2e's `PACKAGE=` variant
    key); on_path: also put it on this process's sys.path and PYTHONPATH."""
    repo = Path(repo)
    for part in ("python/specsa", "kernels"):
        if not (repo / part).is_dir():
            raise FileNotFoundError(f"stage_package: {repo} has no {part}/ (not a SpecSA checkout)")
    site = Path(tempfile.mkdtemp(prefix="specsa_site_"))
    shutil.copytree(repo / "python" / "specsa", site / "specsa")
    shutil.copytree(repo / "kernels", site / "specsa" / "kernels")
    dist = site / "specsa-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: specsa\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[sglang.srt.plugins]\nspecsa = specsa.sglang_plugin:register\n\n"
        "[sglang.srt.platforms]\nspecsa_cpu = specsa.sglang_plugin.cpu_platform:activate\n")
    if on_path:
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.environ.get("PYTHONPATH", ""), str(site)) if p)
    return site


def checkout_commit(repo: Path) -> str:
    """The commit of a checkout or of a `git archive` snapshot (its COMMIT file)."""
    repo = Path(repo)
    if (repo / "COMMIT").is_file():
        return (repo / "COMMIT").read_text().strip()
    import subprocess
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def gpu_name() -> tuple[str, str]:
    """(full device name, short folder name such as 'h200' / 'h100')."""
    try:
        import torch
        full = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no GPU: the caller decides what that means
        return "none", "cpu"
    low = full.lower()
    short = next((s for s in ("h200", "h100", "a100", "b200") if s in low), "gpu")
    return full, short
