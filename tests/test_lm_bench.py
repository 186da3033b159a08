"""paper_repro.lm.bench: the context, the method contract, the measurements and the claims ledger."""
import json
import types

import pytest
import torch

from paper_repro.core.bench import BenchEntry, Headline
from paper_repro.core.lm import LMConfig, TransformerLM
from paper_repro.lm import bench as lb


@pytest.fixture
def tiny(monkeypatch):
    "The ci config shrunk to a few steps, so a whole run takes seconds."
    cfg = dict(lb.LM_BENCH_CONFIGS["ci"], d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=32, steps=2,
               val_windows=4, prompt_len=8, new_tokens=4)
    monkeypatch.setitem(lb.LM_BENCH_CONFIGS, "ci", cfg)
    return cfg


def _half(c):
    return c.train_plain(TransformerLM(LMConfig(c.vocab_size, c.d_model, c.n_layers // 2, c.n_heads, c.d_ff)))


def _module(*entries):
    m = types.ModuleType("paper_repro.lm.toy")
    m.bench_methods = lambda ctx: list(entries)
    return m


def test_batches_are_deterministic_and_counted(tiny):
    ctx = lb.make_context("ci")
    a, b = ctx.batch(5), ctx.batch(5)
    assert torch.equal(a, b) and a.shape == (tiny["batch_size"], tiny["seq_len"] + 1)
    assert not torch.equal(a, ctx.batch(6))
    assert ctx.tokens_drawn == 3 * tiny["batch_size"] * tiny["seq_len"]
    with pytest.raises(ValueError, match="step must be an int >= 0"): ctx.batch(-1)


def test_base_is_trained_once(tiny):
    ctx = lb.make_context("ci")
    assert ctx.base() is ctx.base()


def test_a_run_measures_ratios_and_records_the_headline(tiny, tmp_path):
    entry = BenchEntry("half depth", lb.LMBenchMethod(_half), Headline(2.0, "half the cache", "toy", category="kv_reduction"))
    table = lb.run_lm_bench("ci", "cpu", tmp_path, progress=False, modules=[_module(entry)])
    assert list(table.method) == [lb.BASELINE, "half depth"]
    assert table["KV ×"].tolist() == [1.0, 0.5] and table["params ×"].iloc[1] < 1
    assert (tmp_path / "lm.csv").is_file() and (tmp_path / "lm.png").is_file() and (tmp_path / "lm.run.json").is_file()
    (claim,) = json.loads((tmp_path / "lm.claims.json").read_text())
    assert claim["our_value"] == 2.0 and claim["outcome"] == "holds" and claim["paper_value"] == 2.0
    assert claim["id"] == "toy_half_depth_kv_reduction"


def test_a_base_method_starts_from_the_trained_base(tiny, tmp_path):
    seen = {}
    def adapt(c):
        seen["base"] = c.base()
        return c.base()
    entry = BenchEntry("same", lb.LMBenchMethod(adapt, uses_base=True))
    table = lb.run_lm_bench("ci", "cpu", tmp_path, progress=False, modules=[_module(entry)])
    assert table["params ×"].iloc[1] == 1.0 and table["train tok/s"].isna().iloc[1]  # nothing trained on top
    assert isinstance(seen["base"], TransformerLM)


def test_a_decoder_of_the_wrong_shape_is_named(tiny, tmp_path):
    bad = lb.LMBenchMethod(_half, generate=lambda m, p, n: p[:, :1])
    with pytest.raises(ValueError, match=r"broken: generate\(\) must return \[1, 4\] tokens, got \(1, 1\)"):
        lb.run_lm_bench("ci", "cpu", tmp_path, progress=False, modules=[_module(BenchEntry("broken", bad))])
    assert not (tmp_path / "lm.csv").exists()  # a failed run commits nothing


def test_an_unknown_headline_category_is_refused(tiny, tmp_path):
    entry = BenchEntry("half", lb.LMBenchMethod(_half), Headline(2.0, "x", "toy", category="overall"))
    with pytest.raises(ValueError, match="headline category 'overall' is not a measurement of the lm bench; valid: decode_speedup"):
        lb.run_lm_bench("ci", "cpu", tmp_path, progress=False, modules=[_module(entry)])


def test_method_contract_errors():
    with pytest.raises(TypeError, match="LMBenchMethod.generate must be callable"): lb.LMBenchMethod(_half, generate=3)
    with pytest.raises(TypeError, match="has no core LMConfig"): lb.core_kv_bytes_per_token(torch.nn.Linear(2, 2))
    m = TransformerLM(LMConfig(16, 32, 3, 4, 64))
    assert lb.core_kv_bytes_per_token(m) == 2 * 3 * 32 * 4
