"""Serving benchmark: SGLang's own `bench_serving` against two servers of one model, without
speculation (NSA autoregressive, `--attention-backend specsa`) and with `--speculative-algo
specsa`, one after the other; writes one JSON with both results.

    python benchmark/serving.py --model M [--draft D] [--cpu] --out benchmark/results/serving_cpu.json

Requests are greedy random token ids (`--dataset-name random-ids`, no dataset download) with
`ignore_eos`, so both servers generate the same number of tokens.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from specsa.sglang_plugin.harness import launch_server

METRICS = ("completed", "duration", "total_input_tokens", "total_output_tokens",
           "request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms",
           "median_itl_ms", "median_e2e_latency_ms", "accept_length")


def _bench_env() -> dict:
    """sglang.bench_serving imports every dataset module at start-up, and its MMMU module
    needs HF `datasets`, which the H200 bundle leaves out. The random-ids dataset used here
    never calls it, so a stub module that fails loudly if called is put on the path."""
    env = dict(os.environ)
    if importlib.util.find_spec("datasets") is None:
        stub = Path(tempfile.mkdtemp()) / "datasets"
        stub.mkdir()
        (stub / "__init__.py").write_text(
            "def load_dataset(*a, **k):\n"
            "    raise RuntimeError('HF datasets is not installed (stub from specsa benchmark)')\n")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(stub.parent)) if p)
    return env


def bench_serving(base_url: str, tokenizer: str, *, num_prompts: int, input_len: int,
                  output_len: int, concurrency: int, seed: int = 1) -> dict:
    """Run `python -m sglang.bench_serving` once; returns its result record (selected metrics)."""
    out = Path(tempfile.mkdtemp()) / "bench.jsonl"
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
           "--base-url", base_url, "--tokenizer", tokenizer, "--dataset-name", "random-ids",
           "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--random-range-ratio", "1.0", "--num-prompts", str(num_prompts),
           "--max-concurrency", str(concurrency), "--seed", str(seed), "--output-file", str(out),
           "--disable-tqdm", "--warmup-requests", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", env=_bench_env())
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"bench_serving failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                           f"{r.stderr[-3000:]}")
    rec = json.loads(out.read_text().strip().splitlines()[-1])
    return {k: rec.get(k) for k in METRICS}


def server_configs(draft: str | None, topk: int, steps: int, draft_tokens: int) -> dict:
    spec = ["--speculative-algo", "specsa", "--speculative-num-steps", str(steps),
            "--speculative-eagle-topk", str(topk)]
    if topk > 1:
        spec += ["--speculative-num-draft-tokens", str(draft_tokens)]
    if draft:
        spec += ["--speculative-draft-model-path", draft]
    return {"nsa_autoregressive": ["--attention-backend", "specsa"], "specsa": spec}


def run(model: str, *, draft: str | None, cpu: bool, port: int, extra: list[str],
        num_prompts: int, input_len: int, output_len: int, concurrency: int, topk: int,
        steps: int, draft_tokens: int, env: dict | None = None) -> dict:
    results = {}
    for name, args in server_configs(draft, topk, steps, draft_tokens).items():
        t0 = time.time()
        with launch_server(model, port, args + extra, cpu=cpu, env=env,
                           log_path=f"/tmp/specsa_bench_{name}.log") as srv:
            start_s = time.time() - t0
            res = bench_serving(srv.url, model, num_prompts=num_prompts, input_len=input_len,
                                output_len=output_len, concurrency=concurrency)
        results[name] = {"server_args": args + extra, "startup_s": round(start_s, 1), **res}
    base, spec = results["nsa_autoregressive"], results["specsa"]
    if base.get("output_throughput") and spec.get("output_throughput"):
        results["speedup_output_throughput"] = spec["output_throughput"] / base["output_throughput"]
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--draft", default=None, help="draft model (default: the target itself)")
    ap.add_argument("--cpu", action="store_true", help="CPU harness (SGLANG_PLATFORM=specsa_cpu)")
    ap.add_argument("--port", type=int, default=31500)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--draft-tokens", type=int, default=6)
    ap.add_argument("--out", required=True)
    ap.add_argument("extra", nargs="*", help="more launch_server arguments (after --)")
    a = ap.parse_args(argv)
    res = run(a.model, draft=a.draft, cpu=a.cpu, port=a.port, extra=a.extra,
              num_prompts=a.num_prompts, input_len=a.input_len, output_len=a.output_len,
              concurrency=a.concurrency, topk=a.topk, steps=a.steps, draft_tokens=a.draft_tokens)
    res["conditions"] = {"device": "cpu" if a.cpu else "cuda", "model": a.model,
                         "num_prompts": a.num_prompts, "input_len": a.input_len,
                         "output_len": a.output_len, "concurrency": a.concurrency,
                         "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
