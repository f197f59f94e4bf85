"""A planner profile measured from real SGLang steps: the step timer of a SpecSA server that ran
with SPECSA_PLAN=sweep (every candidate draft length in turn) -> configs/profiles/<gpu>/<model>.json
(schema: configs/profiles/README.md), the profile SPECSA_PLAN=auto reads.

    python benchmark/sglang_profile.py --timing $OUT/timing_sweep_2l.json --target llama8b \
        --contexts 32768,131072 --gpu "NVIDIA H100 80GB HBM3" --draft 2l --out PATH.json

benchmark/sglang_e2e.py calls `build_profile` itself after every sweep server
(profile_<server>.json beside its timing file). Per (context, draft length k, batch), over the
timed steps whose longest request lies in [context, context + 1024):
- draft: median GPU time of the draft phase; DraftCost.step_ms = median over groups of
  draft / k (a chain drafts k tokens in k forwards, so token_ms = 0);
- verify (k >= 1, T = k + 1): median GPU time of the rest of the step (verify prep, target
  verify forward, acceptance, draft extend), what the step costs besides drafting;
- decode (k = 0): the same for the length-0 steps: plain decoding inside this server (SGLang
  still runs the draft extend, keeping the draft's KV warm).
Nothing is composed from kernel timings: every entry is a median of whole measured steps (GPU
time from CUDA events; host time on the CPU harness, which has none).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

WINDOW = 1024           # a step belongs to context L if its longest request is in [L, L+WINDOW)


def _median(xs):
    return statistics.median(xs) if xs else None


def build_profile(timing: dict, contexts: list[int], target_config: dict, nsa: dict, gpu: str,
                  draft: str, model_name: str, source: dict) -> dict:
    """Profile dict (specsa.profile/1) from a sweep server's step-timer JSON."""
    from specsa.schedule import default_schedule
    groups: dict[tuple[int, int, int], list[dict]] = {}
    clock = "gpu" if any(e.get("step_gpu_ms") is not None for e in timing["entries"]) \
        else "host"       # the CPU harness has no CUDA events: host time is its step time
    for e in timing["entries"]:
        if e.get("steps") is None or e.get(f"step_{clock}_ms") is None:
            continue
        ctx = next((c for c in contexts if c <= e["seq_max"] < c + WINDOW), None)
        if ctx is not None:
            groups.setdefault((ctx, int(e["steps"]), int(e["bs"])), []).append(e)
    if not groups:
        raise SystemExit("no timed steps with a draft length fall in the given contexts")
    verify, decode, per_step, counts = [], [], [], {}
    for (ctx, k, bs), es in sorted(groups.items()):
        drafts = [e[f"{clock}_ms"].get("draft") or 0.0 for e in es]
        rest = _median([e[f"step_{clock}_ms"] - d for e, d in zip(es, drafts)])
        counts[f"{ctx}/{k}/{bs}"] = len(es)
        if k == 0:
            decode.append({"context": ctx, "batch": bs, "refresh_period": 1,
                           "ms": round(rest, 4)})
            continue
        per_step.append(_median(drafts) / k)
        verify.append({"context": ctx, "tokens": k + 1, "traversal": "chain",
                       "schedule": default_schedule((k + 1) * bs).value, "group_size": 1,
                       "refresh_period": int(source.get("refresh_period", 1)), "batch": bs,
                       "ms": round(rest, 4)})
    _check_grid(verify, decode)
    c = target_config
    return {"schema": "specsa.profile/1", "gpu": gpu,
            "model": {"name": model_name, "num_layers": c["num_hidden_layers"],
                      "hidden_size": c["hidden_size"], "num_heads": c["num_attention_heads"],
                      "num_kv_heads": c["num_key_value_heads"],
                      "head_dim": c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                      "vocab_size": c["vocab_size"], "nsa": nsa},
            "metadata": {**source, "steps_per_point": counts, "clock": clock,
                         "method": "medians of whole SGLang steps (sweep), benchmark/sglang_profile.py"},
            "decode": decode,
            "draft": [{"name": draft, "step_ms": round(_median(per_step), 4), "token_ms": 0.0}],
            "verify": verify}


def _check_grid(verify: list[dict], decode: list[dict]) -> None:
    """Every (batch) slice must cover the same contexts x T grid, and decode every context."""
    by_b: dict[int, set] = {}
    for v in verify:
        by_b.setdefault(v["batch"], set()).add((v["context"], v["tokens"]))
    for b, cells in by_b.items():
        ctxs = {c for c, _ in cells}
        toks = {t for _, t in cells}
        missing = {(c, t) for c in ctxs for t in toks} - cells
        if missing:
            raise SystemExit(f"batch {b}: the sweep did not time (context, T) {sorted(missing)}; "
                             "run more new tokens or a smaller sweep period")
        if not {(d["context"]) for d in decode if d["batch"] == b} >= ctxs:
            raise SystemExit(f"batch {b}: no length-0 (decode) steps at some context; "
                             "include 0 in the sweep's steps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timing", required=True)
    ap.add_argument("--target", default="llama8b")
    ap.add_argument("--contexts", required=True)
    ap.add_argument("--gpu", required=True)
    ap.add_argument("--draft", default="2l")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "benchmark"))
    from sglang_site import SHAPES
    from specsa.config import NSAConfig
    prof = build_profile(json.loads(Path(a.timing).read_text()),
                         [int(x) for x in a.contexts.split(",")], SHAPES[a.target],
                         NSAConfig().to_dict(), a.gpu, a.draft, a.target,
                         {"source": a.timing, "command": " ".join(sys.argv)})
    from specsa.orchestrator import Profile, save_profile
    print(save_profile(Profile.from_dict(prof), a.out))


if __name__ == "__main__":
    main()
