"""paper_repro.core.data: committed corpora, checksums, the manifest, and the BPE tokenizer."""
import re
import shutil

import pytest
from hypothesis import given, settings, strategies as st

from paper_repro.core.data import (BPETokenizer, DataError, data_path, load_code_corpus, load_parallel_corpus,
                                   read_manifest, register_file, sha256_file, train_bpe)
from paper_repro.core.repro import project_root


def test_manifest_checksums_match_committed_files():
    manifest = read_manifest()
    assert {"code_corpus.jsonl.gz", "parallel_corpus.jsonl.gz", "code_tokenizer.json", "code_target.pt",
            "code_draft.pt"} <= set(manifest)
    for name, entry in manifest.items():
        path = data_path(name)
        assert path.stat().st_size == entry["bytes"] and entry["source"] and entry["licence"] and entry["rebuild"]


def test_corpora_load_and_split():
    train, val = load_code_corpus("train"), load_code_corpus("val")
    assert len(train) > 100 and len(val) > 10 and not {r["path"] for r in train} & {r["path"] for r in val}
    fr = load_parallel_corpus("fr")
    assert len(fr) > 1000 and all(r["lang"] == "fr" and r["src"] and r["tgt"] for r in fr)
    with pytest.raises(ValueError, match="unknown language 'xx'"): load_parallel_corpus("xx")
    with pytest.raises(ValueError, match="unknown split"): load_code_corpus("test")


def test_corrupted_and_missing_files_name_the_fix(tmp_path):
    root = tmp_path
    shutil.copytree(project_root() / "data", root / "data")
    target = root / "data" / "code_corpus.jsonl.gz"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"corrupted.*Rebuild it with: python -c"): data_path("code_corpus.jsonl.gz", root)
    target.unlink()
    with pytest.raises(DataError, match=r"missing.*Rebuild it with"): data_path("code_corpus.jsonl.gz", root)
    with pytest.raises(DataError, match="not in data/MANIFEST.json"): data_path("nope.bin", root)


def test_rebuilding_the_code_corpus_is_deterministic(tmp_path):
    from paper_repro.core.data import build_code_corpus
    (tmp_path / "data").mkdir()
    build_code_corpus(root=tmp_path)
    assert sha256_file(tmp_path / "data/code_corpus.jsonl.gz") == read_manifest()["code_corpus.jsonl.gz"]["sha256"]


@pytest.fixture(scope="module")
def small_tok():
    return train_bpe([r["text"] for r in load_code_corpus("train")[:10]], vocab_size=320)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_bpe_round_trips_any_text(small_tok, text):
    assert small_tok.decode(small_tok.encode(text)) == text


def test_bpe_training_is_deterministic_and_serialisable(small_tok):
    again = train_bpe([r["text"] for r in load_code_corpus("train")[:10]], vocab_size=320)
    assert again.merges == small_tok.merges and small_tok.vocab_size == 320
    assert BPETokenizer.from_json(small_tok.to_json()).merges == small_tok.merges
    with pytest.raises(ValueError, match="vocab_size must be at least"): train_bpe(["x"], vocab_size=10)
    with pytest.raises(ValueError, match="unknown special token"): small_tok.special_id("<pad>")


@pytest.mark.parametrize("text, what", [
    (None, "is missing"),
    ("{not json", "is not valid JSON"),
    ('["code_corpus.jsonl.gz"]', "must be a JSON object (file name -> entry), got a list"),
    ('{"code_corpus.jsonl.gz": "abc"}', "entry 'code_corpus.jsonl.gz' must be an object, got str"),
    ('{"code_corpus.jsonl.gz": {"bytes": 10, "rebuild": "x"}}', "entry 'code_corpus.jsonl.gz' has no valid sha256"),
    ('{"code_corpus.jsonl.gz": {"sha256": "12ab"}}', "has no valid sha256 (64 hex digits), got '12ab'"),
    ('{"code_corpus.jsonl.gz": {"sha256": "' + "a" * 64 + '", "bytes": "ten"}}', "malformed 'bytes' or 'rebuild'"),
])
def test_a_broken_manifest_is_one_clear_error(tmp_path, text, what):
    (tmp_path / "data").mkdir()
    if text is not None: (tmp_path / "data/MANIFEST.json").write_text(text)
    restore = "restore the committed one with `git checkout data/MANIFEST.json`"
    with pytest.raises(DataError, match=rf"/data/MANIFEST.json .*{re.escape(what)}.*; {re.escape(restore)}"):
        data_path("code_corpus.jsonl.gz", tmp_path)
    with pytest.raises(DataError, match=re.escape(what)):
        load_code_corpus(root=tmp_path)
    if text is not None:  # registering a file must not overwrite the broken manifest with a one-entry one
        (tmp_path / "data/new.bin").write_bytes(b"x")
        with pytest.raises(DataError, match=re.escape(what)):
            register_file("new.bin", "s", "l", "r", root=tmp_path)
        assert (tmp_path / "data/MANIFEST.json").read_text() == text


def test_the_first_registration_starts_a_manifest(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/new.bin").write_bytes(b"x")
    entry = register_file("new.bin", "s", "l", "r", root=tmp_path)
    assert read_manifest(tmp_path) == {"new.bin": entry} and data_path("new.bin", tmp_path).read_bytes() == b"x"


def test_read_manifest_reads_a_missing_one_as_empty_unless_asked(tmp_path):
    (tmp_path / "data").mkdir()
    assert read_manifest(tmp_path) == {}
    with pytest.raises(DataError, match="MANIFEST.json is missing; restore"): read_manifest(tmp_path, missing_ok=False)
