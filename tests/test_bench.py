"""paper_repro.core.bench: the summary arithmetic, method discovery, and CLI errors."""
import pandas as pd
import pytest

from paper_repro.cli import main
from paper_repro.core.bench import BenchModels, _summarise, decoding_methods, hf_generate, redundant_turn
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


def test_methods_include_the_decoding_papers(target, draft_model):
    tok = train_bpe(["abc"], vocab_size=260)
    methods = decoding_methods(BenchModels(target, draft_model, tok))
    assert {"greedy", "SD (draft model)", "CopySpec γ=3", "CopySpec γ=3 + SD"} <= set(methods)
    assert methods["greedy"]([1, 2, 3], 5).tokens == methods["CopySpec γ=3"]([1, 2, 3], 5).tokens


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
