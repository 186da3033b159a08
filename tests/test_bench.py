"""paper_repro.core.bench: the summary arithmetic, method discovery, and CLI errors."""
import importlib
import json
import types

import pandas as pd
import pytest

from paper_repro.cli import main
from paper_repro.core.bench import (BenchEntry, BenchModels, DrafterMethod, Headline, _summarise, decoding_entries,
                                    hf_generate, paper_entries, record_bench_claims, redundant_turn)
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
    assert all(isinstance(e.paper_headline, Headline) for e in entries.values() if e.paper)


# the headlines each paper module declares: the ledger's numbers, statements and categories before the contract moved
# them out of core.bench (a change here changes results/*/bench/decoding.claims.json)
HEADLINES = {
    "copyspec": (3.08, "CopySpec speeds up second turns that repeat the first (MT-Redundant turn 2: 3.08×)", "redundant code"),
    "token_recycling": (2.22, "Token Recycling speeds up decoding (Spec-Bench: 2.22×)", "overall"),
    "aded": (2.5, "ADED speeds up decoding (up to 2.5×)", "overall"),
    "ppd": (2.49, "Parallel prompt decoding speeds up decoding (up to 2.49×)", "overall"),
    "pearl": (3.87, "PEARL speeds up decoding over autoregressive decoding (up to 3.87×, HumanEval)", "code"),
    "lexical_units": (1.30, "Lexical unit decoding speeds up code generation by 30%", "code"),
    "hidden_transfer": (None, "Hidden transfer speeds up decoding (more than Medusa and self-speculative)", "overall"),
}


@pytest.mark.parametrize("slug", sorted(HEADLINES))
def test_each_paper_declares_its_headline_in_its_module(slug):
    h = importlib.import_module(f"paper_repro.decoding.{slug}").BENCH_HEADLINE
    assert (h.value, h.statement, h.category) == HEADLINES[slug] and h.unit == "×" and h.source


def test_headline_and_entry_validation():
    with pytest.raises(ValueError, match="Headline.value=nan"): Headline(float("nan"), "s", "src")
    with pytest.raises(ValueError, match="Headline.value='3x'"): Headline("3x", "s", "src")
    with pytest.raises(ValueError, match="Headline.source=''"): Headline(2.0, "s", "")
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


def _ledger(tmp_path, target, headline):
    entries = decoding_entries(BenchModels(target, None, None), modules=[_fake_decoding_module(target, headline)])
    r = []
    for task, cat in ((0, "code"), (1, "multilingual")):
        for e in entries[:1] + entries[2:]:  # greedy and the fake paper's entry
            res = e.method([1, 2, 3], 4)
            r.append(dict(task=task, category=cat, method=e.name, tokens=res.tokens, new=res.new_tokens, wall_s=0.1,
                          calls=len(res.steps), lossless=res.lossless))
    run = start_run("bench", scale="ci", device="cpu", out_dir=tmp_path)
    record_bench_claims(run, _summarise(pd.DataFrame(r)), entries, "a test")
    run.finish()  # results land all at once, when the run finishes
    return json.loads((tmp_path / "decoding.claims.json").read_text())


def test_ledger_sets_the_paper_headline_beside_ours(tmp_path, target):
    claims = _ledger(tmp_path, target, Headline(2.0, "Fake speeds up code", "a test", category="code"))
    assert [c["id"] for c in claims] == ["fakepaper_fake_greedy_speedup", "fakepaper_fake_greedy_lossless"]
    assert claims[0]["paper_value"] == 2.0 and claims[0]["metric"] == "speed-up over our greedy, code tasks"
    assert claims[1]["holds"] and claims[1]["our_value"] == 1.0


def test_ledger_without_a_headline_records_only_losslessness(tmp_path, target):
    assert [c["id"] for c in _ledger(tmp_path, target, None)] == ["fakepaper_fake_greedy_lossless"]
    with pytest.raises(ValueError, match="names category 'math'; valid: code, multilingual, overall"):
        _ledger(tmp_path, target, Headline(2.0, "s", "src", category="math"))


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
