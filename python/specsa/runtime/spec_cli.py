"""`--mode specsa` flags and runner for specsa.cli (which owns the parser and the report).

    --mode specsa --draft SPEC [--tree topk=K,depth=D,tokens=N | --gamma G] [--traversal T]

SPEC: self:K | model:DIR | eagle:DIR | ngram:N | oracle:P (oracle: benchmark only; the runner
first runs autoregressive generation to learn the continuation). The mode's JSON part adds
accept_histogram, mean_accept_len and tokens_per_forward to the AR fields.

Precision knobs (docs/DESIGN.md section 5; `knobs_from_args`):

    --precision strict|reuse|approx|approx_reuse   (AR and specsa; default strict)
    --refresh-period R                              (AR and specsa fixed plans; REUSE classes)
    --schedule independent|exact_merged|shared_index, --group-size C   (specsa fixed plans)

A combination outside the class is a usage error (exit 2) with the sentence of
`specsa.orchestrator.planner.knobs_error`; with `--plan auto` the planner picks schedule,
group size and refresh period per step inside --precision, so giving them is an error too.
The JSON report gets `knobs` (the summary) and `knob_counts` (per step, what ran).

Every flag of this group defaults to None so the CLI can tell a flag the user gave from a
default: speculative flags without `--mode specsa` are a usage error (`given_spec_flags`),
never silently ignored. `check_spec_args` validates them all without a model, so the CLI
rejects bad values before it loads anything.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from specsa.config import (CacheConfig, ConfigError, PrecisionClass, SamplingConfig, Schedule,
                           Traversal, VerifyKnobs, parse_enum, positive_int_arg)
from specsa.draft_tree import MAX_TREE_NODES, TreeSpec

# flags only speculative decoding uses (argparse dests); all default to None
SPEC_FLAGS = ("draft", "tree", "gamma", "traversal", "plan", "profile", "schedule", "group_size")
# precision knobs; --precision and --refresh-period also apply to autoregressive decoding
KNOB_FLAGS = ("precision", "schedule", "group_size", "refresh_period")


def add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (--mode specsa)")
    g.add_argument("--draft", default=None, metavar="SPEC",
                   help="self:K (target's first K layers), model:DIR, eagle:DIR (EAGLE / "
                        "EAGLE-3 head), ngram:N, oracle:P (benchmarks only)")
    shape = g.add_mutually_exclusive_group()
    shape.add_argument("--tree", default=None, metavar="topk=K,depth=D,tokens=N",
                       help="draft tree shape (EAGLE-2 style top-k expansion)")
    shape.add_argument("--gamma", type=int, default=None, metavar="G",
                       help="draft chain length (default 4)")
    g.add_argument("--traversal", default=None, choices=[t.value for t in Traversal],
                   help="verification flattening order (default: drafter order)")
    g.add_argument("--plan", choices=("fixed", "auto"), default=None,
                   help="fixed (default): the --tree / --gamma shape every step; auto: the "
                        "orchestrator picks the draft shape (or no speculation) per step from "
                        "--profile and measured acceptance, inside --precision")
    g.add_argument("--profile", default=None, metavar="JSON",
                   help="latency profile for --plan auto (default: configs/profiles/<device>/)")
    k = p.add_argument_group("precision (docs/DESIGN.md section 5)")
    k.add_argument("--precision", default=None,
                   choices=[c.value for c in PrecisionClass],
                   help="precision class (default strict: exact). reuse: layers between "
                        "refresh layers reuse the last refresh layer's block selection; "
                        "approx: shared_index groups; approx_reuse: both. --plan auto stays "
                        "inside it")
    k.add_argument("--refresh-period", type=positive_int_arg("--refresh-period"), default=None,
                   metavar="R", help="layers 0, R, 2R, ... compute their block selection, the "
                                     "others reuse it (default 1; R > 1 needs reuse or "
                                     "approx_reuse); AR and fixed speculative plans")
    k.add_argument("--schedule", default=None, choices=[c.value for c in Schedule],
                   help="verification schedule of a fixed plan (--mode specsa; default "
                        "exact_merged; shared_index needs approx or approx_reuse)")
    k.add_argument("--group-size", type=positive_int_arg("--group-size"), default=None,
                   metavar="C", help="verifier queries per group for exact_merged / "
                                     f"shared_index (1..{MAX_TREE_NODES}; default: fills the kernel's "
                                     "Q tile)")


def given_spec_flags(args: argparse.Namespace) -> list[str]:
    """The speculative flags the user gave (as `--flag`), in the group's order."""
    return ["--" + f.replace("_", "-") for f in SPEC_FLAGS if getattr(args, f, None) is not None]


def check_spec_args(args: argparse.Namespace) -> None:
    """Validate the speculative flags without a model (raises ConfigError / DraftError naming
    the flag): a drafter is given and parses, a draft model folder exists, the tree shape and
    traversal parse, --profile / --precision come with --plan auto and the profile exists."""
    from specsa.runtime.drafters import DraftError, parse_draft_spec

    if not args.draft:
        raise ConfigError("--mode specsa needs --draft SPEC (self:K, model:DIR, eagle:DIR, "
                          "ngram:N, oracle:P)")
    spec = parse_draft_spec(args.draft)
    if spec.kind in ("model", "eagle") and not Path(spec.path).is_dir():
        raise DraftError(f"--draft {args.draft!r}: draft model folder {spec.path!r} does not exist")
    tree_spec_from_args(args)
    if args.traversal is not None:
        parse_enum(Traversal, args.traversal, "--traversal")
    if getattr(args, "plan", None) != "auto":
        if getattr(args, "profile", None) is not None:
            raise ConfigError("--profile only applies with --plan auto")
    elif args.profile is not None and not Path(args.profile).is_file():
        raise ConfigError(f"--profile: file {args.profile!r} does not exist")
    knobs_from_args(args, "specsa")


def knobs_from_args(args: argparse.Namespace, mode: str) -> VerifyKnobs:
    """VerifyKnobs of --precision / --schedule / --group-size / --refresh-period for `mode`
    ("ar" or "specsa"; --plan auto: the precision only, the planner picks the rest).
    Raises ConfigError naming the flags, with knobs_error's sentence for a combination
    outside the precision class."""
    from specsa.orchestrator.planner import knobs_error

    get = lambda name: getattr(args, name, None)  # noqa: E731
    precision = parse_enum(PrecisionClass, get("precision") or "strict", "--precision")
    if get("plan") == "auto":
        extra = ["--" + f.replace("_", "-") for f in ("schedule", "group_size", "refresh_period")
                 if get(f) is not None]
        if extra:
            raise ConfigError(f"{', '.join(extra)}: --plan auto chooses the schedule, group "
                              f"size and refresh period per step inside --precision; drop "
                              f"{'them' if len(extra) > 1 else 'it'} or use a fixed plan")
        return VerifyKnobs(precision=precision)
    schedule = None if get("schedule") is None else parse_enum(Schedule, get("schedule"),
                                                               "--schedule")
    group, period = get("group_size"), get("refresh_period") or 1
    if group is not None:
        if not 1 <= group <= MAX_TREE_NODES:
            raise ConfigError(f"--group-size must be in 1..{MAX_TREE_NODES}, got {group}")
        if schedule is Schedule.INDEPENDENT:
            raise ConfigError("--group-size applies to the exact_merged and shared_index "
                              "schedules (independent verifies one query per group)")
    why = knobs_error(precision, schedule, period)
    if why:
        flags = [f"--precision {precision.value}"]
        if schedule is not None and "schedule" in why:
            flags.append(f"--schedule {schedule.value}")
        if period != 1 and "refresh period" in why:
            flags.append(f"--refresh-period {period}")
        raise ConfigError(f"{' with '.join(reversed(flags))}: {why}")
    return VerifyKnobs(precision=precision, schedule=schedule, group_size=group,
                       refresh_period=period)


def knobs_report(knobs: VerifyKnobs, mode: str, plan: str | None = None) -> dict:
    """The JSON summary of the knobs a run was given (None = the default for each step)."""
    if mode == "ar":
        return {"precision": knobs.precision.value, "refresh_period": knobs.refresh_period}
    if plan == "auto":
        return {"plan": "auto", "precision": knobs.precision.value}
    return {"plan": "fixed", "precision": knobs.precision.value,
            "schedule": None if knobs.schedule is None else knobs.schedule.value,
            "group_size": knobs.group_size, "refresh_period": knobs.refresh_period}


def tree_spec_from_args(args: argparse.Namespace) -> TreeSpec:
    if args.tree is not None:
        return TreeSpec.parse(args.tree)
    return TreeSpec.chain(4 if args.gamma is None else args.gamma)


def run_spec_from_args(args: argparse.Namespace, model, prompt_ids: list[int],
                       sampling: SamplingConfig, cache: CacheConfig, *, chunk_size: int = 256,
                       tokenizer=None, progress=None) -> dict:
    """Run speculative generation for one prompt; returns the mode's part of the JSON report.
    Raises ConfigError (subclasses: DraftError) for bad --draft / --tree / --gamma values.
    progress: see `specsa.runtime.generate.generate`."""
    from specsa.runtime.drafters import parse_draft_spec
    from specsa.runtime.drafters.build import build_drafter
    from specsa.runtime.loop import speculative_generate

    check_spec_args(args)
    spec = parse_draft_spec(args.draft)
    tree = tree_spec_from_args(args)
    trav = None if args.traversal is None else parse_enum(Traversal, args.traversal, "--traversal")
    drafter = build_drafter(spec, model, tree, sampling, cache, tokenizer=tokenizer,
                            seed=sampling.seed, nsa_overrides=vars(args).get("nsa"))
    if spec.kind == "oracle":
        from specsa.runtime.generate import generate
        truth = generate(model, [prompt_ids], sampling, chunk_size=chunk_size)[0][0].tokens
        drafter.set_truth(0, list(prompt_ids) + truth)   # first request id of a fresh cache
    auto = getattr(args, "plan", None) == "auto"
    # --plan auto may pick any tree the kernels verify (specsa.draft_tree.MAX_TREE_NODES)
    head = TreeSpec(topk=1, depth=MAX_TREE_NODES, tokens=MAX_TREE_NODES) if auto else tree
    kv = model.new_cache(CacheConfig(page_size=cache.page_size,
                                     num_pages=cache.num_pages + _tree_pages(head, cache)))
    knobs = knobs_from_args(args, "specsa")
    controller = _controller(args, model) if auto else None
    results, stats = speculative_generate(model, [prompt_ids], drafter, sampling, cache=kv,
                                          chunk_size=chunk_size, traversal=trav,
                                          controller=controller, progress=progress,
                                          knobs=None if auto else knobs)
    d = stats.to_dict()
    return {"tokens": results[0].tokens, "finish_reason": results[0].finish_reason,
            "steps": stats.prefill_steps + stats.verify_steps, **d,
            "draft": args.draft, "tree": {"topk": tree.topk, "depth": tree.depth,
                                          "tokens": tree.tokens},
            "knobs": knobs_report(knobs, "specsa", "auto" if auto else "fixed")}




def _controller(args: argparse.Namespace, model):
    """AdaptiveController from --profile (default: the repository's profile of this device
    and model shape: configs/profiles/cpu/ on CPU, configs/profiles/<gpu>/runtime/ on a GPU,
    whose files price the runtime's own steps)."""
    from specsa.orchestrator import (PROFILES_DIR, RUNTIME_SUBDIR, AdaptiveController,
                                     gpu_folder, load_profile, match_profile, shape_key)

    if args.profile is not None:
        profile = load_profile(args.profile)
    else:
        dev = model.device
        folder = PROFILES_DIR / "cpu" if dev.type == "cpu" else \
            PROFILES_DIR / gpu_folder(torch.cuda.get_device_name(dev)) / RUNTIME_SUBDIR
        c = model.cfg
        want = shape_key(c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                         c.vocab_size)
        profile = match_profile(folder, want)
        if profile is None and dev.type == "cpu":
            # the shipped CPU profile prices the tiny model; any model on CPU may borrow it
            found = sorted(folder.glob("*.json"))
            profile = load_profile(found[0]) if found else None
        if profile is None:
            raise ConfigError(f"--plan auto: no profile for this model shape {want} (layers, "
                              f"hidden, heads, kv heads, head_dim, vocab) under {folder}; "
                              "measure one with benchmark/profile_runtime_steps.py and pass "
                              "--profile")
    return AdaptiveController(profile, parse_enum(PrecisionClass, args.precision or "strict",
                                                  "--precision"))


def run_specsa(req) -> dict:
    """Runner for specsa.cli's MODES registry (req: specsa.cli.RunRequest)."""
    return run_spec_from_args(req.args, req.model, req.prompt_ids, req.sampling, req.cache,
                              chunk_size=req.chunk_size, tokenizer=req.tokenizer,
                              progress=req.progress)


def _tree_pages(tree: TreeSpec, cache: CacheConfig) -> int:
    """Headroom so a full draft tree fits beside the committed tokens (the CLI sizes the
    cache for prompt + max_new_tokens only)."""
    return -(-(tree.tokens + 1) // cache.page_size)
