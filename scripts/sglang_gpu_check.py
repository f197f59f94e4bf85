"""H200 check of the SGLang integration (the lead runs it; < 8 minutes).

    PYTHONPATH=<unpacked sglang bundle> python3 scripts/sglang_gpu_check.py

1. stages `specsa` (python/specsa + kernels/ as specsa.kernels) with its SGLang entry points
   into a temporary site folder (no pip install needed on the machine);
2. builds a tiny random NSA Llama (head_dim 64, config.json nsa: block 8, stride 4, select 16,
   top-4, window 32, so 150-300-token prompts are sparse);
3. serves it in bf16 with CUDA graphs for decode / TARGET_VERIFY (the target's NSA on the
   Triton kernels; prefill graphs off): NSA autoregressive (`--attention-backend specsa`),
   then `--speculative-algo specsa` with a tree draft (self-drafting, steps 3, topk 2, 6 draft
   tokens; the draft on SGLang's Triton backend). Greedy outputs are compared over many prompts
   and reported as an agreement rate (bf16 near-ties can flip a token). Spec configurations are
   tried in order until one serves: default graphs, no draft graphs
   (SPECSA_DRAFT_GRAPHS=none), eager (--disable-cuda-graph); a failed one records its
   server-log traceback;
4. runs SGLang's bench_serving against the AR server and the spec server that served;
5. writes $OUT/sglang_gpu_check.json (and the server logs).
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmark"))
from sglang_site import stage_package  # noqa: E402  (stages specsa with its entry points)
OUT = Path(os.environ.get("OUT") or tempfile.mkdtemp())
NEW_TOKENS = 32
NUM_PROMPTS = 48


def compare(a, b, prompts) -> dict:
    outs = {"base": [None] * len(prompts), "spec": [None] * len(prompts)}
    accept = [None] * len(prompts)

    def worker(idx):
        for i in idx:
            outs["base"][i] = a.generate(input_ids=prompts[i], max_new_tokens=NEW_TOKENS)["output_ids"]
            r = b.generate(input_ids=prompts[i], max_new_tokens=NEW_TOKENS)
            outs["spec"][i] = r["output_ids"]
            accept[i] = r["meta_info"].get("spec_accept_length")
    threads = [threading.Thread(target=worker, args=(range(k, len(prompts), 8),)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(x is None for x in outs["spec"]) or any(x is None for x in outs["base"]):
        raise RuntimeError("some requests failed (server error or crash)")
    exact = sum(x == y for x, y in zip(outs["base"], outs["spec"]))
    prefix = []
    for x, y in zip(outs["base"], outs["spec"]):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(n / max(len(x), 1))
    acc = [x for x in accept if x is not None]
    return {"prompts": len(prompts), "exact_match": exact, "agreement_rate": exact / len(prompts),
            "mean_common_prefix_fraction": sum(prefix) / len(prefix),
            "mean_accept_length": sum(acc) / len(acc) if acc else None}


def _graph_state(log: Path) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    return {k: (f"Capture target {k} CUDA graph end" in text)
            for k in ("decode", "verify", "prefill")}


def _crash_tail(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [x for x in text.splitlines() if "Ignore import" not in x and "Assertion" not in x]
    i = next((k for k, x in enumerate(lines) if "Traceback" in x), max(0, len(lines) - 40))
    return "\n".join(lines[i:i + 60])[-4000:]


def serve(model, port, args, name, env=None):
    from specsa.sglang_plugin.harness import launch_server
    return launch_server(model, port, args, cpu=False, env=env, log_path=OUT / f"server_{name}.log",
                         timeout=420)


def main() -> None:
    t_start = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    stage_package()
    import torch
    from specsa.model.tiny import build_tiny

    model = str(build_tiny(Path(tempfile.mkdtemp()) / "tiny_nsa", kind="llama", seed=0,
                           hidden_size=256, intermediate_size=512, num_heads=4,
                           num_kv_heads=2, head_dim=64))
    rng = random.Random(7)
    prompts = [[rng.randrange(2, 512) for _ in range(rng.randrange(150, 300))]
               for _ in range(NUM_PROMPTS)]
    common = ["--dtype", "bfloat16", "--sampling-backend", "pytorch", "--grammar-backend", "none",
              "--mem-fraction-static", "0.3", "--max-running-requests", "16",
              "--cuda-graph-max-bs", "16", "--disable-prefill-cuda-graph"]
    spec_args = ["--speculative-algo", "specsa", "--speculative-num-steps", "3",
                 "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "6"]
    result = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__, "new_tokens": NEW_TOKENS}
    try:
        import sglang
        result["sglang"] = sglang.__version__
    except Exception as e:       # noqa: BLE001 - reported, not hidden
        result["sglang"] = f"import failed: {e}"
    bench_kw = {"num_prompts": 32, "input_len": 256, "output_len": 64, "concurrency": 8}
    result["bench_serving"] = {"conditions": bench_kw}
    sys.path.insert(0, str(REPO / "benchmark"))
    from serving import bench_serving

    def save():
        (OUT / "sglang_gpu_check.json").write_text(json.dumps(result, indent=1))

    def bench(name, srv):
        try:
            result["bench_serving"][name] = bench_serving(srv.url, model, **bench_kw)
        except Exception as e:   # noqa: BLE001 - record and continue
            result["bench_serving"][name] = {"error": str(e)[-1500:]}
        print(name, json.dumps(result["bench_serving"][name])[:300], flush=True)
        save()

    # spec configurations, tried in order until one serves the whole check; the later ones
    # only run when an earlier one failed (and say why)
    configs = [("specsa_tree_graphs", [], None),
               ("specsa_tree_graphs_no_draft_graphs", [], {"SPECSA_DRAFT_GRAPHS": "none"}),
               ("specsa_tree_eager_triton", ["--disable-cuda-graph"], None)]
    result["servers"] = {}
    t0 = time.time()
    with serve(model, 30100, ["--attention-backend", "specsa", *common], "nsa_ar_graphs") as base:
        result["servers"]["nsa_ar_graphs"] = {"start_s": round(time.time() - t0, 1),
                                              **_graph_state(OUT / "server_nsa_ar_graphs.log")}
        bench("nsa_ar_graphs", base)
        for i, (name, extra, env) in enumerate(configs):
            info = result["servers"][name] = {"args": extra, "env": env}
            t0 = time.time()
            try:
                with serve(model, 30101 + i, [*spec_args, *common, *extra], name, env) as spec:
                    info.update(start_s=round(time.time() - t0, 1),
                                **_graph_state(OUT / f"server_{name}.log"))
                    agree = compare(base, spec, prompts)
                    info["greedy_agreement_vs_nsa_ar_graphs"] = agree
                    print(name, json.dumps(agree), flush=True)
                    save()
                    bench(name, spec)
                    break
            except Exception as e:   # noqa: BLE001 - the next configuration says more
                info["error"] = str(e)[-800:]
                info["server_log_tail"] = _crash_tail(OUT / f"server_{name}.log")
                print(name, "FAILED", info["server_log_tail"][-1500:], flush=True)
                save()
    result["wall_s"] = round(time.time() - t_start, 1)
    (OUT / "sglang_gpu_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
