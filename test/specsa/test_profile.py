"""Latency profiles: JSON round trip, interpolation, nearest-value lookup, validation errors."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from specsa.config import Schedule, Traversal
from specsa.orchestrator import (Profile, ProfileError, load_profile, match_profile, save_profile,
                                 shape_key)

REPO = Path(__file__).resolve().parents[2]
CTX = (1024, 4096, 16384)
TOK = (2, 4, 8, 16)


def _ms(ctx, t, sched="independent", c=1, r=1, b=1):
    # bilinear in (log2 ctx, log2 T) plus a cross term: bilinear interpolation is exact on it
    x, y = math.log2(ctx), math.log2(t)
    s = {"independent": 1.0, "exact_merged": 0.8, "shared_index": 0.6}[sched]
    return s * (1.0 + 0.5 * x + 0.25 * y + 0.1 * x * y) * (1 + 0.1 * math.log2(b)) / (1 + 0.05 * c) \
        * (1.0 - 0.1 * (1 - 1 / r))


def profile_dict(groups=(2, 4), periods=(1, 2), batches=(1, 8)) -> dict:
    verify = []
    for trav, scheds in (("chain", ("independent", "exact_merged")),
                         ("bfs", ("independent", "exact_merged", "shared_index"))):
        for sched in scheds:
            for c in ((1,) if sched == "independent" else groups):
                for r in periods:
                    for b in batches:
                        for ctx in CTX:
                            for t in TOK:
                                verify.append(dict(context=ctx, tokens=t, traversal=trav,
                                                   schedule=sched, group_size=c, refresh_period=r,
                                                   batch=b, ms=_ms(ctx, t, sched, c, r, b)))
    return {"schema": "specsa.profile/1", "gpu": "synthetic",
            "model": {"name": "toy", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                      "num_kv_heads": 2, "head_dim": 16, "vocab_size": 512, "nsa": {"block": 8}},
            "metadata": {"source": "test"},
            "decode": [{"context": c, "batch": b, "ms": 0.5 * math.log2(c) * b ** 0.5}
                       for c in CTX for b in batches],
            "draft": [{"name": "self:1", "step_ms": 0.2, "token_ms": 0.01}],
            "verify": verify}


def test_round_trip(tmp_path):
    prof = Profile.from_dict(profile_dict())
    path = save_profile(prof, tmp_path / "gpu" / "toy.json")
    again = load_profile(path)
    assert again == prof
    assert again.to_dict() == prof.to_dict()
    assert again.schedules() == (Schedule.INDEPENDENT, Schedule.EXACT_MERGED, Schedule.SHARED_INDEX)
    assert again.group_sizes(Schedule.EXACT_MERGED) == (2, 4)
    assert again.refresh_periods(Schedule.INDEPENDENT) == (1, 2)
    assert again.token_range() == (2, 16)


@pytest.mark.parametrize("ctx,t", [
    pytest.param(1024, 2, id="corner"), pytest.param(16384, 16, id="far-corner"),
    pytest.param(3000, 5, id="interior"), pytest.param(2048, 3, id="log-midpoints"),
    pytest.param(9000, 11, id="interior-2"), pytest.param(4096, 7, id="on-ctx-line")])
def test_interpolation_is_exact_on_bilinear_log_latency(ctx, t):
    prof = Profile.from_dict(profile_dict())
    for sched, trav, c in (("independent", Traversal.CHAIN, 1), ("exact_merged", Traversal.BFS, 4)):
        got = prof.verify_ms(ctx, t, Schedule(sched), trav, c, 1, 1)
        assert got == pytest.approx(_ms(ctx, t, sched, c), rel=1e-12)


def test_interpolation_clamps_outside_measured_range():
    prof = Profile.from_dict(profile_dict())
    lo = prof.verify_ms(1024, 2, Schedule.INDEPENDENT, Traversal.CHAIN)
    assert prof.verify_ms(10, 1, Schedule.INDEPENDENT, Traversal.CHAIN) == lo
    hi = prof.verify_ms(16384, 16, Schedule.INDEPENDENT, Traversal.CHAIN)
    assert prof.verify_ms(1 << 20, 64, Schedule.INDEPENDENT, Traversal.CHAIN) == hi
    # decode: log-linear in context between measured points
    assert prof.decode_ms(2048, 1) == pytest.approx(0.5 * 11, rel=1e-12)
    assert prof.decode_ms(8192, 8) == pytest.approx(0.5 * 13 * 8 ** 0.5, rel=1e-12)
    assert prof.decode_ms(1 << 20, 1) == pytest.approx(0.5 * 14, rel=1e-12)


def test_nearest_for_discrete_knobs():
    prof = Profile.from_dict(profile_dict(groups=(2, 8), periods=(1, 4), batches=(1, 8)))
    q = lambda c=2, r=1, b=1: prof.verify_ms(4096, 4, Schedule.EXACT_MERGED, Traversal.BFS, c, r, b)
    assert q(c=3) == q(c=2)                     # log2 distance 0.58 vs 1.42
    assert q(c=5) == q(c=8)
    assert q(c=4) == q(c=2)                     # tie in log2 distance: the smaller
    assert q(r=2) == q(r=1) and q(r=3) == q(r=4)
    assert q(b=2) == q(b=1) and q(b=6) == q(b=8)
    assert q(c=8) != q(c=2)


def test_traversal_fallback_only_between_tree_orders():
    prof = Profile.from_dict(profile_dict())
    bfs = prof.verify_ms(4096, 4, Schedule.EXACT_MERGED, Traversal.BFS, 2)
    assert prof.verify_ms(4096, 4, Schedule.EXACT_MERGED, Traversal.DFS, 2) == bfs
    with pytest.raises(ProfileError, match="shared_index with traversal chain"):
        prof.verify_ms(4096, 4, Schedule.SHARED_INDEX, Traversal.CHAIN, 2)


def _mutate(fn):
    d = profile_dict(groups=(2,), periods=(1,), batches=(1,))
    fn(d)
    return d


BAD = [
    pytest.param(lambda d: d.update(schema="other/9"), "schema must be", id="schema"),
    pytest.param(lambda d: d.pop("gpu"), "gpu must be", id="no-gpu"),
    pytest.param(lambda d: d["model"].pop("num_layers"), r"model\.num_layers must be", id="model-field"),
    pytest.param(lambda d: d["verify"][3].update(ms=-1.0), r"verify\[3\]\.ms must be", id="negative-ms"),
    pytest.param(lambda d: d["verify"][0].update(ms=float("nan")), r"verify\[0\]\.ms", id="nan-ms"),
    pytest.param(lambda d: d["verify"][5].update(schedule="magic"),
                 r"verify\[5\]\.schedule: unknown value 'magic'", id="bad-schedule"),
    pytest.param(lambda d: d["verify"][2].update(traversal=None), r"verify\[2\]\.traversal", id="bad-traversal"),
    pytest.param(lambda d: d["verify"][1].update(tokens=0), r"verify\[1\]\.tokens must be an integer >= 1",
                 id="zero-tokens"),
    pytest.param(lambda d: d["verify"][0].update(group_size=4), "group_size must be 1 for schedule independent",
                 id="independent-group"),
    pytest.param(lambda d: d["verify"].pop(7), "not a full context x tokens grid", id="hole"),
    pytest.param(lambda d: d["verify"].append(dict(d["verify"][0])), "duplicates", id="duplicate"),
    pytest.param(lambda d: d.update(decode=[]), "decode must not be empty", id="no-decode"),
    pytest.param(lambda d: d["draft"][0].pop("step_ms"), r"draft\[0\]\.step_ms", id="draft-field"),
    pytest.param(lambda d: d.update(verify={}), "verify must be a list", id="verify-type"),
]


@pytest.mark.parametrize("mutate,msg", BAD)
def test_invalid_profile_names_the_field(mutate, msg):
    with pytest.raises(ProfileError, match=msg):
        Profile.from_dict(_mutate(mutate), "p.json")


def test_invalid_files(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(bad)
    d = profile_dict()
    d["verify"][0]["context"] = "big"
    f = tmp_path / "p.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=r"p\.json: verify\[0\]\.context"):
        load_profile(f)


def test_missing_drafter_is_named():
    prof = Profile.from_dict(profile_dict())
    with pytest.raises(ProfileError, match="no draft cost for drafter 'ngram'.*self:1"):
        prof.draft_cost("ngram")


def test_shipped_profiles_load():
    # configs/profiles/<gpu>/<model>.json and the runtime's <gpu>/runtime/<model>.json
    found = sorted(p for p in (REPO / "configs" / "profiles").rglob("*.json")
                   if p.name != "schema.json")
    assert found, "configs/profiles/<gpu>/<model>.json: no profile shipped"
    for path in found:
        prof = load_profile(path)
        assert prof.metadata and dict(prof.metadata).get("source"), f"{path}: metadata.source"
        lo, hi = prof.token_range()
        s = prof.schedules()[0]
        t = prof.traversals(s)[0]
        assert prof.verify_ms(100, (lo + hi) // 2, s, t) > 0
        assert prof.decode_ms(100) > 0


def test_schema_file_lists_the_fields_the_loader_requires():
    schema = json.loads((REPO / "configs" / "profiles" / "schema.json").read_text())
    entry = schema["properties"]["verify"]["items"]
    assert set(entry["required"]) == set(profile_dict()["verify"][0])
    assert set(schema["properties"]["verify"]["items"]["properties"]["schedule"]["enum"]) == \
        {s.value for s in Schedule}
    d = copy.deepcopy(profile_dict())
    assert set(schema["required"]) <= set(d)


def test_match_profile_by_model_shape(tmp_path):
    d = profile_dict()
    save_profile(Profile.from_dict(d), tmp_path / "a.json")
    m = d["model"]
    want = shape_key(m["num_layers"], m["hidden_size"], m["num_heads"], m["num_kv_heads"],
                     m["head_dim"], m["vocab_size"])
    assert match_profile(tmp_path, want).model.name == m["name"]
    other = dict(d, model=dict(m, name="other", num_layers=m["num_layers"] + 1))
    save_profile(Profile.from_dict(other), tmp_path / "b.json")
    assert match_profile(tmp_path, want).model.name == m["name"]
    assert match_profile(tmp_path, (1, 2, 3, 4, 5, 6)) is None
    assert match_profile(tmp_path / "missing", want) is None
