"""core.bench_core: the greedy baseline against HF and the roofline, and the verify-cost curve."""
import json

import pandas as pd
import pytest
import torch

from paper_repro.core import bench_core as bc
from paper_repro.core.lm import LMConfig, TransformerLM


def tiny():
    torch.manual_seed(0)
    return TransformerLM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64)).eval()


def test_step_bytes_counts_weights_and_cache():
    m = tiny()
    weights = sum(p.numel() for p in m.parameters()) * 4
    assert bc.step_bytes(m, 1, 0) == weights
    assert bc.step_bytes(m, 3, 5) - weights == 2 * 2 * 3 * 5 * 4 * 8 * 4   # k and v, layers, batch, ctx, heads, hd, fp32


def test_bench_model_names_and_shapes():
    with pytest.raises(ValueError, match="unknown bench model 'gpt2'; valid: zoo, llama-20M"):
        bc.bench_model("gpt2", torch.device("cpu"))
    n = sum(p.numel() for p in bc.bench_model("llama-20M", torch.device("cpu")).parameters())
    assert 18e6 < n < 22e6


def test_verify_cost_curve_and_interpolation():
    with pytest.raises(ValueError, match="must include 1"):
        bc.verify_cost(tiny(), [2, 4], context=4, reps=1)
    curve = bc.verify_cost(tiny(), [1, 2, 16], context=4, reps=2)
    assert list(curve.tokens) == [1, 2, 16] and curve.cost[0] == 1.0 and (curve.seconds > 0).all()
    assert bc.cost_at(pd.DataFrame(dict(tokens=[1, 3], cost=[1.0, 2.0])), 2) == 1.5


def test_time_greedy_compares_same_tokens_and_restores_fused_flag():
    m = tiny()
    df = bc.time_greedy(m, 1, 5, 3, repeats=2, hf=True)
    assert set(df.method) == set(bc.GREEDY_METHODS) and len(df) == 10
    assert df.same.all()                 # HF generate decodes the same greedy tokens from the same weights
    assert m.decode_fused is True and (df.tokens_per_s > 0).all()


def test_run_core_bench_writes_its_set(tmp_path, monkeypatch):
    monkeypatch.setitem(bc.CORE_BENCH_CONFIGS, "ci", dict(models=["zoo"], batches=[1, 2], batched_models=["zoo"], prompt_tokens=4,
                                                          new_tokens=2, repeats=2, verify_sizes=[1, 2],
                                                          verify_context=4, verify_reps=1))
    # the zoo's place taken by a small random model
    monkeypatch.setattr(bc, "bench_model", lambda name, dev: tiny())
    table = bc.run_core_bench("ci", out=tmp_path, progress=False, hf=False)
    assert {"core.csv", "core.md", "core.png", "core.verify.csv", "core.claims.json", "core.run.json"} <= {p.name for p in tmp_path.iterdir()}
    assert set(table.batch) == {1, 2} and (table["% of roofline"] > 0).all()
    claims = {c["id"]: c for c in json.loads((tmp_path / "core.claims.json").read_text())}
    assert claims["fused_tokens_equal_eager"]["holds"] and "fused_over_eager_greedy" in claims
