"""Command line: `python -m specsa generate ...` and `python -m specsa demo`.

The parser lives in `build_parser()`; generation modes are a registry (`MODES`: name ->
runner) so the speculative runtime adds `--mode specsa` with its own flags by extending
`add_generate_args` and registering a runner. Usage errors (unknown values, bad --nsa keys,
unavailable device) exit with status 2 and a message naming the flag; load / runtime errors
exit 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from specsa.config import CacheConfig, ConfigError, SamplingConfig

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DEMO_DIR = Path(os.path.expanduser("~")) / ".cache" / "specsa" / "tiny-llama-v1"
DEMO_PROMPT = "The quick brown fox jumps over the lazy dog."


@dataclass(frozen=True)
class RunRequest:
    """What a mode runner gets: the loaded model, tokenised prompt and parsed options."""

    model: object                # specsa.model.NSADecoder
    prompt_ids: list[int]
    sampling: SamplingConfig
    cache: CacheConfig
    chunk_size: int
    args: argparse.Namespace     # mode-specific flags (e.g. --draft for specsa)
    tokenizer: object = None     # lets a draft checkpoint's tokenizer be checked against it


def run_ar(req: RunRequest) -> dict:
    """Autoregressive NSA generation; returns the mode's part of the JSON report."""
    from specsa.runtime.generate import generate

    cache = req.model.new_cache(req.cache)
    results, stats = generate(req.model, [req.prompt_ids], req.sampling, cache=cache,
                              chunk_size=req.chunk_size)
    return {"tokens": results[0].tokens, "finish_reason": results[0].finish_reason,
            **stats.to_dict()}


# name -> runner(RunRequest) -> dict with at least tokens, steps, decode_tokens_per_s
def run_specsa(req: RunRequest) -> dict:
    """Speculative NSA generation (draft -> verify -> accept -> commit)."""
    from specsa.runtime.spec_cli import run_spec_from_args

    return run_spec_from_args(req.args, req.model, req.prompt_ids, req.sampling, req.cache,
                              chunk_size=req.chunk_size, tokenizer=req.tokenizer)


MODES: dict[str, Callable[[RunRequest], dict]] = {"ar": run_ar, "specsa": run_specsa}


def _positive_int(flag: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {v}")
        return v
    return parse


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `generate` and `demo` (model / prompt flags are added by the caller)."""
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS")
    p.add_argument("--mode", choices=sorted(MODES), default="ar")
    p.add_argument("--nsa", default=None, metavar="KEY=VALUE,...",
                   help="NSA overrides: block, stride, select, topn, init, local, window, "
                        "combine (union|gated), compress (mean|learned)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--page-size", type=_positive_int("--page-size"), default=16)
    p.add_argument("--num-pages", type=_positive_int("--num-pages"), default=None,
                   help="KV cache pages (default: exactly what the request needs)")
    p.add_argument("--chunk-size", type=_positive_int("--chunk-size"), default=256,
                   help="prefill chunk size")
    p.add_argument("--attn-impl", choices=("auto", "torch", "triton"), default="auto",
                   help="NSA core: torch (masked_nsa) or triton kernels; auto = triton on "
                        "cuda, torch on cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    from specsa.runtime.spec_cli import add_spec_args

    add_spec_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m specsa",
                                     description="SpecSA: NSA generation runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate from a HF checkpoint folder")
    g.add_argument("--model", required=True, help="HF folder: config.json + safetensors")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text")
    add_generate_args(g)
    g.set_defaults(subparser=g)   # usage errors print the subcommand's usage
    d = sub.add_parser("demo", help="build the embedded tiny random model (if missing) and "
                                    "generate from it")
    d.add_argument("--out", default=str(DEFAULT_DEMO_DIR), help="where the tiny model lives")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    add_generate_args(d)
    d.set_defaults(subparser=d)
    return parser


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from specsa.model import load_model, load_tokenizer

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.command == "demo":
        model_dir = ensure_demo_model(Path(args.out))
        prompt = args.prompt
        if not args.json:
            print("(demo model: tiny, random weights -- the text is noise; the point is the "
                  "NSA runtime end to end)", file=sys.stderr)
    else:
        model_dir = Path(args.model)
        prompt = args.prompt if args.prompt is not None else _read_prompt(args.prompt_file, parser)
    model = load_model(model_dir, nsa_overrides=args.nsa, device=args.device,
                       dtype=getattr(torch, args.dtype))
    try:
        model.set_attn_impl(args.attn_impl)
    except ConfigError as e:
        parser.error(f"--attn-impl: {e}")
    tok = load_tokenizer(model_dir)
    ids = tok.encode(prompt, add_special_tokens=False)
    if not ids:
        parser.error("the prompt encodes to zero tokens")
    stops = () if args.ignore_eos else model.cfg.eos_token_ids
    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed,
                                  max_new_tokens=args.max_new_tokens, stop_token_ids=stops)
    except ConfigError as e:
        parser.error(str(e).replace("SamplingConfig.", "--").replace("_", "-"))
    total = len(ids) + args.max_new_tokens
    pages = args.num_pages or -(-total // args.page_size)
    cache = CacheConfig(page_size=args.page_size, num_pages=pages)
    report = MODES[args.mode](RunRequest(model=model, prompt_ids=ids, sampling=sampling,
                                         cache=cache, chunk_size=args.chunk_size, args=args,
                                         tokenizer=tok))
    text = tok.decode(report["tokens"], skip_special_tokens=True)
    report = {"mode": args.mode, "model": str(model_dir), "prompt_tokens": len(ids),
              "text": text, **report, "nsa": model.nsa.to_dict(), "device": args.device,
              "dtype": args.dtype, "attn_impl": model.attn_impl.value}
    if args.json:
        print(json.dumps(report))
    else:
        print(prompt + text)
        print(f"[{args.mode}] {len(report['tokens'])} tokens, {report['steps']} steps, "
              f"decode {report['decode_tokens_per_s']:.1f} tok/s, prefill "
              f"{report['prefill_s'] * 1e3:.1f} ms", file=sys.stderr)
    return 0


def _read_prompt(path: str, parser: argparse.ArgumentParser) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        parser.error(f"--prompt-file: cannot read {path!r}: {e.strerror}")


def ensure_demo_model(out: Path) -> Path:
    """The embedded default model: a tiny random Llama with the bundled tokenizer, built once."""
    if not (out / "config.json").exists():
        from specsa.model.tiny import build_tiny

        print(f"building the tiny demo model in {out} ...", file=sys.stderr)
        build_tiny(out, kind="llama", num_layers=4, hidden_size=128, intermediate_size=256,
                   num_heads=4, num_kv_heads=2)
    return out


def main(argv: list[str] | None = None) -> int:
    from specsa.model import LoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    parser = args.subparser
    try:
        return _run(args, parser)
    except ConfigError as e:
        parser.error(str(e))   # exits 2
    except (LoadError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
