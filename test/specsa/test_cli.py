"""CLI: --json smoke on a tiny model, demo (AR vs SpecSA), usage errors (exit 2) found before
the model loads, the positions limit, progress bars."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from specsa.cli import build_parser, main
from specsa.model.tiny import build_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("cli"), kind="llama", seed=2)


def test_generate_json_subprocess(ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "specsa", "generate", "--model", str(ckpt), "--prompt",
         "def hello(): return 1", "--max-new-tokens", "5", "--ignore-eos", "--json",
         "--nsa", "window=16", "--page-size", "1"],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["mode"] == "ar" and len(rep["tokens"]) == 5 and isinstance(rep["text"], str)
    assert rep["prompt_tokens"] > 0 and rep["steps"] == 5
    assert rep["decode_tokens_per_s"] > 0 and rep["prefill_s"] > 0
    assert rep["nsa"]["window"] == 16


def test_generate_in_process_matches_runtime(ckpt, capsys, tmp_path):
    from specsa.config import SamplingConfig
    from specsa.model import load_model, load_tokenizer
    from specsa.runtime.generate import generate

    pf = tmp_path / "p.txt"
    pf.write_text("hello world, hello world")
    assert main(["generate", "--model", str(ckpt), "--prompt-file", str(pf), "--json",
                 "--max-new-tokens", "6", "--ignore-eos", "--page-size", "64"]) == 0
    rep = json.loads(capsys.readouterr().out)
    ids = load_tokenizer(ckpt).encode(pf.read_text(), add_special_tokens=False)
    res, _ = generate(load_model(ckpt), [ids], SamplingConfig(max_new_tokens=6))
    assert rep["tokens"] == res[0].tokens and rep["prompt_tokens"] == len(ids)


def test_demo_builds_and_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-new-tokens", "3", "--json",
                 "--ignore-eos", "--mode", "ar"]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["tokens"]) == 3


def test_demo_compares_ar_and_specsa(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-new-tokens", "12", "--ignore-eos"]) == 0
    cap = capsys.readouterr()
    assert "SpecSA tokens are identical to autoregressive NSA: 12/12 tokens match" in cap.out
    assert "Not a speed demo" in cap.out
    assert "[ar] 12 tokens" in cap.err and "[specsa] 12 tokens" in cap.err
    assert main(["demo", "--out", str(out), "--max-new-tokens", "12", "--ignore-eos",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["identical"] is True and rep["ar"]["tokens"] == rep["specsa"]["tokens"]
    assert rep["specsa"]["mode"] == "specsa" and rep["specsa"]["draft"] == "self:2"
    assert sum(rep["specsa"]["accept_histogram"]) == rep["specsa"]["request_steps"]


def test_demo_reports_a_mismatch(tmp_path, capsys, monkeypatch):
    """The comparison really compares: a SpecSA run that returns other tokens fails (exit 1)."""
    import specsa.cli as cli

    real = cli.MODES["specsa"]

    def broken(req):
        rep = real(req)
        return {**rep, "tokens": rep["tokens"][:-1] + [(rep["tokens"][-1] + 1) % 512]}
    monkeypatch.setitem(cli.MODES, "specsa", broken)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "4",
                 "--ignore-eos", "--quiet"]) == 1
    assert "differ from autoregressive NSA from token 3" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--draft", "ngram:3", "--gamma", "4"], "--draft, --gamma only apply to speculative"),
    (["--tree", "topk=2"], "--tree only apply to speculative decoding: add --mode specsa"),
    (["--plan", "auto"], "--plan only apply"),
    (["--mode", "ar", "--traversal", "bfs"], "--traversal only apply"),
    (["--mode", "specsa"], "--mode specsa needs --draft"),
    (["--mode", "specsa", "--draft", "bogus"], "expected self:K"),
    (["--mode", "specsa", "--draft", "model:/no/such/dir"], "does not exist"),
    (["--mode", "specsa", "--draft", "ngram:2", "--gamma", "0"], "--gamma must be a positive"),
    (["--mode", "specsa", "--draft", "ngram:2", "--profile", "p.json"],
     "--profile only applies with --plan auto"),
    # precision knobs outside their class, or where they do not apply
    (["--refresh-period", "2"], "--refresh-period 2 with --precision strict: refresh period 2 "
     "reuses block selections across layers and needs a REUSE precision class"),
    (["--precision", "approx", "--refresh-period", "4"], "needs a REUSE precision class"),
    (["--schedule", "exact_merged"], "--schedule only apply to speculative decoding"),
    (["--precision", "approx", "--group-size", "2"], "--group-size only apply to speculative"),
    (["--mode", "specsa", "--draft", "ngram:2", "--schedule", "shared_index"],
     "--schedule shared_index with --precision strict: schedule shared_index is approximate "
     "and needs an APPROX precision class (approx or approx_reuse), but precision is strict"),
    (["--mode", "specsa", "--draft", "ngram:2", "--precision", "reuse", "--schedule",
      "shared_index", "--refresh-period", "2"], "needs an APPROX precision class"),
    (["--mode", "specsa", "--draft", "ngram:2", "--precision", "approx", "--schedule",
      "independent", "--group-size", "4"], "--group-size applies to the exact_merged and "
     "shared_index schedules"),
    (["--mode", "specsa", "--draft", "ngram:2", "--precision", "approx", "--group-size", "65"],
     "--group-size must be in 1..64"),
    (["--mode", "specsa", "--draft", "ngram:2", "--plan", "auto", "--precision", "reuse",
      "--refresh-period", "2"], "--refresh-period: --plan auto chooses the schedule, group "
     "size and refresh period per step inside --precision"),
    (["--mode", "specsa", "--draft", "ngram:2", "--plan", "auto", "--schedule",
      "exact_merged", "--group-size", "2"], "--schedule, --group-size: --plan auto chooses"),
    (["--mode", "specsa", "--draft", "ngram:2", "--plan", "auto", "--profile", "/no/p.json"],
     "--profile: file '/no/p.json' does not exist"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--nsa", "window=abc"], "window must be an integer"),
    (["--num-pages", "1", "--page-size", "1", "--max-new-tokens", "4"], "need 5 pages"),
])
def test_usage_errors_before_model_loads(ckpt, capsys, monkeypatch, argv, msg):
    """Every check runs before the weights load: loading them would fail the test."""
    import specsa.model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(specsa.model, "load_model", no_load)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(ckpt), "--prompt", "x", *argv])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_missing_prompt_file_before_model_loads(ckpt, capsys, monkeypatch, tmp_path):
    import specsa.model

    monkeypatch.setattr(specsa.model, "load_model", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(ckpt), "--prompt-file", str(tmp_path / "none.txt")])
    assert e.value.code == 2
    assert "--prompt-file: cannot read" in capsys.readouterr().err


def test_positions_limit(tmp_path, capsys, monkeypatch):
    """prompt + --max-new-tokens beyond max_position_embeddings: exit 2 naming both numbers,
    before the weights load; --allow-long-positions runs anyway, with a warning."""
    import specsa.model

    short = build_tiny(tmp_path / "short", kind="llama", seed=2, max_position_embeddings=24)
    prompt = "hello world, hello world, hello world"
    from specsa.model import load_tokenizer
    n = len(load_tokenizer(short).encode(prompt, add_special_tokens=False))
    assert n + 8 > 24
    real = specsa.model.load_model
    monkeypatch.setattr(specsa.model, "load_model", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(short), "--prompt", prompt, "--max-new-tokens", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"the prompt ({n} tokens) + --max-new-tokens 8 = {n + 8} positions" in err
    assert "max_position_embeddings 24" in err and "--allow-long-positions" in err
    monkeypatch.setattr(specsa.model, "load_model", real)
    assert main(["generate", "--model", str(short), "--prompt", prompt, "--max-new-tokens", "8",
                 "--ignore-eos", "--allow-long-positions", "--json"]) == 0
    cap = capsys.readouterr()
    assert len(json.loads(cap.out)["tokens"]) == 8
    assert "warning:" in cap.err and "max_position_embeddings 24" in cap.err
    # within the limit: no warning
    assert main(["generate", "--model", str(short), "--prompt", "hi", "--max-new-tokens", "4",
                 "--json"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_specsa_mode_runs(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "--prompt", "abc abc abc abc", "--json",
                 "--max-new-tokens", "6", "--ignore-eos", "--mode", "specsa", "--draft",
                 "ngram:2", "--gamma", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert main(["generate", "--model", str(ckpt), "--prompt", "abc abc abc abc", "--json",
                 "--max-new-tokens", "6", "--ignore-eos"]) == 0
    ar = json.loads(capsys.readouterr().out)
    assert spec["mode"] == "specsa" and spec["tokens"] == ar["tokens"]
    assert spec["tree"] == {"topk": 1, "depth": 3, "tokens": 3}


@pytest.mark.parametrize("mode", [[], ["--mode", "specsa", "--draft", "ngram:2"]])
def test_progress_bars_on_stderr(ckpt, capsys, mode):
    argv = ["generate", "--model", str(ckpt), "--prompt", "abc " * 40, "--chunk-size", "16",
            "--max-new-tokens", "5", "--ignore-eos", *mode]
    assert main(argv) == 0
    cap = capsys.readouterr()
    label = "[specsa]" if mode else "[ar]"
    assert f"{label} prefill" in cap.err and f"{label} generate" in cap.err
    n_chunks = -(-len(load_tokenizer_ids(ckpt, "abc " * 40)) // 16)
    assert f"{n_chunks}/{n_chunks} [" in cap.err and "5/5 [" in cap.err
    assert "chunk" in cap.err and "tok" in cap.err
    assert "prefill" not in cap.out
    for quiet in (["--json"], ["--quiet"]):
        assert main(argv + quiet) == 0
        cap = capsys.readouterr()
        assert "prefill" not in cap.err and "generate:" not in cap.err, quiet


def load_tokenizer_ids(ckpt, text):
    from specsa.model import load_tokenizer
    return load_tokenizer(ckpt).encode(text, add_special_tokens=False)


@pytest.mark.parametrize("argv,msg", [
    (["--mode", "magic"], "invalid choice: 'magic'"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--page-size", "0"], "--page-size must be >= 1"),
    (["--nsa", "foo=1"], "unknown key 'foo'"),
    (["--nsa", "window=abc"], "window must be an integer"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in"),
    (["--precision", "loose"], "invalid choice: 'loose'"),
    (["--refresh-period", "0"], "--refresh-period must be >= 1"),
    (["--mode", "specsa", "--draft", "ngram:2", "--schedule", "fast"], "invalid choice: 'fast'"),
])
def test_bad_values_exit_2(ckpt, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(ckpt), "--prompt", "x", *argv])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_missing_model_exits_1(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_parser_requires_prompt():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "--model", "m"])
    assert e.value.code == 2


def test_precision_knobs_in_json(ckpt, capsys):
    """--json reports the knobs given (summary) and what every step applied (counts)."""
    base = ["generate", "--model", str(ckpt), "--prompt", "abc abc abc abc abc", "--json",
            "--max-new-tokens", "6", "--ignore-eos"]
    assert main(base) == 0
    strict = json.loads(capsys.readouterr().out)
    assert strict["knobs"] == {"precision": "strict", "refresh_period": 1}
    assert strict["knob_counts"] == {"refresh_period": {"1": strict["steps"]}}
    assert main(base + ["--precision", "reuse", "--refresh-period", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == strict["tokens"]   # R=1 is exact
    assert main(base + ["--precision", "reuse", "--refresh-period", "2"]) == 0
    ar = json.loads(capsys.readouterr().out)
    assert ar["knobs"] == {"precision": "reuse", "refresh_period": 2}
    assert ar["knob_counts"]["refresh_period"] == {"2": ar["steps"]}
    # the tiny model has 2 layers: layer 1 reuses layer 0's selection in every forward
    assert ar["selection"] == {"layers_refreshed": ar["steps"], "layers_reused": ar["steps"]}
    spec = base + ["--mode", "specsa", "--draft", "ngram:2", "--tree", "topk=2,depth=2,tokens=4"]
    assert main(spec + ["--precision", "approx_reuse", "--schedule", "shared_index",
                        "--group-size", "2", "--refresh-period", "2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    n = rep["verify_steps"]
    assert rep["knobs"] == {"plan": "fixed", "precision": "approx_reuse",
                            "schedule": "shared_index", "group_size": 2, "refresh_period": 2}
    kc = rep["knob_counts"]
    assert kc["schedule"] == {"shared_index": n} and kc["group_size"] == {"2": n}
    assert kc["refresh_period"] == {"2": n} and sum(kc["tokens"].values()) == n
    assert main(spec + ["--precision", "reuse", "--refresh-period", "2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tokens"] == ar["tokens"]      # speculation is lossless for the model as run
    assert rep["knobs"]["schedule"] is None and rep["knob_counts"]["schedule"] == {
        "exact_merged": rep["verify_steps"]}


@pytest.mark.parametrize("precision", ["strict", "reuse", "approx", "approx_reuse"])
def test_plan_auto_applies_every_knob_inside_the_class(ckpt, capsys, tmp_path, precision):
    """--plan auto with a profile where shared_index and refresh period 4 are fastest: the
    knobs the planner picks reach the forwards (knob_counts), never outside --precision."""
    from test_planner import make_profile

    from specsa.orchestrator import PRECISION_RULES, save_profile
    from specsa.orchestrator.planner import knobs_error
    from specsa.config import PrecisionClass, Schedule

    prof = tmp_path / "p.json"
    save_profile(make_profile(shared=0.3, reuse_gain=0.6, draft_step=0.01), prof)
    assert main(["generate", "--model", str(ckpt), "--prompt", "abc abc abc abc abc abc",
                 "--json", "--max-new-tokens", "12", "--ignore-eos", "--mode", "specsa",
                 "--draft", "ngram:2", "--plan", "auto", "--profile", str(prof),
                 "--precision", precision]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["knobs"] == {"plan": "auto", "precision": precision}
    kc = rep["knob_counts"]
    cls = PrecisionClass(precision)
    schedules, reuse = PRECISION_RULES[cls]
    for sched in kc["schedule"]:
        for r in kc["refresh_period"]:
            assert knobs_error(cls, Schedule(sched), int(r)) is None
    assert set(kc["refresh_period"]) == ({"4"} if reuse else {"1"})
    if Schedule.SHARED_INDEX in schedules:
        assert "shared_index" in kc["schedule"]
    assert sum(kc["speculate"].values()) == rep["verify_steps"]
