"""CPU measurement of speculative NSA decoding on a real model and long real text.

For each drafter (default: self-draft and n-gram) it runs greedy speculative generation
after a long prompt and reports the mean accepted length (accepted drafts + bonus per
request-step), tokens per target forward, the acceptance histogram, whether the tokens equal
autoregressive NSA's, and, per layer, the fraction of selected blocks shared between
adjacent verifier queries (consecutive slots of the flattened tree) and between parent and
child (selection_overlap). Writes one JSON file.

    .venv/bin/python benchmark/spec_cpu.py --model models/smollm2-135m \
        --prompt-file /usr/share/common-licenses/GPL-3 --prompt-tokens 2048 \
        --max-new-tokens 48 --drafts self:8,ngram:3 --tree topk=2,depth=4,tokens=8 \
        --out benchmark/results/cpu/spec_smollm2.json

Conditions are recorded in the JSON (model, NSA config, prompt source and length, tree,
threads, torch version, commit when available). Timings are CPU wall clock on the
reference path and say nothing about GPU speed; acceptance and overlap are the point.
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

from specsa.config import CacheConfig, SamplingConfig, Traversal
from specsa.model import load_model, load_tokenizer
from specsa.runtime.drafters.build import build_drafter
from specsa.runtime.generate import generate
from specsa.runtime.loop import speculative_generate
from specsa.draft_tree import TreeSpec

from selection_overlap import SelectionRecorder, overlap_by_layer   # benchmark/, beside this script


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _conditions(a: argparse.Namespace, model, ids: list[int], tree: TreeSpec) -> dict:
    return {"model": a.model, "nsa": model.nsa.to_dict(), "prompt_file": a.prompt_file,
            "prompt_tokens": len(ids), "max_new_tokens": a.max_new_tokens, "tree": vars(tree),
            "traversal": a.traversal, "sampling": "greedy", "dtype": str(model.dtype),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "commit": _commit(), "command": " ".join([sys.executable] + sys.argv)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=2048,
                    help="use the first N tokens of the file")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--drafts", default="self:8,ngram:3")
    ap.add_argument("--tree", default="topk=2,depth=4,tokens=8",
                    help="tree shape for model drafters; n-gram uses the same shape")
    ap.add_argument("--traversal", default="dfs", choices=[t.value for t in Traversal])
    ap.add_argument("--nsa", default=None, help="NSA overrides key=value,...")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-ar", action="store_true", help="skip the AR reference run")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    model = load_model(a.model, nsa_overrides=a.nsa)
    tok = load_tokenizer(a.model)
    ids = tok.encode(Path(a.prompt_file).read_text(errors="replace"), add_special_tokens=False)
    if len(ids) < a.prompt_tokens:
        print(f"note: file has only {len(ids)} tokens", file=sys.stderr)
    ids = ids[:a.prompt_tokens]
    s = SamplingConfig(max_new_tokens=a.max_new_tokens)
    tree = TreeSpec.parse(a.tree)
    total = len(ids) + a.max_new_tokens + tree.tokens + 1
    cache_cfg = CacheConfig(page_size=a.page_size, num_pages=-(-total // a.page_size) + 1)
    report = {"conditions": _conditions(a, model, ids, tree), "runs": {}}
    ar_tokens = None
    if not a.no_ar:
        t0 = time.perf_counter()
        res, st = generate(model, [ids], s, page_size=a.page_size)
        ar_tokens = res[0].tokens
        report["ar"] = {"wall_s": time.perf_counter() - t0, **st.to_dict()}
        print(f"AR: {st.decode_tokens_per_s:.2f} tok/s decode", file=sys.stderr)
    for spec in [x.strip() for x in a.drafts.split(",") if x.strip()]:
        shape = tree
        drafter = build_drafter(spec, model, shape, s, cache_cfg, tokenizer=tok)
        if spec.startswith("oracle") and ar_tokens is not None:
            drafter.set_truth(0, ids + ar_tokens)   # rid 0: first request of a fresh cache
        t0 = time.perf_counter()
        with SelectionRecorder(model) as rec:
            res, st = speculative_generate(model, [ids], drafter, s,
                                           cache=model.new_cache(cache_cfg),
                                           traversal=Traversal(a.traversal))
        wall = time.perf_counter() - t0
        ov = overlap_by_layer(rec.records)
        run = {"wall_s": wall, **st.to_dict(), "overlap": ov,
               "tokens_equal_ar": None if ar_tokens is None else res[0].tokens == ar_tokens}
        report["runs"][spec] = run
        print(f"{spec}: mean_accept_len {st.mean_accept_len:.3f}, tokens/forward "
              f"{st.tokens_per_forward:.3f}, hist {st.accept_histogram}, adjacent overlap "
              f"{ov.get('adjacent', {}).get('shared_fraction_mean', float('nan')):.3f}, "
              f"equal AR {run['tokens_equal_ar']}", file=sys.stderr)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
