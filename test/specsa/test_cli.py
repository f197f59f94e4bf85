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
    (["--mode", "specsa", "--draft", "ngram:2", "--precision", "approx"],
     "--precision only apply with --plan auto"),
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
