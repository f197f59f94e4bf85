"""Long-context correctness at scale: greedy NSA autoregressive decoding inside SGLang equals the
standalone runtime on a model with a real attention shape, across a prefill that spans many
chunks and compression blocks (default NSA geometry l=32, d=16, l'=64, n=16, w=512).

    python benchmark/long_context_parity.py --out benchmark/results/cpu      # CPU harness, fp32
    python benchmark/long_context_parity.py --smoke --out /tmp/p             # seconds

The model: Llama-3.1-8B attention geometry (32 query heads, 8 KV heads, head_dim 128, hidden
4096) with random fp32 weights, --layers layers and a small MLP / vocabulary so it runs on a
CPU; written as an HF folder both sides load. SGLang serves it on the CPU platform
(SGLANG_PLATFORM=specsa_cpu, `--attention-backend specsa`, chunked prefill of --chunk tokens,
page size 16); the runtime (`specsa.runtime.generate`, chunk 256) is the reference. Prompts: one
of --context tokens, then one sharing most of it (a radix-cache hit whose new tail is prefilled
in chunks again). Writes long_context_parity.json (command, commit, machine, per prompt: tokens
equal?, first difference).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path



def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return os.environ.get("SPECSA_COMMIT", "unknown")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=1024, help="SGLang --chunked-prefill-size")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="small shapes, seconds")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    from specsa.config import NSAConfig, SamplingConfig
    from specsa.model.load import load_model
    from specsa.model.tiny import build_tiny
    from specsa.runtime.generate import generate
    from specsa.sglang_plugin.harness import free_port, launch_server

    if a.smoke:
        shape = dict(hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32)
        nsa = NSAConfig(block=8, stride=4, select=16, topn=4, window=32)
        a.context, a.chunk, a.new_tokens = min(a.context, 600), min(a.chunk, 128), 8
    else:
        shape = dict(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128)
        nsa = NSAConfig()
    model_dir = build_tiny(Path("/tmp") / "specsa_parity_model", kind="llama", seed=11, num_layers=a.layers,
                           intermediate_size=1024, max_position_embeddings=a.context * 2,
                           nsa=nsa, **shape)
    rng = random.Random(5)
    long = [rng.randrange(2, 512) for _ in range(a.context)]
    shared = long[: a.context * 3 // 4] + [rng.randrange(2, 512) for _ in range(a.context // 5)]
    prompts = [long, shared]

    t0 = time.time()
    model = load_model(str(model_dir))
    res, _ = generate(model, prompts, SamplingConfig(max_new_tokens=a.new_tokens), chunk_size=256)
    ref = [r.tokens for r in res]
    t_ref = time.time() - t0
    del model

    args = ["--attention-backend", "specsa", "--page-size", "16", "--chunked-prefill-size",
            str(a.chunk), "--max-total-tokens", str(4 * a.context), "--context-length",
            str(2 * a.context)]
    t0 = time.time()
    got, cached = [], []
    with launch_server(str(model_dir), free_port(), args, cpu=True, timeout=1800,
                       log_path=out / "long_context_parity_server.log") as srv:
        for p in prompts:
            o = srv.generate(input_ids=p, max_new_tokens=a.new_tokens)
            got.append(o["output_ids"])
            cached.append(o["meta_info"].get("cached_tokens"))
    t_srv = time.time() - t0
    rows = []
    for i, (x, y) in enumerate(zip(ref, got)):
        diff = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), None)
        rows.append({"prompt": i, "prompt_tokens": len(prompts[i]), "cached_tokens": cached[i],
                     "equal": x == y, "first_difference": diff, "runtime": x, "sglang": y})
    res = {"command": " ".join(sys.argv), "commit": _commit(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "model": {"layers": a.layers, **shape,
                                             "nsa": nsa.to_dict(), "dtype": "float32"},
           "sglang_chunked_prefill": a.chunk, "runtime_chunk": 256,
           "runtime_s": round(t_ref, 1), "sglang_s": round(t_srv, 1), "rows": rows,
           "all_equal": all(r["equal"] for r in rows)}
    name = "long_context_parity_smoke.json" if a.smoke else "long_context_parity.json"
    (out / name).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))
    print([(r["prompt_tokens"], r["cached_tokens"], r["equal"]) for r in rows])
    if not res["all_equal"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
