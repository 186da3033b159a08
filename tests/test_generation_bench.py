"""The generation benchmark's harness on toy rows: references, ratios, ledger categories, bad input."""
import json
import types

import pytest
import torch

from paper_repro.core.bench import BenchEntry, Headline
from paper_repro.generation import bench as gb


def _sampler(work: int, value: float | None = None):
    def sample(z, y, g):
        x = z
        for _ in range(work): x = torch.tanh(torch.nn.functional.conv2d(x.repeat(1, 4, 1, 1), torch.ones(1, 4, 5, 5) / 100, padding=2))
        return (x * 0 + 0.5) if value is None else torch.full_like(z, value)
    return sample


def _module(*entries):
    m = types.ModuleType("paper_repro.generation.toy")
    m.bench_methods = lambda ctx: list(entries)
    return m


def test_speedup_and_cost_ratio_ledger(tmp_path):
    slow = BenchEntry("slow", gb.GenBenchMethod(_sampler(60), "flow", 4))
    fast = BenchEntry("fast", gb.GenBenchMethod(_sampler(15), "flow", 1, "slow"),
                      Headline(4.0, "four times faster", "toy", category="speedup"))
    costly = BenchEntry("costly", gb.GenBenchMethod(_sampler(60), "flow", 1, "fast"),
                        Headline(1.0, "about as cheap as fast", "toy", unit="fast costs", category="cost_ratio"))
    table = gb.run_generation_bench("ci", "cpu", tmp_path, modules=[_module(slow, fast, costly)], suite_rows=False)
    assert list(table.method) == ["slow", "fast", "costly"]
    assert table["speed-up ×"].iloc[1] > 1.5 and table["speed-up ×"].iloc[2] < 0.7
    claims = {c["id"]: c for c in json.loads((tmp_path / "generation.claims.json").read_text())}
    assert claims["toy_fast_speedup"]["our_value"] > 1.5 and claims["toy_fast_speedup"]["higher_is_better"]
    cost = claims["toy_costly_cost_ratio"]
    assert cost["our_value"] > 1.5 and cost["threshold"] == 2.0 and not cost["higher_is_better"]
    assert (tmp_path / "generation.png").is_file() and (tmp_path / "generation.run.json").is_file()


def test_bad_rows_are_refused():
    ctx = gb.make_context("ci")
    lost = BenchEntry("lost", gb.GenBenchMethod(_sampler(1), "flow", 1, "nowhere"))
    with pytest.raises(ValueError, match="not rows"):
        gb.generation_entries(ctx, [_module(lost)], suite_rows=False)
    wrong = BenchEntry("wrong", gb.GenBenchMethod(lambda z, y, g: z[:, :, :8], "flow", 1))
    with pytest.raises(ValueError, match=r"must return \[3, 1, 16, 16\]"):
        gb.sample_checked(wrong, ctx, 3)
    out_of_range = BenchEntry("range", gb.GenBenchMethod(_sampler(0, value=2.0), "flow", 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gb.sample_checked(out_of_range, ctx, 3)
    with pytest.raises(ValueError, match="kind="):
        gb.GenBenchMethod(_sampler(1), "GAN", 1)


def test_inputs_are_shared_and_fixed():
    a, b = gb.make_context("ci", seed=1), gb.make_context("ci", seed=1)
    assert torch.equal(a.inputs(5)[0], b.inputs(5)[0]) and not torch.equal(a.inputs(5)[0], gb.make_context("ci").inputs(5)[0])
    assert a.generator(2).initial_seed() == b.generator(2).initial_seed() != a.generator(3).initial_seed()
