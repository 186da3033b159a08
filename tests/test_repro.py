"""paper_repro.core.repro: validation, result files, claims, and runs that fail safely (all or nothing, one at a time)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from paper_repro.core.repro import (PARAMETERS_ENV, RUNNER_ENV, ResultsLock, RunLockedError, check_scale, lock_holder,
                                    lock_path, project_root, recover_results, resolve_device, start_run, validate_claim)


def test_unknown_scale_and_device_fail_clearly():
    with pytest.raises(ValueError, match=r"unknown scale 'huge'; valid scales: ci, cpu, gpu"): check_scale("huge")
    with pytest.raises(ValueError, match=r"unknown device 'tpu'; valid devices"): resolve_device("tpu")
    with pytest.raises(ValueError, match="valid scales"): start_run("x", scale="fast")


@pytest.mark.parametrize("bad", ["cpu:abc", "cuda:x", "cuda:", "cpu:0", "CPU", "", " cpu", None, 0])
def test_malformed_devices_are_value_errors(bad):
    with pytest.raises(ValueError, match=r"unknown device .*; valid devices: auto, cpu, cuda, mps"): resolve_device(bad)


def test_run_writes_all_result_files(tmp_path):
    run = start_run("demo", scale="ci", device="cpu", seed=3, out_dir=tmp_path, extra=1)
    run.save_table(pd.DataFrame({"method": ["a"], "v": [1.23456]}))
    fig, ax = plt.subplots(); ax.plot([1, 2]); run.save_fig(fig); plt.close(fig)
    run.record_claim(kind="invariant", id="c1", statement="s", metric="m", unit="u", paper_value=2.0, our_value=3.0,
                     higher_is_better=True, setting="toy", holds=True, note="n")
    run.record_claim(kind="invariant", id="c1", statement="s", metric="m", unit="u", paper_value=2.0, our_value=4.0,
                     higher_is_better=True, setting="toy", holds=True)  # same id replaces
    info = run.finish()
    assert {p.name for p in tmp_path.iterdir()} == {"table.csv", "table.md", "figure.png", "claims.json", "run.json"}
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert len(claims) == 1 and claims[0]["our_value"] == 4.0
    run_json = json.loads((tmp_path / "run.json").read_text())
    assert run_json["seed"] == 3 and run_json["parameters"]["extra"] == 1 and run_json["wall_s"] >= 0
    assert run_json["cpu_s"] >= 0
    assert set(run_json["versions"]) == {"python", "torch", "paper_repro"} and info["slug"] == "demo"
    assert run_json["files"] == ["claims.json", "figure.png", "run.json", "table.csv", "table.md"]
    assert "| method | v |" in (tmp_path / "table.md").read_text()
    # nothing is left beside the folder: no staging folder, no lock file, no temporary file
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_run_json_records_paths_relative_to_the_project_root(monkeypatch):
    out = project_root() / "results" / "ci" / "_repro_test_paths"
    monkeypatch.setenv(PARAMETERS_ENV, json.dumps({"retrain": True}))
    run = start_run("_repro_test_paths", scale="ci", device="cpu", out_dir=out, data=project_root() / "data" / "x.pt")
    try:
        info = run.finish()
        assert info["parameters"]["out_dir"] == "results/ci/_repro_test_paths"
        assert json.loads((out / "run.json").read_text())["parameters"]["data"] == "data/x.pt"
        assert info["parameters"]["retrain"] is True  # what `paper-repro run -p retrain True` asked for
    finally:
        import shutil; shutil.rmtree(out, ignore_errors=True)


def _first_run(out: Path) -> dict[str, bytes]:
    run = start_run("demo", scale="ci", device="cpu", out_dir=out)
    run.save_table(pd.DataFrame({"method": ["old"], "v": [1.0]}))
    run.record_claim(kind="invariant", id="a", statement="s", metric="m", unit="u", paper_value=None, our_value=1.0,
                     higher_is_better=True, setting="toy", holds=True)
    run.record_claim(kind="invariant", id="b", statement="s", metric="m", unit="u", paper_value=None, our_value=2.0,
                     higher_is_better=True, setting="toy", holds=True)
    run.finish()
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_failure_after_save_table_leaves_the_previous_set(tmp_path):
    out = tmp_path / "demo"
    before = _first_run(out)
    run = start_run("demo", scale="ci", device="cpu", out_dir=out)
    run.save_table(pd.DataFrame({"method": ["new"], "v": [9.0]}))
    run.record_claim(kind="invariant", id="a", statement="s", metric="m", unit="u", paper_value=None, our_value=5.0,
                     higher_is_better=True, setting="toy", holds=True)  # one claim of two so far
    assert json.loads(run.path("claims.json").read_text())[0]["our_value"] == 5.0  # staged, not in the folder
    with pytest.raises(AssertionError, match="must hold"):
        run.record_claim(kind="invariant", id="lossless", statement="s", metric="m", unit="u", paper_value=None, our_value=0.0,
                         higher_is_better=True, setting="toy", holds=False, must_hold=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    run.abort()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_a_new_set_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "demo"
    _first_run(out)
    run = start_run("demo", scale="ci", device="cpu", out_dir=out)  # this run writes no table
    run.record_claim(kind="invariant", id="c", statement="s", metric="m", unit="u", paper_value=None, our_value=3.0,
                     higher_is_better=True, setting="toy", holds=True)
    run.finish()
    assert sorted(p.name for p in out.iterdir()) == ["claims.json", "run.json"]
    assert [c["id"] for c in json.loads((out / "claims.json").read_text())] == ["c"]


def test_sets_sharing_a_folder_leave_each_other_alone(tmp_path):
    "The decoding and dllm benchmarks share results/<scale>/bench/, each with its own file names."
    out = tmp_path / "bench"
    for suite, value in (("decoding", 1.0), ("dllm", 2.0), ("decoding", 3.0)):
        run = start_run("bench", scale="ci", device="cpu", out_dir=out)
        run.claims_file = f"{suite}.claims.json"
        run.save_table(pd.DataFrame({"v": [value]}), name=suite)
        run.record_claim(kind="invariant", id="x", statement="s", metric="m", unit="u", paper_value=None, our_value=value,
                         higher_is_better=True, setting="toy", holds=True)
        run.finish(name=f"{suite}.run.json")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.{e}" for s in ("decoding", "dllm")
                                                           for e in ("claims.json", "csv", "md", "run.json"))
    assert json.loads((out / "dllm.claims.json").read_text())[0]["our_value"] == 2.0
    assert json.loads((out / "decoding.claims.json").read_text())[0]["our_value"] == 3.0


SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import pandas as pd
    from paper_repro.core import repro
    out, mode = sys.argv[1], sys.argv[2]
    run = repro.start_run("demo", scale="ci", device="cpu", out_dir=out)
    run.save_table(pd.DataFrame({"method": ["new"], "v": [9.0]}))
    run.record_claim(kind="invariant", id="a", statement="s", metric="m", unit="u", paper_value=None, our_value=5.0,
                     higher_is_better=True, setting="toy", holds=True)
    if mode == "kill-after-commit-point":  # die between the moves of finish(): after the commit record
        real, committed = os.replace, []
        def replace(src, dst):
            real(src, dst)
            if committed: os.kill(os.getpid(), signal.SIGKILL)  # right after the first file moved into place
            if str(dst).endswith(".commit"): committed.append(dst)
        os.replace = replace
        run.finish()
    print("ready", flush=True)
    time.sleep(60)
""")


def _start(out: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), mode], stdout=subprocess.PIPE, text=True)
    if mode == "hold": assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigkill_before_finish_keeps_the_previous_set_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "demo"
    before = _first_run(out)
    proc = _start(out, "hold")
    assert len(list(tmp_path.glob(".demo.staging-*"))) == 1
    proc.send_signal(signal.SIGKILL); proc.wait(10)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no .table.csv.* temporary files
    assert lock_holder(out) is None  # the kernel released the flock with the process
    run = start_run("demo", scale="ci", device="cpu", out_dir=out)  # settles the leftover staging folder
    assert len(list(tmp_path.glob(".demo.staging-*"))) == 1 and run.staging.exists()
    run.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_a_kill_after_the_commit_point_is_completed_by_the_next_holder(tmp_path):
    out = tmp_path / "demo"
    _first_run(out)
    proc = _start(out, "kill-after-commit-point")
    assert proc.wait(30) == -signal.SIGKILL
    (staging,) = tmp_path.glob(".demo.staging-*")
    assert (staging / ".commit").is_file()
    assert recover_results(out) == {staging.name: "committed"}
    assert sorted(p.name for p in out.iterdir()) == ["claims.json", "run.json", "table.csv", "table.md"]
    assert [c["our_value"] for c in json.loads((out / "claims.json").read_text())] == [5.0]
    assert "new" in (out / "table.csv").read_text() and not staging.exists()


def test_a_second_run_of_the_same_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "demo"
    proc = _start(out, "hold")
    try:
        with pytest.raises(RunLockedError, match=rf"is being written by another run \(pid {proc.pid}, started 20\d\d-.*"
                                                 r"command: -c .*\); wait for it to end or stop it"):
            start_run("demo", scale="ci", device="cpu", out_dir=out)
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"): ResultsLock(out).acquire()
    finally:
        proc.kill(); proc.wait(10)
    with ResultsLock(out) as lock:  # free again once the holder is gone
        assert lock.held and lock_holder(out)["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_kernels_of_the_runner_write_under_its_lock(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    child = "from paper_repro.core.repro import start_run; start_run('demo', 'ci', 'cpu', out_dir=%r).finish()" % str(out)
    with ResultsLock(out):
        monkeypatch.setenv(RUNNER_ENV, str(os.getpid()))
        ok = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        monkeypatch.setenv(RUNNER_ENV, "1")  # not its parent: it must take the lock itself, and cannot
        refused = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
        assert refused.returncode == 1 and "RunLockedError" in refused.stderr
    assert (out / "run.json").is_file()


def test_must_hold_claim_raises_after_staging(tmp_path):
    run = start_run("demo", scale="ci", device="cpu", out_dir=tmp_path)
    with pytest.raises(AssertionError, match="must hold"):
        run.record_claim(kind="invariant", id="lossless", statement="s", metric="m", unit="u", paper_value=None, our_value=0.5,
                         higher_is_better=True, setting="toy", holds=False, must_hold=True)
    assert json.loads(run.path("claims.json").read_text())[0]["holds"] is False
    assert not (tmp_path / "claims.json").exists()
    run.abort()


def test_result_names_stay_inside_the_folder(tmp_path):
    run = start_run("demo", scale="ci", device="cpu", out_dir=tmp_path)
    for bad in ("../x.png", "/tmp/x.png", ".hidden.png", "figs/.x.png", ""):
        with pytest.raises(ValueError, match="must be a relative path inside the results folder"): run.path(bad)
    run.abort()


def test_claim_validation_is_the_claims_standard():
    "repro re-exports the one validator of core.claims (tested in tests/test_claims.py)."
    from paper_repro.core import claims
    assert validate_claim is claims.validate_claim


@pytest.mark.parametrize("bad", ["tpu", "cpu:abc"])
def test_load_zoo_checks_the_device_first(bad):
    from paper_repro.core.zoo import load_zoo
    with pytest.raises(ValueError, match=rf"unknown device '{bad}'; valid devices: auto, cpu, cuda, mps"):
        load_zoo("code-draft", device=bad)


def test_cpu_seconds_counts_work_and_finished_children():
    import subprocess, sys
    from paper_repro.core.repro import cpu_seconds
    t0 = cpu_seconds()
    sum(i * i for i in range(300_000))
    t1 = cpu_seconds()
    assert t1 > t0
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    assert cpu_seconds() - t1 > 0.05  # the child's CPU time is added once it has been reaped
