"""Sampled requests on the SGLang CPU harness (SGLANG_PLATFORM=specsa_cpu): a SpecSA server
(tree self-draft) samples from the same distribution as the NSA autoregressive server.

SGLang 0.5.17 verifies sampled draft trees with sgl_kernel's CUDA tree speculative sampling;
on the CPU harness cpu_fallbacks.py supplies a torch version. Each server answers the same
prompt REQS times with max_new_tokens 3 (requests one after another, `--random-seed 0`, so
the runs repeat); per position the token counts of the two servers are compared with a
chi-square test of homogeneity (tokens seen fewer than MIN_BIN times in both runs pooled).
Position 0 comes from prefill, positions 1 and 2 from speculative verification (drafts
accepted or rejected, bonus tokens). The test has power: the same comparison rejects the
SpecSA server at temperature 0.7 against the AR server at 1.0.

The tiny random model's next-token distribution is nearly uniform over 512 tokens; its final
norm weight is scaled by 8 (logits x 8, about 2.2 nats of entropy) so that a few hundred
samples resolve it. Both servers load the same scaled checkpoint.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest

pytest.importorskip("sglang")
stats = pytest.importorskip("scipy.stats")
pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from specsa.sglang_plugin.harness import free_port, launch_server  # noqa: E402

REQS = 400          # requests per server and sampling setting
NEW = 3             # tokens per request: 1 from prefill, 2 from speculative steps
MIN_BIN = 10
ALPHA = 1e-3        # per comparison; the runs are seeded, so the outcome is fixed
SETTINGS = {
    "default": {},                                  # SGLang's defaults: temperature 1.0
    "top_k": {"top_k": 5},
    "top_p": {"temperature": 0.9, "top_p": 0.7},
}



@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from specsa.model.tiny import build_tiny
    d = build_tiny(tmp_path_factory.mktemp("sampling") / "m", kind="llama", seed=0)
    w = load_file(str(d / "model.safetensors"))
    w["model.norm.weight"] = w["model.norm.weight"] * 8.0
    save_file(w, str(d / "model.safetensors"))
    return str(d)


@pytest.fixture(scope="module")
def prompt():
    rng = random.Random(7)
    return [rng.randrange(2, 512) for _ in range(100)]     # longer than the window: sparse


def _sample(srv, prompt, params: dict, n: int = REQS) -> tuple[list[list[int]], list[float]]:
    outs, accept = [], []
    for _ in range(n):
        status, out = srv.post("/generate", {"input_ids": prompt, "sampling_params": {
            "max_new_tokens": NEW, "ignore_eos": True, **params}})
        assert status == 200, (params, status, out)
        assert len(out["output_ids"]) == NEW
        outs.append(out["output_ids"])
        accept.append(out["meta_info"].get("spec_accept_length") or 0.0)
    return outs, accept


@pytest.fixture(scope="module")
def samples(model, prompt):
    """{setting: (AR outputs, SpecSA outputs, SpecSA accept lengths)} plus the power check."""
    res = {}
    with launch_server(model, free_port(), ["--attention-backend", "specsa",
                                            "--random-seed", "0"]) as ar:
        ar_out = {k: _sample(ar, prompt, p)[0] for k, p in SETTINGS.items()}
    args = ["--speculative-algo", "specsa", "--speculative-num-steps", "2",
            "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "4",
            "--random-seed", "0"]
    with launch_server(model, free_port(), args) as spec:
        for k, p in SETTINGS.items():
            out, acc = _sample(spec, prompt, p)
            res[k] = (ar_out[k], out, acc)
        res["power"] = (ar_out["default"], _sample(spec, prompt, {"temperature": 0.7})[0], [])
        assert spec.alive(), spec.log_tail()
    return res


def _homogeneity_p(a: list[int], b: list[int]) -> float:
    ca, cb = Counter(a), Counter(b)
    keep = sorted(t for t in set(ca) | set(cb) if ca[t] + cb[t] >= MIN_BIN)
    rows = [[ca[t] for t in keep] + [sum(v for t, v in ca.items() if t not in keep)],
            [cb[t] for t in keep] + [sum(v for t, v in cb.items() if t not in keep)]]
    cols = [i for i in range(len(rows[0])) if rows[0][i] + rows[1][i] > 0]
    table = [[r[i] for i in cols] for r in rows]
    return float(stats.chi2_contingency(table)[1])


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_specsa_samples_like_the_ar_server(samples, setting):
    ar, spec, accept = samples[setting]
    # speculation really ran: some steps accepted drafts under sampling
    assert max(accept) > 1.0, f"no drafts accepted: {Counter(accept)}"
    for pos in range(NEW):
        p = _homogeneity_p([o[pos] for o in ar], [o[pos] for o in spec])
        print(f"{setting}: token {pos}: chi-square homogeneity p = {p:.3g}")
        assert p > ALPHA, f"{setting}: token {pos} differs from the AR server (p={p:.2e})"
    if setting == "top_k":      # top-k 5: at most 5 distinct tokens per position
        assert all(len({o[pos] for o in spec if o[:pos] == spec[0][:pos]}) <= 5
                   for pos in range(NEW))


def test_the_comparison_has_power(samples):
    ar, spec_cold, _ = samples["power"]
    p = min(_homogeneity_p([o[pos] for o in ar], [o[pos] for o in spec_cold])
            for pos in range(NEW))
    print(f"temperature 0.7 vs 1.0: smallest p = {p:.3g}")
    assert p < ALPHA, f"temperature 0.7 vs 1.0 not detected (p={p:.2e})"
