"Tests of paper_repro.dllm.bench: the benchmark's files and table, paper-module discovery, the CLI wiring."
import types

import pandas as pd
import pytest
import torch

from paper_repro.cli import CliError, build_parser
import paper_repro.dllm.bench as bench
from paper_repro.core.bench import BenchEntry, Headline, paper_entries
from paper_repro.dllm.bench import DiffusionMethod, builtin_entries, curve_and_setting, dllm_entries, run_dllm_bench
from paper_repro.dllm.core import DecodeConfig, Threshold, load_dllm

torch.set_num_threads(1)


FAKE_HEADLINE = Headline(2.0, "Fake rules speed up decoding", source="nowhere (a test)")


def _fake_paper_module():
    m = types.ModuleType("paper_repro.dllm.fakepaper")
    cfg = DecodeConfig(rule="threshold", threshold=0.8)
    m.bench_methods = lambda model: [
        BenchEntry("Fake rule @tau=0.8", DiffusionMethod(cfg, lambda: Threshold(cfg)), FAKE_HEADLINE),
        BenchEntry("Fake top-2", DiffusionMethod(DecodeConfig(steps=16)))]
    return m


def test_paper_entries_discovery():
    es = paper_entries("dllm", None, DiffusionMethod, modules=[_fake_paper_module(), types.ModuleType("no_hook")])
    assert [curve_and_setting(e.name) for e in es] == [("Fake rule", "tau=0.8"), ("Fake top-2", "-")]
    assert [e.paper for e in es] == ["fakepaper", "fakepaper"] and es[0].paper_headline is FAKE_HEADLINE
    assert es[0].method.make_rule is not None and es[1].method.make_rule is None and es[1].paper_headline is None


def test_paper_entries_reject_what_breaks_the_contract():
    def module(hook):
        m = types.ModuleType("paper_repro.dllm.bad"); m.bench_methods = hook; return m
    with pytest.raises(TypeError, match="bad.bench_methods must return a list of BenchEntry, got dict"):
        paper_entries("dllm", None, DiffusionMethod, modules=[module(lambda model: {"x": DecodeConfig()})])
    with pytest.raises(TypeError, match="returned a DecodeConfig, not a BenchEntry"):
        paper_entries("dllm", None, DiffusionMethod, modules=[module(lambda model: [DecodeConfig()])])
    with pytest.raises(TypeError, match="entry 'x' holds a DecodeConfig; the dllm suite runs DiffusionMethod"):
        paper_entries("dllm", None, DiffusionMethod, modules=[module(lambda model: [BenchEntry("x", DecodeConfig())])])
    with pytest.raises(TypeError, match="must be a DecodeConfig"): DiffusionMethod("topk")
    dup = module(lambda model: [BenchEntry("LLaDA top-k (confidence) @k=1", DiffusionMethod(DecodeConfig()))])
    with pytest.raises(ValueError, match="two benchmark entries are named 'LLaDA top-k \\(confidence\\) @k=1'"):
        dllm_entries("ci", None, modules=[dup])


def test_ccd_and_parallelbench_declare_typed_entries():
    import paper_repro.dllm.ccd as ccd
    import paper_repro.dllm.parallelbench as parallelbench
    es = paper_entries("dllm", None, DiffusionMethod, modules=[ccd, parallelbench])  # neither reads the model
    assert [e.paper for e in es] == ["ccd"] * 4
    assert [e.paper_headline.value if e.paper_headline else None for e in es] == [None, None, 3.48, 3.48]  # CCD-DS only


def test_builtin_entries_cover_every_rule_and_cache():
    ms = [e.method for e in builtin_entries("cpu")]
    assert {m.config.rule for m in ms} == {"topk", "threshold", "factor", "entropy_threshold"}
    assert {m.config.cache for m in ms} == {"none", "prefix", "dual"}
    assert {m.config.score for m in ms} == {"confidence", "margin", "entropy", "random"}
    assert all(e.paper is None and e.paper_headline is None for e in builtin_entries("ci"))


def test_ci_bench_writes_files(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.DLLM_BENCH_CONFIGS, "ci", dict(tasks=("copy", "add"), per_task=2))  # keep the test fast
    table = run_dllm_bench("ci", "cpu", tmp_path, 0, False, model=load_dllm(), modules=[_fake_paper_module()])
    assert {"dllm.csv", "dllm.md", "dllm.png", "dllm.run.json"} <= {p.name for p in tmp_path.iterdir()}
    assert pd.read_csv(tmp_path / "dllm.csv").shape == table.shape
    base = table[(table.rule == "LLaDA top-k (confidence)") & (table.setting == "k=1")].iloc[0]
    assert base["speed-up"] == 1.0 and base.NFE == 32 and base["tokens/step"] == 1.0
    assert "Fake rule" in set(table.rule) and (table.NFE <= 32).all() and table.accuracy.between(0, 1).all()
    thr = table[table.rule == "Fast-dLLM threshold"].iloc[0]
    assert thr.NFE < 32  # parallel decoding takes fewer passes than top-1
    import json
    claims = json.loads((tmp_path / "dllm.claims.json").read_text())
    # the headline-less entry makes no claim; the other gets an exact NFE headline and a bootstrap accuracy ablation
    assert [c["id"] for c in claims] == ["fakepaper_fake_rule_tau_0_8_nfe", "fakepaper_fake_rule_tau_0_8_accuracy"]
    nfe, acc = claims
    assert nfe["kind"] == "headline" and nfe["paper_value"] == 2.0 and nfe["source"] == FAKE_HEADLINE.source
    assert FAKE_HEADLINE.statement in nfe["statement"] and nfe["spread_kind"] == "exact" and nfe["threshold"] == 1.0
    fake = table[table.rule == "Fake rule"].iloc[0]
    assert nfe["our_value"] == pytest.approx(base.NFE / fake.NFE) and nfe["holds"] == (fake.NFE < base.NFE)
    assert acc["kind"] == "ablation" and acc["spread_kind"] == "bootstrap" and acc["threshold"] == -2.0
    assert acc["our_value"] == pytest.approx(100 * (fake.accuracy - base.accuracy), abs=0.1)
    from paper_repro.core.claims import validate_claim
    for c in claims: validate_claim(c)


def test_the_two_suites_take_the_same_leading_arguments():
    import inspect
    from paper_repro.core.bench import run_decoding_bench
    lead = lambda f: [(p.name, p.default, p.kind) for p in inspect.signature(f).parameters.values()][:6]
    assert lead(run_dllm_bench) == lead(run_decoding_bench)
    assert [n for n, *_ in lead(run_dllm_bench)] == ["scale", "device", "out", "seed", "progress", "modules"]


def test_cli_accepts_bench_dllm():
    args = build_parser().parse_args(["bench", "dllm", "--scale", "ci", "--device", "cpu"])
    assert args.suite == "dllm"
    with pytest.raises(CliError, match="dllm"): build_parser().parse_args(["bench", "dllmx"])
