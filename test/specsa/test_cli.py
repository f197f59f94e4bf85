"""CLI: --json smoke on a tiny model, demo, and usage errors (exit 2)."""
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
                 "--ignore-eos"]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["tokens"]) == 3


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
