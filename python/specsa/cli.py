"""Command line: `python -m specsa generate ...` and `python -m specsa demo`.

The parser lives in `build_parser()`; generation modes are a registry (`MODES`: name ->
runner) so the speculative runtime adds `--mode specsa` with its own flags by extending
`add_generate_args` and registering a runner.

Order of work (`_run`): every argument check first (values, the prompt file, speculative
flags only with `--mode specsa`), then config.json and the tokenizer (the NSA overrides, the
prompt length against `max_position_embeddings`), and only then the model weights. Usage
errors (bad values, speculative flags without `--mode specsa`, a prompt that does not fit the
model's positions) exit with status 2 and a message naming the flag; load / runtime errors
exit 1. Progress bars (tqdm, stderr) show prefill chunks and generated tokens unless
`--json` or `--quiet`.

`demo` without `--mode` runs the embedded tiny model twice, autoregressive and SpecSA
(self-draft), compares the tokens and says whether they are identical (exit 1 if greedy
outputs differ).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from specsa.config import CacheConfig, ConfigError, SamplingConfig, positive_int_arg

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DEMO_DIR = Path(os.path.expanduser("~")) / ".cache" / "specsa" / "tiny-llama-v1"
DEMO_PROMPT = "The quick brown fox jumps over the lazy dog."
DEMO_DRAFT = "self:2"          # the demo model's first 2 of its 4 layers draft
DEMO_WHY_NOT_FASTER = (
    "Not a speed demo: on a CPU a forward over several tokens is not nearly free as on a GPU, "
    "a tiny random model agrees with few drafts,\nand the self-draft runs the target's own "
    "layers once per draft token. Speculation pays with a cheap, well-matched draft on a GPU "
    "(README: when speculation pays).")


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
    progress: Callable[[str, int], None] | None = None   # see specsa.runtime.generate


def run_ar(req: RunRequest) -> dict:
    """Autoregressive NSA generation; returns the mode's part of the JSON report."""
    from specsa.runtime.generate import generate
    from specsa.runtime.spec_cli import knobs_from_args, knobs_report

    knobs = knobs_from_args(req.args, "ar")
    cache = req.model.new_cache(req.cache)
    results, stats = generate(req.model, [req.prompt_ids], req.sampling, cache=cache,
                              chunk_size=req.chunk_size, progress=req.progress, knobs=knobs)
    return {"tokens": results[0].tokens, "finish_reason": results[0].finish_reason,
            **stats.to_dict(), "knobs": knobs_report(knobs, "ar")}


def run_specsa(req: RunRequest) -> dict:
    """Speculative NSA generation (draft -> verify -> accept -> commit)."""
    from specsa.runtime.spec_cli import run_specsa as run

    return run(req)


# name -> runner(RunRequest) -> dict with at least tokens, steps, decode_tokens_per_s
MODES: dict[str, Callable[[RunRequest], dict]] = {"ar": run_ar, "specsa": run_specsa}


class UsageError(ConfigError):
    """A usage error found after parsing (exit 2)."""


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `generate` and `demo` (model / prompt flags are added by the caller)."""
    p.add_argument("--max-new-tokens", type=positive_int_arg("--max-new-tokens"), default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS")
    p.add_argument("--mode", choices=sorted(MODES), default=None,
                   help="ar (default for generate) or specsa (speculative; needs --draft)")
    p.add_argument("--nsa", default=None, metavar="KEY=VALUE,...",
                   help="NSA overrides: block, stride, select, topn, init, local, window, "
                        "combine (union|gated), compress (mean|learned)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--page-size", type=positive_int_arg("--page-size"), default=16)
    p.add_argument("--num-pages", type=positive_int_arg("--num-pages"), default=None,
                   help="KV cache pages (default: exactly what the request needs)")
    p.add_argument("--chunk-size", type=positive_int_arg("--chunk-size"), default=256,
                   help="prefill chunk size")
    p.add_argument("--attn-impl", choices=("auto", "torch", "triton"), default="auto",
                   help="NSA core: torch (masked_nsa) or triton kernels; auto = triton on "
                        "cuda, torch on cpu")
    p.add_argument("--allow-long-positions", action="store_true",
                   help="allow prompt + --max-new-tokens beyond the model's "
                        "max_position_embeddings (RoPE extrapolates; quality is not checked)")
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bars)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or notes on stderr (the result only)")
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
    d = sub.add_parser("demo", help="build the embedded tiny random model (if missing), "
                                    "generate autoregressively and with SpecSA, compare")
    d.add_argument("--out", default=str(DEFAULT_DEMO_DIR), help="where the tiny model lives")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    add_generate_args(d)
    d.set_defaults(subparser=d)
    return parser


# -- checks that need no model ------------------------------------------------------------

def check_args(args: argparse.Namespace) -> None:
    """Every check that needs neither config.json nor weights; resolves args.mode (None ->
    "ar" for generate, "compare" for demo) and the demo's default draft. Raises UsageError /
    ConfigError naming the flag."""
    from specsa.runtime.spec_cli import check_spec_args, given_spec_flags, knobs_from_args

    if args.mode is None:
        args.mode = "compare" if args.command == "demo" else "ar"
    spec_flags = given_spec_flags(args)
    if args.mode == "ar" and spec_flags:
        raise UsageError(f"{', '.join(spec_flags)} only apply to speculative decoding: add "
                         "--mode specsa (or drop them)")
    if args.mode in ("specsa", "compare"):
        if args.command == "demo" and args.draft is None:
            args.draft = DEMO_DRAFT
        check_spec_args(args)
    else:
        knobs_from_args(args, "ar")
    try:
        SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, max_new_tokens=args.max_new_tokens)
    except ConfigError as e:
        raise UsageError(str(e).replace("SamplingConfig.", "--").replace("_", "-")) from None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")


def read_prompt(args: argparse.Namespace) -> str:
    if getattr(args, "prompt_file", None) is None:
        return args.prompt
    path = Path(args.prompt_file)
    try:
        return path.read_text()
    except OSError as e:
        raise UsageError(f"--prompt-file: cannot read {str(path)!r}: "
                         f"{e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompt-file: {str(path)!r} is not UTF-8 text ({e.reason})") from None


def check_positions(prompt_tokens: int, max_new_tokens: int, max_positions: int,
                    allow_long: bool) -> str | None:
    """UsageError when prompt + max_new_tokens exceeds the model's positions (unless
    allow_long, then a warning string is returned); None when it fits."""
    total = prompt_tokens + max_new_tokens
    if total <= max_positions:
        return None
    msg = (f"the prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} = {total} "
           f"positions exceeds the model's max_position_embeddings {max_positions} "
           "(config.json)")
    if not allow_long:
        raise UsageError(msg + "; shorten the prompt, lower --max-new-tokens, or pass "
                               "--allow-long-positions to run past them anyway")
    return "warning: " + msg + "; running anyway (--allow-long-positions)"


# -- progress -----------------------------------------------------------------------------

class ProgressBars:
    """tqdm bars on stderr: prefill in chunks, then generation in tokens (one bar per phase)."""

    UNITS = {"prefill": "chunk", "decode": "tok"}

    def __init__(self, label: str, prefill_chunks: int, max_new_tokens: int):
        self.label = label
        self.totals = {"prefill": prefill_chunks, "decode": max_new_tokens}
        self.phase, self.bar = None, None

    def open(self, phase: str) -> None:
        from tqdm import tqdm

        self.close()
        self.phase = phase
        name = "generate" if phase == "decode" else phase
        self.bar = tqdm(total=self.totals[phase], unit=self.UNITS[phase],
                        desc=f"{self.label} {name}", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, phase: str, n: int) -> None:
        if phase != self.phase:
            self.open(phase)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -- running ------------------------------------------------------------------------------

def _run(args: argparse.Namespace) -> int:
    import torch

    from specsa.model import load_model, load_tokenizer
    from specsa.model.load import load_configs

    check_args(args)
    quiet = args.json or args.quiet
    prompt = read_prompt(args)
    if args.command == "demo":
        model_dir = ensure_demo_model(Path(args.out), quiet=quiet)
        if not quiet:
            print(f"(demo model {model_dir}: tiny, random weights -- the text is noise; the "
                  "point is the NSA runtime end to end)", file=sys.stderr)
    else:
        model_dir = Path(args.model)
    cfg, _, _ = load_configs(model_dir, args.nsa)        # config.json + --nsa, no weights
    tok = load_tokenizer(model_dir)
    ids = tok.encode(prompt, add_special_tokens=False)
    if not ids:
        raise UsageError("the prompt encodes to zero tokens")
    warn = check_positions(len(ids), args.max_new_tokens, cfg.max_position_embeddings,
                           args.allow_long_positions)
    if warn:
        print(warn, file=sys.stderr)
    need = -(-(len(ids) + args.max_new_tokens) // args.page_size)
    if args.num_pages is not None and args.num_pages < need:
        raise UsageError(f"--num-pages {args.num_pages}: the prompt ({len(ids)} tokens) + "
                         f"--max-new-tokens {args.max_new_tokens} need {need} pages of "
                         f"--page-size {args.page_size}")
    stops = () if args.ignore_eos else cfg.eos_token_ids
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed, max_new_tokens=args.max_new_tokens,
                              stop_token_ids=stops)
    # -- only now the weights --
    model = load_model(model_dir, nsa_overrides=args.nsa, device=args.device,
                       dtype=getattr(torch, args.dtype))
    try:
        model.set_attn_impl(args.attn_impl)
    except ConfigError as e:
        raise UsageError(f"--attn-impl: {e}") from None
    total = len(ids) + args.max_new_tokens
    pages = args.num_pages or -(-total // args.page_size)
    cache = CacheConfig(page_size=args.page_size, num_pages=pages)
    chunks = -(-len(ids) // args.chunk_size)

    def run(mode: str) -> dict:
        bars = None if quiet else ProgressBars(f"[{mode}]", chunks, args.max_new_tokens)
        if bars is not None:
            bars.open("prefill")          # before the first chunk, so its time is counted
        try:
            report = MODES[mode](RunRequest(model=model, prompt_ids=ids, sampling=sampling,
                                            cache=cache, chunk_size=args.chunk_size, args=args,
                                            tokenizer=tok, progress=bars))
        finally:
            if bars is not None:
                bars.close()
        return {"mode": mode, "model": str(model_dir), "prompt_tokens": len(ids),
                "text": tok.decode(report["tokens"], skip_special_tokens=True), **report,
                "nsa": model.nsa.to_dict(), "device": args.device, "dtype": args.dtype,
                "attn_impl": model.attn_impl.value}

    if args.mode == "compare":
        return _compare(args, prompt, run("ar"), run("specsa"), sampling.greedy, quiet)
    report = run(args.mode)
    if args.json:
        print(json.dumps(report))
    else:
        print(prompt + report["text"])
        if not args.quiet:
            print(_summary(report), file=sys.stderr)
    return 0


def _summary(r: dict) -> str:
    s = (f"[{r['mode']}] {len(r['tokens'])} tokens, {r['steps']} target forwards, decode "
         f"{r['decode_tokens_per_s']:.1f} tok/s, prefill {r['prefill_s'] * 1e3:.1f} ms")
    if r["mode"] == "specsa":
        s += (f"; draft {r['draft']}, mean accepted length {r['mean_accept_len']:.2f}, "
              f"accept histogram {r['accept_histogram']}")
    k = r.get("knobs") or {}
    if k.get("precision", "strict") != "strict":
        shown = ", ".join(f"{n.replace('_', ' ')} {v}" for n, v in k.items()
                          if v is not None and n != "plan")
        s += f"; {shown}"
    return s


def _compare(args, prompt: str, ar: dict, spec: dict, greedy: bool, quiet: bool) -> int:
    """The demo's AR vs SpecSA comparison: identical tokens under greedy decoding."""
    same = ar["tokens"] == spec["tokens"]
    if args.json:
        print(json.dumps({"mode": "compare", "identical": same, "ar": ar, "specsa": spec}))
        return 0 if same or not greedy else 1
    print(prompt + ar["text"])
    if not args.quiet:
        print(_summary(ar), file=sys.stderr)
        print(_summary(spec), file=sys.stderr)
    n = len(ar["tokens"])
    if same:
        print(f"SpecSA tokens are identical to autoregressive NSA: {n}/{n} tokens match "
              f"({spec['steps']} target forwards instead of {ar['steps']}).")
    else:
        first = next((i for i, (a, b) in enumerate(zip(ar["tokens"], spec["tokens"]))
                      if a != b), min(n, len(spec["tokens"])))
        what = "ERROR, greedy outputs must be identical" if greedy else (
            "expected when sampling: the two runs use their random numbers differently; both "
            "follow the model's distribution")
        print(f"SpecSA tokens differ from autoregressive NSA from token {first} ({what}).")
    if not quiet:
        print(DEMO_WHY_NOT_FASTER)
    return 0 if same or not greedy else 1


def ensure_demo_model(out: Path, quiet: bool = False) -> Path:
    """The embedded default model: a tiny random Llama with the bundled tokenizer, built once."""
    if not (out / "config.json").exists():
        from specsa.model.tiny import build_tiny

        if not quiet:
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
        return _run(args)
    except ConfigError as e:
        parser.error(str(e))   # exits 2
    except (LoadError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
