"""paper_repro.core.data: committed corpora, checksums, the manifest, and the BPE tokenizer."""
import hashlib
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


# --- where the data folder is: PAPER_REPRO_DATA, else the checkout's data/, else the installed package's -------------

import importlib.util
import json
from pathlib import Path

import paper_repro.core.data as data_mod
import paper_repro.core.repro as repro_mod
from paper_repro.core.data import (DATA_ENV, ReadOnlyDataError, copy_data, data_dir, data_source, shipped_files,
                                   writable_data_dir, write_jsonl_gz)
from paper_repro.core.repro import atomic_write, checkout_root


def _data_folder(folder: Path, payload: bytes = b"shipped") -> Path:
    "A data folder with one registered file, `a.bin`."
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(payload)
    entry = dict(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload), source="s", licence="l", rebuild="r")
    (folder / "MANIFEST.json").write_text(json.dumps({"a.bin": entry}))
    return folder


@pytest.fixture
def installed(tmp_path, monkeypatch):
    "The package as a wheel would run: no checkout, its data in site-packages/paper_repro/_data (here: a tmp folder)."
    shipped = _data_folder(tmp_path / "site-packages" / "paper_repro" / "_data")
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setattr(data_mod, "checkout_root", lambda: None)
    monkeypatch.setattr(data_mod, "package_data_dir", lambda: shipped)
    monkeypatch.setattr(repro_mod, "package_data_dir", lambda: shipped)  # what atomic_write refuses to write into
    return shipped


def test_from_the_checkout_the_data_is_its_data_folder(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert checkout_root() == project_root() and data_source() == (project_root() / "data", "checkout")
    assert writable_data_dir() == data_dir() == project_root() / "data"
    monkeypatch.setenv(DATA_ENV, "")  # empty is unset
    assert data_source()[1] == "checkout"


def test_installed_the_data_is_the_packages_and_is_checked(installed):
    assert data_source() == (installed, "package") and data_path("a.bin") == installed / "a.bin"
    (installed / "a.bin").write_bytes(b"tampered")
    with pytest.raises(DataError, match=r"a.bin is corrupted.*To restore it, reinstall the package"): data_path("a.bin")
    with pytest.raises(DataError, match=r"'nope' is not in .*_data/MANIFEST.json \(the data the installed package"):
        data_path("nope")
    (installed / "MANIFEST.json").unlink()
    with pytest.raises(DataError, match=r"MANIFEST.json is missing; reinstall the package"): data_path("a.bin")


def test_the_environment_variable_comes_first_and_a_root_before_it(installed, tmp_path, monkeypatch):
    mine = _data_folder(tmp_path / "mine", b"mine")
    monkeypatch.setenv(DATA_ENV, str(mine))
    assert data_source() == (mine, DATA_ENV) and data_path("a.bin").read_bytes() == b"mine"
    monkeypatch.setattr(data_mod, "checkout_root", lambda: tmp_path / "checkout")  # before a checkout, too
    assert data_source() == (mine, DATA_ENV)
    assert data_source(tmp_path / "proj") == (tmp_path / "proj" / "data", "root")  # an explicit root wins
    monkeypatch.delenv(DATA_ENV)
    assert data_source() == (tmp_path / "checkout" / "data", "checkout")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(DataError, match=rf"MANIFEST.json is missing; seed .*empty with .*copy_data.*or unset {DATA_ENV}"):
        data_path("a.bin")


def test_writes_never_go_into_the_shipped_data(installed, tmp_path, monkeypatch):
    before = {p.name: p.read_bytes() for p in installed.iterdir()}
    (installed / "b.bin").write_bytes(b"new")  # as if a writer had put it there: registering it must still be refused
    with pytest.raises(ReadOnlyDataError, match=rf"^cannot write to .*_data: it is the data shipped inside the installed "
                                                rf"package; set {DATA_ENV} to a folder of your own"):
        register_file("b.bin", "s", "l", "r")
    (installed / "b.bin").unlink()
    for write in (lambda: atomic_write(installed / "a.bin", lambda p: p.write_bytes(b"x")),
                  lambda: write_jsonl_gz(installed / "c.jsonl.gz", [{"a": 1}]),
                  lambda: atomic_write(installed / "cache" / "x.npz", lambda p: p.write_bytes(b"x")),
                  writable_data_dir):
        with pytest.raises(ReadOnlyDataError, match=f"set {DATA_ENV}"): write()
    assert {p.name: p.read_bytes() for p in installed.iterdir()} == before  # nothing written, not even a temporary file
    mine = copy_data(tmp_path / "mine")  # the way out: a folder of one's own, seeded with the shipped files
    monkeypatch.setenv(DATA_ENV, str(mine))
    (mine / "b.bin").write_bytes(b"new")
    register_file("b.bin", "s", "l", "r")
    assert set(read_manifest()) == {"a.bin", "b.bin"} and data_path("b.bin") == mine / "b.bin"
    assert {p.name: p.read_bytes() for p in installed.iterdir()} == before


def test_retraining_outside_a_checkout_fails_before_it_trains(installed, tmp_path, monkeypatch):
    from paper_repro.core.train import load_or_train
    trained = []
    kw = dict(load=lambda blob: blob["x"], dump=lambda x: {"x": x}, source="s", licence="l", rebuild="r")
    with pytest.raises(ReadOnlyDataError, match=f"set {DATA_ENV}"):
        load_or_train("w.pt", lambda: trained.append(1) or 3, retrain=True, **kw)
    assert trained == [] and not (installed / "w.pt").exists()
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "mine"))
    assert load_or_train("w.pt", lambda: trained.append(1) or 3, retrain=True, **kw) == 3 and trained == [1]
    assert load_or_train("w.pt", lambda: 1 / 0, **kw) == 3 and (tmp_path / "mine" / "w.pt").is_file()


def test_installed_a_paper_familys_file_comes_from_its_companion_wheel(installed, tmp_path, monkeypatch):
    payload = b"weights"
    entry = dict(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload), rebuild="r",
                 source="trained by nbs/speech/x.ipynb", licence="l")
    manifest = json.loads((installed / "MANIFEST.json").read_text()) | {"w.pt": entry}
    (installed / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"'w.pt' ships in the companion wheel paper-repro-data-speech, which is not "
                                        r"installed: build it .*make wheels"):
        data_path("w.pt")
    assert copy_data(tmp_path / "partial") and not (tmp_path / "partial" / "w.pt").exists()  # what is installed
    companion = tmp_path / "site-packages" / "paper_repro_data_speech" / "_data"
    companion.mkdir(parents=True)
    (companion / "w.pt").write_bytes(payload)
    monkeypatch.setattr(data_mod, "companion_data_dir", lambda family: companion if family == "speech" else None)
    assert data_path("w.pt") == companion / "w.pt" and data_path("a.bin") == installed / "a.bin"
    assert (copy_data(tmp_path / "whole") / "w.pt").read_bytes() == payload
    (companion / "w.pt").write_bytes(b"tampered")
    with pytest.raises(DataError, match="corrupted"): data_path("w.pt")


def test_copy_data_copies_checked_files_into_a_new_folder(installed, tmp_path):
    (installed / ".a.bin.tmp-x").write_bytes(b"left by a kill")
    (installed / "cache").mkdir()
    assert shipped_files(installed) == ["MANIFEST.json", "a.bin"]
    mine = copy_data(tmp_path / "mine")
    assert sorted(p.name for p in mine.iterdir()) == ["MANIFEST.json", "a.bin"]
    with pytest.raises(DataError, match="copy_data needs a new or empty folder, and .*mine is not empty"):
        copy_data(mine)
    (installed / "a.bin").write_bytes(b"tampered")
    with pytest.raises(DataError, match="corrupted"): copy_data(tmp_path / "other")
    assert not (tmp_path / "other").exists()


# --- what the wheel ships: setup.py copies data/ into paper_repro/_data, checking it first ---------------------------

@pytest.fixture(scope="module")
def setup_py():
    "setup.py's helpers (importing it does not run setup(): that is only for pip and setuptools' build hooks)."
    spec = importlib.util.spec_from_file_location("paper_repro_setup", project_root() / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_ships_what_copy_data_copies_and_refuses_bad_data(setup_py, tmp_path):
    from paper_repro.core.data import data_family
    manifest, everything = read_manifest(), shipped_files(project_root() / "data")
    assert {"MANIFEST.json", "zoo.json", *manifest} == set(everything)
    assert all(setup_py.data_family(entry) == data_family(entry) for entry in manifest.values())  # one rule, two copies
    core = setup_py.checked_data_files()
    assert {"MANIFEST.json", "zoo.json", "code_tokenizer.json", "code_target.pt"} <= set(core)
    assert "speech" in setup_py.data_families() and "core" not in setup_py.data_families()
    parts = [core] + [setup_py.checked_data_files(family=f) for f in setup_py.data_families()]
    assert sorted(n for part in parts for n in part) == everything  # every file in exactly one wheel
    folder = _data_folder(tmp_path / "data")
    (folder / ".x.tmp-1").write_bytes(b"")
    assert setup_py.checked_data_files(folder) == ["MANIFEST.json", "a.bin"]
    assert setup_py.checked_data_files(folder, family="speech") == []
    (folder / "a.bin").write_bytes(b"tampered")
    with pytest.raises(SystemExit, match="a.bin does not match its sha256"): setup_py.checked_data_files(folder)
    (folder / "a.bin").unlink()
    with pytest.raises(SystemExit, match="a.bin is listed in data/MANIFEST.json but missing"):
        setup_py.checked_data_files(folder)
    (folder / "MANIFEST.json").unlink()
    with pytest.raises(SystemExit, match="MANIFEST.json is missing"): setup_py.checked_data_files(folder)


def test_caches_go_to_the_data_folder_or_else_a_user_cache(installed, tmp_path, monkeypatch):
    from paper_repro.core.data import cache_dir
    from paper_repro.speech.corpus import default_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "paper_repro" and default_cache_dir() == cache_dir() / "speech"
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "cache"
