"Tests of paper_repro.dllm.bench: the benchmark's files and table, paper-module discovery, the CLI wiring."
import types

import pandas as pd
import pytest
import torch

from paper_repro.cli import CliError, build_parser
import paper_repro.dllm.bench as bench
from paper_repro.dllm.bench import builtin_methods, paper_methods, run_dllm_bench
from paper_repro.dllm.core import DecodeConfig, Threshold, load_dllm

torch.set_num_threads(1)


def _fake_paper_module():
    m = types.ModuleType("paper_repro.dllm.fakepaper")
    m.bench_rules = lambda model: {"Fake rule @tau=0.8": (DecodeConfig(rule="threshold", threshold=0.8),
                                                            lambda: Threshold(DecodeConfig(threshold=0.8))),
                                   "Fake top-2": DecodeConfig(steps=16)}
    return m


def test_paper_methods_discovery():
    ms = paper_methods(None, modules=[_fake_paper_module(), types.ModuleType("no_rules")])
    assert [(m.curve, m.setting) for m in ms] == [("Fake rule", "tau=0.8"), ("Fake top-2", "-")]
    assert ms[0].make_rule is not None and ms[1].make_rule is None
    bad = types.ModuleType("bad"); bad.bench_rules = lambda model: {"x": 3}
    with pytest.raises(ValueError, match="not a DecodeConfig"): paper_methods(None, modules=[bad])


def test_builtin_methods_cover_every_rule_and_cache():
    ms = builtin_methods("cpu")
    assert {m.config.rule for m in ms} == {"topk", "threshold", "factor", "entropy_threshold"}
    assert {m.config.cache for m in ms} == {"none", "prefix", "dual"}
    assert {m.config.score for m in ms} == {"confidence", "margin", "entropy", "random"}


def test_ci_bench_writes_files(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.BENCH_CONFIGS, "ci", dict(tasks=("copy", "add"), per_task=2))  # keep the test fast
    table = run_dllm_bench("ci", device="cpu", out=tmp_path, progress=False, model=load_dllm(),
                           modules=[_fake_paper_module()])
    assert {"dllm.csv", "dllm.md", "dllm.png", "dllm.run.json"} <= {p.name for p in tmp_path.iterdir()}
    assert pd.read_csv(tmp_path / "dllm.csv").shape == table.shape
    base = table[(table.rule == "LLaDA top-k (confidence)") & (table.setting == "k=1")].iloc[0]
    assert base["speed-up"] == 1.0 and base.NFE == 32 and base["tokens/step"] == 1.0
    assert "Fake rule" in set(table.rule) and (table.NFE <= 32).all() and table.accuracy.between(0, 1).all()
    thr = table[table.rule == "Fast-dLLM threshold"].iloc[0]
    assert thr.NFE < 32  # parallel decoding takes fewer passes than top-1


def test_cli_accepts_bench_dllm():
    args = build_parser().parse_args(["bench", "dllm", "--scale", "ci", "--device", "cpu"])
    assert args.suite == "dllm"
    with pytest.raises(CliError, match="dllm"): build_parser().parse_args(["bench", "dllmx"])
