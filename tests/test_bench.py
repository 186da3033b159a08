"""paper_repro.core.bench: the summary arithmetic, method discovery, and CLI errors."""
import importlib
import json
import types

import pandas as pd
import pytest

from paper_repro.cli import main
from paper_repro.core.bench import (BenchEntry, BenchModels, DrafterMethod, Headline, _summarise, decoding_entries,
                                    hf_generate, paper_entries, record_bench_claims, redundant_turn, repeat_speedups,
                                    with_intervals)
from paper_repro.core.claims import validate_claim
from paper_repro.core.repro import start_run
from paper_repro.core.data import train_bpe
from paper_repro.core.lm import to_hf_llama


def rows():
    r = []
    for task, cat in ((0, "code"), (1, "multilingual")):
        r.append(dict(task=task, category=cat, method="greedy", tokens=[1, 2, 3, 4], new=4, wall_s=2.0, calls=4, lossless=True))
        r.append(dict(task=task, category=cat, method="fast", tokens=[1, 2, 3, 4], new=4, wall_s=1.0, calls=2, lossless=True))
        r.append(dict(task=task, category=cat, method="broken", tokens=[1, 2, 9, 9], new=4, wall_s=0.5, calls=1, lossless=True))
        r.append(dict(task=task, category=cat, method="lossy", tokens=[1, 9, 9, 9], new=4, wall_s=0.5, calls=1, lossless=False))
    return pd.DataFrame(r)


def test_summary_speedup_mat_and_lossless_check():
    s = _summarise(rows()).set_index(["category", "method"])
    assert s.loc[("code", "fast"), "speedup"] == pytest.approx(2.0) and s.loc[("code", "fast"), "MAT"] == 2.0
    assert s.loc[("overall", "fast"), "speedup"] == pytest.approx(2.0)
    assert s.loc[("code", "broken"), "lossless check"] == "MISMATCH"
    assert s.loc[("code", "lossy"), "lossless check"] == "n/a (lossy)"
    assert s.loc[("code", "fast"), "lossless check"] == "ok"


def test_entries_include_the_decoding_papers(target, draft_model):
    tok = train_bpe(["abc"], vocab_size=260)
    entries = {e.name: e for e in decoding_entries(BenchModels(target, draft_model, tok))}
    assert {"greedy", "SD (draft model)", "CopySpec γ=3", "CopySpec γ=3 + SD"} <= set(entries)
    assert entries["greedy"].paper is None and entries["CopySpec γ=3"].paper == "copyspec"
    assert entries["greedy"].method([1, 2, 3], 5).tokens == entries["CopySpec γ=3"].method([1, 2, 3], 5).tokens
    papers = {e.paper for e in entries.values()} - {None}
    assert papers == {"copyspec", "token_recycling", "aded", "ppd", "pearl", "lexical_units", "hidden_transfer"}
    assert all(e.paper_headline is None or isinstance(e.paper_headline, Headline) for e in entries.values())
    assert entries["CopySpec γ=3"].paper_headline is not None and entries["CopySpec γ=3 + SD"].paper_headline is None


CATEGORIES = {"code", "redundant code", "multilingual", "context recall", "overall"}
DECODING = ("copyspec", "token_recycling", "aded", "ppd", "pearl", "lexical_units", "hidden_transfer")


@pytest.mark.parametrize("slug", DECODING)
def test_each_paper_declares_its_headline_in_its_module(slug):
    "A headline (or None) lives in the paper's module, with the paper's number, its source and a benchmark category."
    h = importlib.import_module(f"paper_repro.decoding.{slug}").BENCH_HEADLINE
    if h is None: return
    assert isinstance(h, Headline) and h.value > 0 and h.source.strip() and h.category in CATEGORIES and h.unit == "×"


# the headlines of this branch's papers, read in the papers or their official repositories (a change here changes
# results/*/bench/decoding.claims.json)
CHECKED = {"copyspec": (3.08, "redundant code"), "token_recycling": (2.03, "overall"), "aded": (2.5, "overall")}


@pytest.mark.parametrize("slug", sorted(CHECKED))
def test_checked_headlines(slug):
    h = importlib.import_module(f"paper_repro.decoding.{slug}").BENCH_HEADLINE
    assert (h.value, h.category, h.checked) == (*CHECKED[slug], True)


def test_headline_and_entry_validation():
    with pytest.raises(ValueError, match="Headline.value=nan"): Headline(float("nan"), "s", "src")
    with pytest.raises(ValueError, match="Headline.value='3x'"): Headline("3x", "s", "src")
    with pytest.raises(ValueError, match="Headline.source=''"): Headline(2.0, "s", "")
    with pytest.raises(ValueError, match="Headline.checked='yes'"): Headline(2.0, "s", "src", checked="yes")
    with pytest.raises(ValueError, match="BenchEntry.name=''"): BenchEntry("", print)
    with pytest.raises(TypeError, match="paper_headline must be a Headline"): BenchEntry("x", print, (2.0, "s"))


def _fake_decoding_module(target, headline):
    m = types.ModuleType("paper_repro.decoding.fakepaper")
    m.bench_methods = lambda models: [BenchEntry("fake greedy", DrafterMethod(models.target, lambda: None), headline)]
    return m


def test_paper_entries_check_the_decoding_method_type(target):
    bad = types.ModuleType("paper_repro.decoding.bad")
    bad.bench_methods = lambda models: [BenchEntry("not callable", 3)]
    with pytest.raises(TypeError, match="entry 'not callable' holds a int; the decoding suite runs Callable"):
        paper_entries("decoding", None, __import__("collections.abc").abc.Callable, modules=[bad])
    dup = types.ModuleType("paper_repro.decoding.dup")
    dup.bench_methods = lambda models: [BenchEntry("greedy", DrafterMethod(models.target, lambda: None))]
    with pytest.raises(ValueError, match="two benchmark entries are named 'greedy' \\(from the suite and dup\\)"):
        decoding_entries(BenchModels(target, None, None), modules=[dup])


def _ledger(tmp_path, target, headline, walls=(0.2, 0.1, 0.1), repeats=3):
    "The ledger of a fake paper whose method takes `walls` (greedy's, the fake's) seconds per task in each repeat."
    entries = decoding_entries(BenchModels(target, None, None), modules=[_fake_decoding_module(target, headline)])
    r = []
    for rep in range(repeats):
        for task, cat in ((0, "code"), (1, "multilingual")):
            for e, wall in zip(entries[:1] + entries[2:], (walls[0], walls[1 + rep % (len(walls) - 1)])):
                res = e.method([1, 2, 3], 4)
                r.append(dict(repeat=rep, task=task, category=cat, method=e.name, tokens=res.tokens,
                              new=res.new_tokens, wall_s=wall, calls=len(res.steps), lossless=res.lossless))
    rows = pd.DataFrame(r)
    run = start_run("bench", scale="ci", device="cpu", out_dir=tmp_path)
    record_bench_claims(run, _summarise(rows), entries, "a test", repeat_speedups(rows))
    run.finish()  # results land all at once, when the run finishes
    return json.loads((tmp_path / "decoding.claims.json").read_text())


def test_ledger_sets_the_paper_headline_beside_ours(tmp_path, target):
    claims = _ledger(tmp_path, target, Headline(2.0, "Fake speeds up code", "a test, Table 1", checked=True,
                                                 category="code"), walls=(0.2, 0.1, 0.11, 0.09))
    assert [c["id"] for c in claims] == ["fakepaper_fake_greedy_speedup", "fakepaper_fake_greedy_lossless"]
    head, inv = claims
    assert head["kind"] == "headline" and head["paper_value"] == 2.0 and head["source"] == "a test, Table 1"
    assert head["source_checked"] and head["metric"] == "speed-up over our greedy, code tasks"
    assert head["spread_kind"] == "repeats" and head["n"] == 3 and head["threshold"] == 1.0
    assert head["interval"][0] > 1 and head["outcome"] == "holds" and "over our greedy" in head["statement"]
    assert inv["kind"] == "invariant" and inv["must_hold"] and inv["holds"] and inv["our_value"] == 1.0
    for c in claims: validate_claim(c)


def test_a_speedup_within_its_spread_is_inconclusive_and_a_slowdown_fails(tmp_path, target):
    h = Headline(2.0, "Fake speeds up code", "a test", category="code")
    noisy = _ledger(tmp_path / "a", target, h, walls=(0.2, 0.1, 0.3, 0.15))[0]   # 2×, 0.67×, 1.33×
    assert noisy["outcome"] == "inconclusive" and noisy["interval"][0] < 1 < noisy["interval"][1]
    slow = _ledger(tmp_path / "b", target, h, walls=(0.1, 0.2, 0.21, 0.19))[0]
    assert slow["outcome"] == "fails" and slow["interval"][1] < 1 and not slow["holds"]


def test_ledger_without_a_headline_records_only_losslessness(tmp_path, target):
    assert [c["id"] for c in _ledger(tmp_path, target, None)] == ["fakepaper_fake_greedy_lossless"]
    with pytest.raises(ValueError, match="names category 'math'; valid: code, multilingual, overall"):
        _ledger(tmp_path, target, Headline(2.0, "s", "src", category="math"))


def test_speedup_intervals_over_repeats():
    r = rows()
    two = pd.concat([r.assign(repeat=0), r.assign(repeat=1, wall_s=[w * (1.25 if m == "fast" else 1) for w, m in
                                                                    zip(r.wall_s, r.method)])])
    sp = repeat_speedups(two).set_index(["repeat", "category", "method"]).speedup
    assert sp[(0, "code", "fast")] == pytest.approx(2.0) and sp[(1, "code", "fast")] == pytest.approx(1.6)
    s = with_intervals(_summarise(two), repeat_speedups(two)).set_index(["category", "method"])
    assert s.loc[("code", "fast"), "speedup"] == pytest.approx(1.8) and s.loc[("code", "fast"), "repeats"] == 2
    assert s.loc[("code", "fast"), "speedup_low"] < 1.8 < s.loc[("code", "fast"), "speedup_high"]
    assert s.loc[("code", "broken"), "lossless check"] == "MISMATCH"   # the check survives the repeats


def test_hf_generate_counts_calls(target):
    toks, wall, calls = hf_generate(to_hf_llama(target), [1, 2, 3], 6)
    assert len(toks) == 6 and wall > 0 and calls == 5  # prefill yields the first token


def test_redundant_turn_renames():
    tok = train_bpe(["def foo(x):\n    return x\n"], vocab_size=270)
    text = tok.decode(redundant_turn(tok, tok.encode("def foo(x):"), "foo", 2))
    assert "renamed to foo_v2" in text and text.endswith("def foo_v2(x):")


def test_cli_bench_rejects_bad_scale_and_suite(capsys):
    assert main(["bench", "decoding", "--scale", "huge"]) == 2
    assert "valid scales" in capsys.readouterr().err
    assert main(["bench", "vision"]) == 2


def test_summary_keeps_fed_nan_for_rows_without_it_and_ideal_follows():
    import numpy as np
    import pandas as pd
    from paper_repro.core.bench import _summarise, with_ideal
    row = dict(repeat=0, task=0, category="c", tokens=[1, 2], new=2, wall_s=1.0, calls=2, lossless=True)
    rows = pd.DataFrame([dict(row, method="greedy", fed=2), dict(row, method="HF greedy")])
    s = with_ideal(_summarise(rows), pd.DataFrame(dict(tokens=[1, 8], cost=[1.0, 2.0])))
    by = s[s.category == "overall"].set_index("method")
    assert by.loc["greedy", "ideal"] == 1.0 and np.isnan(by.loc["HF greedy", "fed_per_call"])
    assert np.isnan(by.loc["HF greedy", "ideal"])
