"""What the draft's attention does to acceptance on a real model (CPU, SmolLM2-135M).

The SGLang path gives the draft a sink + recent window instead of the whole context
(`SPECSA_DRAFT_ATTN`, sglang_plugin/draft_backend.py). This measures the cost in acceptance:
the draft is the target's own weights, so the only difference between the draft and the target
is the attention the draft runs, and acceptance isolates it:

- `nsa`: the target's NSA (training-free defaults) — the ceiling;
- `dense`: full causal attention (NSA with a window larger than the context);
- `window=W`: a sink (block 0, 64 tokens) + the last W positions, exactly what the SGLang
  draft backend computes (NSA with one forced leading block, no local blocks, window W).

Greedy, chain drafts of 3 tokens (SGLang's default chain), after 3K-token prompts of real prose
and real code; SpecSA's tokens must equal AR NSA's in every run (the target verifies).

    .venv/bin/python benchmark/draft_window_cpu.py --model models/smollm2-135m \
        --out benchmark/results/cpu/draft_window.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from specsa.config import CacheConfig, SamplingConfig
from specsa.model import load_model, load_tokenizer
from specsa.runtime.drafters.build import build_drafter
from specsa.runtime.generate import generate
from specsa.runtime.loop import speculative_generate
from specsa.draft_tree import TreeSpec

REPO = Path(__file__).resolve().parents[1]
PROMPTS = {"prose": REPO / "data" / "text" / "pydoc_reference_datamodel.txt",
           "code": Path(torch.__file__).parent / "nn" / "modules" / "module.py"}


def draft_modes(windows: list[int]) -> dict[str, str | None]:
    modes = {"nsa": None, "dense": "window=1048576,topn=1,local=0"}
    for w in windows:
        # one forced leading block of 64 tokens (the sink) + the window: union combine
        modes[f"window={w}"] = f"window={w},topn=1,init=1,local=0,select=64"
    return modes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "smollm2-135m"))
    ap.add_argument("--prompt-tokens", type=int, default=3072)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--windows", default="512,1024")
    ap.add_argument("--out", default=str(REPO / "benchmark" / "results" / "cpu" / "draft_window.json"))
    a = ap.parse_args()
    if not Path(a.model).is_dir():
        raise SystemExit(f"{a.model}: no such model folder (make smollm2)")
    torch.set_num_threads(2)
    model = load_model(a.model)
    tok = load_tokenizer(a.model)
    tree = TreeSpec.chain(a.gamma)
    s = SamplingConfig(max_new_tokens=a.max_new_tokens)
    modes = draft_modes([int(w) for w in a.windows.split(",")])
    rows = []
    for kind, path in PROMPTS.items():
        ids = tok.encode(path.read_text(errors="replace"), add_special_tokens=False)
        ids = ids[:a.prompt_tokens]
        total = len(ids) + a.max_new_tokens + a.gamma + 2
        cache = CacheConfig(page_size=16, num_pages=-(-total // 16) + 1)
        ar = generate(model, [ids], s, page_size=16)[0][0].tokens
        for name, nsa in modes.items():
            drafter = build_drafter(f"model:{a.model}", model, tree, s, cache, nsa_overrides=nsa)
            t0 = time.perf_counter()
            res, st = speculative_generate(model, [ids], drafter, s, cache=model.new_cache(cache))
            row = {"prompt": kind, "prompt_file": str(path.relative_to(path.parents[2])),
                   "prompt_tokens": len(ids), "draft_attention": name, "draft_nsa": nsa,
                   "mean_accept_len": round(st.mean_accept_len, 3),
                   "accept_histogram": st.accept_histogram, "steps": st.to_dict().get("steps"),
                   "tokens_equal_ar": res[0].tokens == ar,
                   "wall_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    res = {"command": " ".join([sys.executable] + sys.argv), "commit": commit,
           "machine": platform.machine(), "threads": torch.get_num_threads(),
           "model": a.model, "target_nsa": model.nsa.to_dict(), "chain": a.gamma,
           "new_tokens": a.max_new_tokens, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0 if all(r["tokens_equal_ar"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
