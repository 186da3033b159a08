"""The `paper-repro` command line (paper_repro.cli) against fake checkouts in temporary folders.
A few notebook runs start a kernel (a few seconds each); everything else is checked on hand-made files."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from paper_repro.cli import (CATALOG_END, CATALOG_START, NoResultsError, RunOutcome, build_report, main,
                             notebook_parameters, parse_param, report_path, run_papers, update_readme)
from paper_repro.core.catalog import module_path, notebook_path, results_dir
from paper_repro.core.catalog import test_path as paper_test_path
from paper_repro.core.repro import ResultsLock, RunLockedError

from conftest import CLAIM, touch
from paper_repro.core.claims import make_claim


def fake_paper_notebook(path: Path, slug: str, fail: bool = False) -> Path:
    "A tiny paper notebook with the standard parameters cell; it records one claim, or raises if `fail`."
    body = ('raise ValueError("boom from the fake paper")' if fail else
            "from paper_repro.core.repro import start_run\n"
            f"run = start_run({slug!r}, scale=scale, device=device, seed=seed, out_dir=out_dir)\n"
            'run.record_claim(id="toy_claim", kind="headline", source="toy paper", statement="the toy holds", metric="x", unit="u", paper_value=1.0, '
            'our_value=2.0, higher_is_better=True, setting="toy", holds=True)\n'
            "run.finish()")
    params = nbformat.v4.new_code_cell('scale = "cpu"\ndevice = "auto"\nseed = 0\nout_dir = None')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def fake_root(tmp_path) -> Path:
    "A checkout with two paper notebooks: copyspec records a claim, pearl raises."
    fake_paper_notebook(notebook_path("copyspec", tmp_path), "copyspec")
    fake_paper_notebook(notebook_path("pearl", tmp_path), "pearl", fail=True)
    return tmp_path


def cli(capsys, root: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--root", str(root), *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- run -----------------------------------------------------------------------------------------------------------

def test_run_keeps_going_after_a_failure(fake_root, capsys):
    code, out, err = cli(capsys, fake_root, "run", "--all", "--scale", "ci", "--device", "cpu", "--seed", "7", "-j", "2")
    assert code == 1
    pearl_nb = fake_root / "results/ci/pearl/executed.ipynb"
    assert (f'FAILED  pearl after ' in err and 's: cell 2 `raise ValueError("boom from the fake paper")`: ValueError: boom '
            f"from the fake paper (executed notebook: {pearl_nb})" in err)
    assert "Traceback" not in err
    assert "ok      copyspec" in out and "1 ok, 1 failed" in out
    summary = out.split("summary:")[1].split()
    assert summary[:2] == ["FAILED", "pearl"] and summary[4:6] == ["cell", "2"] and summary[6:8] == ["ok", "copyspec"]  # catalogue order
    # the failing notebook is kept with its error; the other one ran to the end with our parameters
    assert pearl_nb.is_file() and "boom from the fake paper" in pearl_nb.read_text()
    res = fake_root / "results/ci/copyspec"
    assert (res / "executed.ipynb").is_file()
    assert json.loads((res / "claims.json").read_text())[0]["id"] == "toy_claim"
    run = json.loads((res / "run.json").read_text())
    assert (run["scale"], run["seed"], run["parameters"]["device"]) == ("ci", 7, "cpu")


def test_run_papers_returns_outcomes_and_honours_out_root(fake_root, tmp_path_factory):
    out_root = tmp_path_factory.mktemp("elsewhere")
    seen = []
    outcomes = run_papers(["copyspec"], scale="ci", device="cpu", seed=1, jobs=1, root=fake_root, out_root=out_root,
                          on_done=seen.append)
    assert outcomes == seen and len(outcomes) == 1
    o = outcomes[0]
    assert isinstance(o, RunOutcome) and o.ok and o.error is None and o.wall_s > 0
    assert o.executed == (out_root / "ci/copyspec/executed.ipynb").resolve()
    assert (out_root / "ci/copyspec/claims.json").is_file()
    assert not results_dir("copyspec", "ci", fake_root).exists()


@pytest.mark.parametrize("argv, msg", [
    (["run", "copyspek"], "unknown paper slug 'copyspek'; did you mean copyspec?"),
    (["run", "copyspec", "--scale", "huge"], "unknown scale 'huge'; valid scales: ci, cpu, gpu"),
    (["run", "copyspec", "--device", "tpu"], "unknown device 'tpu'; valid devices: auto, cpu, cuda, mps"),
    (["run", "copyspec", "--device", "cpu:abc"], "unknown device 'cpu:abc'; valid devices: auto, cpu, cuda, mps"),
    (["run", "copyspec", "--timeout", "0"], "argument --timeout: must be a positive number of seconds, got '0'"),
    (["run", "copyspec", "--timeout", "-5"], "argument --timeout: must be a positive number of seconds"),
    (["run", "copyspec", "--timeout", "nan"], "argument --timeout: must be a positive number of seconds"),
    (["run", "copyspec", "-p", "x", "1", "-p", "x", "2"], "-p x given more than once"),
    (["bench", "decoding", "--device", "cpu:abc"], "unknown device 'cpu:abc'"),
    (["bench", "dllm", "--seed", "-1"], "seed must be an integer from 0 to 2**63 - 1"),
    (["--root", "/nonexistent/checkout", "list"], "--root /nonexistent/checkout is not a folder"),
    (["run", "copyspec", "pearl", "ppd"], "paper 'ppd' has no notebook yet"),
    (["run", "copyspec", "-j", "0"], "-j/--jobs must be at least 1"),
    (["run"], "no papers to run; name slugs or use --all"),
    (["run", "copyspec", "--all"], "give slugs or --all, not both"),
    (["run", "copyspec", "--seed", "x"], "argument --seed: invalid int value"),
    (["run", "copyspec", "-p", "retrian", "True"], "notebook 'copyspec' has no parameter 'retrian'; its parameters: "
                                                    "scale, device, seed, out_dir"),
    (["run", "copyspec", "-p", "seed", "3"], "parameter 'seed' has its own option (--seed); -p and -f are for the others"),
    (["run", "copyspec", "--progress", "loud"], "argument --progress: invalid choice: 'loud'"),
    (["run", "copyspec", "--progress-every", "0"], "--progress-every must be at least 1, got 0"),
    (["run", "copyspec", "-f", "/nonexistent/params.yaml"], "-f /nonexistent/params.yaml: no such file"),
    (["params", "copyspek"], "unknown paper slug 'copyspek'; did you mean copyspec?"),
    (["params", "ppd"], "paper 'ppd' has no notebook yet"),
    (["run", "copyspec", "-p", "out_dir", "x"], "parameter 'out_dir' has its own option (--out-root"),
    (["list", "--family", "llm"], "argument --family: invalid choice: 'llm'"),
    (["report", "--scale", "huge"], "valid scales: ci, cpu, gpu"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_requests_fail_before_anything_runs(fake_root, capsys, argv, msg):
    code, out, err = cli(capsys, fake_root, *argv)
    assert code == 2
    assert err.startswith("paper-repro: error: ") and msg in err and err.count("\n") == 1, err
    assert not (fake_root / "results").exists()


def test_extra_parameters_reach_the_notebook(tmp_path_factory):
    root = tmp_path_factory.mktemp("params")
    nb = fake_paper_notebook(notebook_path("copyspec", root), "copyspec")
    book = nbformat.read(nb, as_version=4)
    book.cells[0].source += "\nretrain = False\nlabel = 'x'"
    book.cells[1].source += "\nassert retrain is True and label == 'two words', (retrain, label)"
    nbformat.write(book, nb)
    assert notebook_parameters(nb) == dict(scale="cpu", device="auto", seed=0, out_dir=None, retrain=False, label="x")
    assert (parse_param("True"), parse_param("3"), parse_param("0.5"), parse_param("two words")) == (True, 3, 0.5, "two words")
    (o,) = run_papers(["copyspec"], scale="ci", device="cpu", root=root, params=dict(retrain="true", label="two words"))
    assert o.ok, o.error
    # run.json records every -p parameter, typed, though the notebook passes none of them to start_run
    run = json.loads((results_dir("copyspec", "ci", root) / "run.json").read_text())
    assert run["parameters"]["retrain"] is True and run["parameters"]["label"] == "two words"


@pytest.fixture
def typed_root(tmp_path) -> Path:
    nb = fake_paper_notebook(notebook_path("copyspec", tmp_path), "copyspec")
    book = nbformat.read(nb, as_version=4)
    book.cells[0].source += "\nretrain = False\nsteps = 10\nlr = 0.1\nlayers = [1, 2]\nlabel: str = 'x'\nwhen = 2 * 3"
    nbformat.write(book, nb)
    return tmp_path


@pytest.mark.parametrize("name, value, msg", [
    ("retrain", "abc", "parameter 'retrain' of notebook 'copyspec' is a bool (True, False, true, false, 1 or 0) "
                       "(default retrain = False); got 'abc'"),
    ("retrain", "2", "is a bool"), ("retrain", "None", "is a bool"),
    ("steps", "1.5", "parameter 'steps' of notebook 'copyspec' is an int (default steps = 10); got '1.5'"),
    ("lr", "fast", "is a finite float"), ("lr", "inf", "is a finite float"),
    ("layers", "3", "is a list literal"),
])
def test_parameters_are_checked_against_the_notebooks_types(typed_root, capsys, name, value, msg):
    code, out, err = cli(capsys, typed_root, "run", "copyspec", "--scale", "ci", "-p", name, value)
    assert code == 2 and msg in err and err.count("\n") == 1, err
    assert not (typed_root / "results").exists()


def test_parameter_values_that_fit_their_types(typed_root):
    from paper_repro.cli import notebook_params
    from paper_repro.core.catalog import get_paper
    paper = get_paper("copyspec")
    for text, want in (("True", True), ("false", False), ("1", True), ("0", False), (" FALSE ", False)):
        assert notebook_params(paper, {"retrain": text}, typed_root) == {"retrain": want}
    assert notebook_params(paper, dict(steps="12", lr="3", layers="[4]", label="3", when="'any'"), typed_root) == \
        dict(steps=12, lr=3.0, layers=[4], label="3", when="any")


def test_a_paper_being_run_elsewhere_is_refused_before_anything_starts(fake_root, capsys):
    with ResultsLock(results_dir("copyspec", "ci", fake_root)):
        code, out, err = cli(capsys, fake_root, "run", "copyspec", "pearl", "--scale", "ci", "--device", "cpu")
    assert code == 2 and err.count("\n") == 1
    assert f"results/ci/copyspec is being written by another run (pid {os.getpid()}, started " in err
    assert not (fake_root / "results/ci/pearl").exists() and not (fake_root / "results/ci/copyspec").exists()
    with pytest.raises(RunLockedError), ResultsLock(results_dir("pearl", "ci", fake_root)):
        run_papers(["pearl"], scale="ci", device="cpu", root=fake_root)


SLEEPY = Path(__file__).parent / "fixtures" / "sleepy_paper.ipynb"


def _alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    return True


def test_ctrl_c_stops_the_kernel_keeps_the_previous_results_and_exits_130(tmp_path):
    "The notebook sleeps after staging a table and a claim; Ctrl-C must stop it there."
    nb = notebook_path("copyspec", tmp_path)
    nb.parent.mkdir(parents=True)
    shutil.copy(SLEEPY, nb)
    res = results_dir("copyspec", "ci", tmp_path)
    previous = {name: touch(res / name, text).read_bytes() for name, text in
                (("claims.json", json.dumps([CLAIM])), ("table.csv", "old\n1\n"), ("run.json", "{}\n"))}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from paper_repro.cli import main; sys.exit(main())",
                             "--root", str(tmp_path), "run", "copyspec", "--scale", "ci", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    kernel_file = res.parent / "kernel.json"  # the notebook says which kernel it is, once it is sleeping
    deadline = time.monotonic() + 120
    while not kernel_file.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    kernel = json.loads(kernel_file.read_text())
    assert len(list(res.parent.glob(".copyspec.staging-*"))) == 1 and _alive(kernel["pid"])
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the runner's group, not the kernel's
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert time.monotonic() - t0 < 30  # it did not wait for the notebook's 600 s sleep
    assert "paper-repro: interrupted: stopped; previous results are kept" in err
    assert "Traceback" not in err
    for _ in range(50):
        if not _alive(kernel["pid"]): break
        time.sleep(0.1)
    assert not _alive(kernel["pid"]) and not Path(kernel["connection_file"]).exists()
    assert {p.name: p.read_bytes() for p in res.iterdir() if p.name != "executed.ipynb"} == previous
    assert "KeyboardInterrupt" in (res / "executed.ipynb").read_text()  # it shows where the run stopped
    assert sorted(p.name for p in res.parent.iterdir()) == ["copyspec", "kernel.json"]  # no staging, no lock


def test_run_all_with_no_notebooks(tmp_path, capsys):
    code, out, err = cli(capsys, tmp_path, "run", "--all")
    assert code == 2 and "no papers to run" in err


def test_run_papers_validates_directly(fake_root):
    with pytest.raises(ValueError, match="valid devices"):
        run_papers(["copyspec"], device="tpu", root=fake_root)
    with pytest.raises(ValueError, match="did you mean pearl"):
        run_papers(["pearll"], root=fake_root)


# --- list ----------------------------------------------------------------------------------------------------------

def test_list_formats(fake_root, capsys):
    code, out, _ = cli(capsys, fake_root, "list", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 53 and rows[-1]["slug"] == "copyspec" and rows[-1]["status"] == "planned"
    code, out, _ = cli(capsys, fake_root, "list", "--family", "dllm")
    assert code == 0 and len(out.strip().splitlines()) == 5 and "learn2pd" in out
    code, out, _ = cli(capsys, fake_root, "list", "--format", "markdown")
    assert "[copyspec](nbs/decoding/copyspec.ipynb)" in out and "(53 papers)" in out


def test_help_and_version(capsys):
    assert main(["--help"]) == 0 and "report" in capsys.readouterr().out
    assert main(["--version"]) == 0 and "paper-repro" in capsys.readouterr().out


# --- report --------------------------------------------------------------------------------------------------------

@pytest.fixture
def results_root(tmp_path) -> Path:
    "copyspec reproduced (two claims, one not holding), pearl implemented with results, everything else absent."
    for slug in ("copyspec", "pearl"):
        touch(notebook_path(slug, tmp_path), "{}")
        touch(module_path(slug, tmp_path))
    touch(paper_test_path("copyspec", tmp_path))
    res = results_dir("copyspec", "cpu", tmp_path)
    touch(res / "figure.png")
    touch(res / "table.csv", "a\n1\n")
    claims = [CLAIM, make_claim(id="quality", kind="ablation", source="our addition", statement="same | output",
                                metric="agreement", unit="x", our_value=0.25, threshold=0.5, higher_is_better=True,
                                setting="toy", note="too small\na model")]
    touch(res / "claims.json", json.dumps(claims))
    touch(results_dir("pearl", "cpu", tmp_path) / "claims.json", json.dumps([CLAIM]))
    return tmp_path


def test_report_content(results_root):
    md = build_report("cpu", results_root)
    assert md.startswith("# Results report: scale `cpu`")
    assert "**Status:** 1 reproduced · 1 implemented · 51 planned (53 papers)" in md
    assert "**Headline claims at scale `cpu`:** 2 of 2 hold, 0 inconclusive, 0 fail (2 papers with results)." in md
    assert "Not counted: ablations 0 of 1 hold; implementation invariants 0 of 0 hold." in md
    assert "### 53. copyspec: CopySpec" in md
    assert "Status: **reproduced (1 of 1 headline claim holds)** · [figure.png](cpu/copyspec/figure.png)" in md
    assert "| headline | `speedup` | faster than greedy | 2 (toy paper, Table 1, unchecked) | 1.5 | x | ✓ holds |  |" in md
    assert r"| ablation | `quality` | same \| output | — (our addition) | 0.25 | x | ✗ fails | too small a model |" in md
    assert "Status: **implemented** · figure.png missing" in md
    not_run = md.split("## Not run at this scale")[1]
    assert "| 51 | ppd | decoding | planned |" in not_run and "copyspec" not in not_run
    assert len([line for line in not_run.splitlines() if line.startswith("| ") and line[2].isdigit()]) == 51
    touch(results_root / "results/gpu/bench/decoding.md", "| a |\n|---|\n| 1 |\n")
    assert "None yet." in build_report("gpu", results_root)  # a benchmark but no paper at this scale


def test_report_command_writes_atomically_with_relative_links(results_root, capsys, tmp_path_factory):
    code, out, err = cli(capsys, results_root, "report")
    assert code == 0 and (results_root / "results/REPORT.md").read_text() == build_report("cpu", results_root)
    elsewhere = tmp_path_factory.mktemp("docs") / "sub" / "R.md"
    assert cli(capsys, results_root, "report", "--out", str(elsewhere))[0] == 0
    text = elsewhere.read_text()
    link = text.split("[figure.png](")[1].split(")")[0]
    assert (elsewhere.parent / link).resolve() == (results_root / "results/cpu/copyspec/figure.png").resolve()
    assert not list(elsewhere.parent.glob(".R.md*"))  # no temporary file left behind


def test_report_rejects_malformed_claims(results_root, capsys):
    bad = touch(results_dir("pearl", "cpu", results_root) / "claims.json", json.dumps([{**CLAIM, "holds": 1}]))
    with pytest.raises(ValueError, match=f"{bad}: claim #0: field 'holds'"):
        build_report("cpu", results_root)
    code, out, err = cli(capsys, results_root, "report")
    assert code == 2 and str(bad) in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (results_root / "results/REPORT.md").exists()


def test_report_path_follows_the_scale_and_a_report_of_nothing_writes_nothing(results_root, capsys):
    committed = touch(results_root / "results/REPORT.md", "the committed cpu report\n").read_text()
    assert report_path("cpu", results_root) == results_root / "results/REPORT.md"
    assert report_path("ci", results_root) == results_root / "results/ci/REPORT.md"
    code, out, err = cli(capsys, results_root, "report", "--scale", "ci")
    assert code == 1 and err.count("\n") == 1
    assert "no results at scale 'ci'" in err and "nothing written" in err
    assert (results_root / "results/REPORT.md").read_text() == committed and not (results_root / "results/ci").exists()
    with pytest.raises(NoResultsError): build_report("gpu", results_root)
    touch(results_dir("pearl", "ci", results_root) / "claims.json", json.dumps([CLAIM]))
    assert cli(capsys, results_root, "report", "--scale", "ci")[0] == 0
    assert (results_root / "results/REPORT.md").read_text() == committed
    assert "| headline | `speedup` |" in (results_root / "results/ci/REPORT.md").read_text()
    touch(results_root / "results/gpu/bench/dllm.md", "| a |\n|---|\n| 1 |\n")  # a benchmark alone is worth a report
    assert "## Diffusion-LM decoding benchmark" in build_report("gpu", results_root)


# --- readme --------------------------------------------------------------------------------------------------------

def test_readme_regenerate_and_check(results_root, capsys):
    readme = touch(results_root / "README.md", f"# paper_repro\n\nIntro.\n\n{CATALOG_START}\nold table\n{CATALOG_END}\n\nTail.\n")
    code, out, err = cli(capsys, results_root, "readme", "--check")
    assert code == 1 and "run `paper-repro readme`" in err and "old table" in readme.read_text()
    assert cli(capsys, results_root, "readme")[0] == 0
    text = readme.read_text()
    assert text.startswith("# paper_repro\n\nIntro.\n\n") and text.endswith(f"{CATALOG_END}\n\nTail.\n")
    assert "| 53 | [copyspec](nbs/decoding/copyspec.ipynb) | decoding |" in text and "old table" not in text
    assert cli(capsys, results_root, "readme", "--check")[0] == 0
    assert update_readme(results_root, check=True) is False
    # the status is derived: a new notebook makes the README stale again
    touch(notebook_path("ppd", results_root), "{}")
    assert cli(capsys, results_root, "readme", "--check")[0] == 1


@pytest.mark.parametrize("text", ["# no markers\n", f"{CATALOG_END}\n{CATALOG_START}\n",
                                  f"{CATALOG_START}\n{CATALOG_START}\n{CATALOG_END}\n", None])
def test_readme_errors(tmp_path, capsys, text):
    if text is not None:
        touch(tmp_path / "README.md", text)
    code, out, err = cli(capsys, tmp_path, "readme")
    assert code == 2 and err.count("\n") == 1
    assert ("no README.md" if text is None else "needs exactly one <!-- catalog:start -->") in err


@pytest.mark.parametrize("error, code", [
    ("DataError", 2), ("RunLockedError", 2), ("ValueError", 2), ("TypeError", 2), ("AssertionError", 1), ("OSError", 1)])
def test_expected_errors_of_a_command_are_one_line(tmp_path, capsys, monkeypatch, error, code):
    "What a benchmark can raise for bad input or a folder in use: one line on stderr, never a traceback."
    import builtins
    from paper_repro.core import bench
    from paper_repro.core.data import DataError
    kinds = dict(DataError=DataError, RunLockedError=RunLockedError)
    exc = kinds.get(error) or getattr(builtins, error)
    def boom(*a, **k): raise exc("data/MANIFEST.json is not valid JSON; restore it\nsecond line")
    monkeypatch.setattr(bench, "run_decoding_bench", boom)
    got, out, err = cli(capsys, tmp_path, "bench", "decoding", "--scale", "ci", "--device", "cpu")
    assert got == code and err.startswith("paper-repro: error: ") and err.count("\n") == 1, err
    assert "data/MANIFEST.json is not valid JSON; restore it second line" in err


def test_seeds_and_parameters_cells_that_cannot_work(fake_root, capsys):
    code, out, err = cli(capsys, fake_root, "run", "copyspec", "--seed", str(2**64))
    assert code == 2 and "seed must be an integer from 0 to 2**63 - 1" in err
    nb = notebook_path("copyspec", fake_root)
    book = nbformat.read(nb, as_version=4)
    book.cells[0].source += "\nretrain = = False"
    nbformat.write(book, nb)
    code, out, err = cli(capsys, fake_root, "run", "copyspec", "-p", "retrain", "1")
    assert code == 2 and "the parameters cell is not valid Python (invalid syntax, line 5)" in err and err.count("\n") == 1
    book.cells[0].metadata["tags"] = []
    nbformat.write(book, nb)
    code, out, err = cli(capsys, fake_root, "run", "copyspec", "-p", "retrain", "1")
    assert code == 2 and "its parameters: none (it has no cell tagged parameters)" in err


# --- progress, -f, params, failures, help ----------------------------------------------------------------------------

def test_progress_lines_when_stderr_is_not_a_terminal(fake_root, capsys):
    code, out, err = cli(capsys, fake_root, "run", "copyspec", "--scale", "ci", "--device", "cpu", "--progress-every", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1] == "start   copyspec (2 code cells)"
    assert lines[2].startswith("        copyspec: 1/2 code cells done, ") and lines[2].endswith(" s (cell 1)")
    assert lines[3].startswith("ok      copyspec (") and "Executing" not in err
    code, out, err = cli(capsys, fake_root, "run", "copyspec", "--scale", "ci", "--device", "cpu", "--progress", "none")
    assert code == 0 and "start" not in out and "code cells done" not in out


def test_progress_lines_for_slow_cells(capsys):
    from paper_repro.cli import CellProgress, LineProgress
    show = LineProgress(every=5, slow_s=30)
    for p in [CellProgress("x", 0, 16, 0.0), CellProgress("x", 3, 16, 50.0, 7, 45.0), CellProgress("x", 4, 16, 51.0, 8, 1.0),
              CellProgress("x", 5, 16, 52.0, 9, 1.0), CellProgress("x", 16, 16, 90.0, 20, 38.0)]:
        show(p)
    assert capsys.readouterr().out.splitlines() == [
        "start   x (16 code cells)", "        x: 3/16 code cells done, 50.0 s (cell 7 took 45.0 s)",
        "        x: 5/16 code cells done, 52.0 s (cell 9)"]  # the last cell: the ok/FAILED line says it


def test_progress_bar_is_papermills(fake_root, capsys):
    code, out, err = cli(capsys, fake_root, "run", "copyspec", "--scale", "ci", "--device", "cpu", "--progress", "bar")
    assert code == 0 and "start   copyspec" not in out
    assert "copyspec: 100%" in err and "3/3 [" in err and "cell/s" in err  # every cell, the injected one too


def test_params_file(tmp_path_factory, capsys):
    root = tmp_path_factory.mktemp("yaml")
    nb = fake_paper_notebook(notebook_path("copyspec", root), "copyspec")
    book = nbformat.read(nb, as_version=4)
    book.cells[0].source += "\nretrain = False\nlabel = 'x'\nsizes = [1]"
    book.cells[1].source += "\nassert (retrain, label, sizes) == (True, 'from -p', [2, 3]), (retrain, label, sizes)"
    nbformat.write(book, nb)
    params = root / "params.yaml"
    params.write_text("retrain: true\nlabel: from the file\nsizes: [2, 3]\n")
    code, out, err = cli(capsys, root, "run", "copyspec", "--scale", "ci", "--device", "cpu", "-f", str(params),
                         "-p", "label", "from -p")
    assert code == 0, err
    run = json.loads((results_dir("copyspec", "ci", root) / "run.json").read_text())
    assert (run["parameters"]["retrain"], run["parameters"]["label"], run["parameters"]["sizes"]) == (True, "from -p", [2, 3])
    for text, msg in [("retrain: 3\n", "parameter 'retrain' of notebook 'copyspec' is a bool"),
                      ("sizes: 2\n", "parameter 'sizes' of notebook 'copyspec' is a list literal"),
                      ("seed: 3\n", "parameter 'seed' has its own option (--seed); -p and -f are for the others"),
                      ("retrian: true\n", "notebook 'copyspec' has no parameter 'retrian'"),
                      ("[1, 2]\n", f"-f {params} must map parameter names to values (`name: value` lines), not be a list"),
                      ("a: [1\n", f"-f {params} is not valid YAML at line 2: expected ',' or ']'")]:
        params.write_text(text)
        code, out, err = cli(capsys, root, "run", "copyspec", "--scale", "ci", "-f", str(params))
        assert code == 2 and msg in err and err.count("\n") == 1, (text, err)
    params.write_text("")  # an empty file sets nothing
    from paper_repro.cli import read_params_file
    assert read_params_file(params) == {}


def test_params_lists_types_and_defaults(typed_root, capsys):
    nb = notebook_path("copyspec", typed_root)
    book = nbformat.read(nb, as_version=4)
    book.cells[0].source += "\nratio: float = 1  # the mixing ratio"
    nbformat.write(book, nb)
    code, out, err = cli(capsys, typed_root, "params", "copyspec")
    assert code == 0 and out.startswith("copyspec: the parameters cell of ")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows[0] == ["name", "type", "default", "set", "with", "help"]
    assert rows[1] == ["scale", "str", "'cpu'", "--scale"] and rows[4] == ["out_dir", "any", "None", "--out-root"]
    assert rows[5] == ["retrain", "bool", "False", "-p", "retrain", "VALUE"]
    assert rows[10] == ["when", "any", "2", "*", "3", "-p", "when", "VALUE"]
    assert rows[11] == ["ratio", "float", "1", "-p", "ratio", "VALUE", "the", "mixing", "ratio"]
    code, out, err = cli(capsys, typed_root, "params", "copyspec", "--format", "json")
    specs = {r["name"]: r for r in json.loads(out)}
    assert specs["label"] == dict(name="label", type="str", default="'x'", set_with="-p label VALUE", help="")
    # the annotation, not the default's type, decides how a value is read
    from paper_repro.cli import notebook_params
    from paper_repro.core.catalog import get_paper
    assert notebook_params(get_paper("copyspec"), {"ratio": "0.5"}, typed_root) == {"ratio": 0.5}
    code, out, err = cli(capsys, typed_root, "run", "copyspec", "--scale", "ci", "-p", "ratio", "half")
    assert code == 2 and "parameter 'ratio' of notebook 'copyspec' is a finite float (default ratio = 1); got 'half'" in err


def _one_cell_paper(root: Path, code: str) -> Path:
    nb = fake_paper_notebook(notebook_path("copyspec", root), "copyspec")
    book = nbformat.read(nb, as_version=4)
    book.cells.insert(0, nbformat.v4.new_markdown_cell("# A paper that goes wrong"))
    book.cells[2].source = code
    nbformat.write(book, nb)
    return nb


@pytest.mark.parametrize("code, timeout, error", [
    ("#| hide\nimport time\ntime.sleep(60)", "1",
     "cell 3 `import time`: timed out: still running after --timeout 1 s"),
    ("import os\nos._exit(3)", None, "cell 3 `import os`: the kernel died (out of memory, or killed) - DeadKernelError: Kernel died"),
    ("x = 1\nraise RuntimeError('first line\\nthe last line')", None, "cell 3 `x = 1`: RuntimeError: the last line"),
])
def test_a_failure_names_the_cell_and_the_error(tmp_path, capsys, code, timeout, error):
    _one_cell_paper(tmp_path, code)
    argv = ["run", "copyspec", "--scale", "ci", "--device", "cpu"] + (["--timeout", timeout] if timeout else [])
    got, out, err = cli(capsys, tmp_path, *argv)
    assert got == 1 and "FAILED  copyspec after " in err and f": {error} (executed notebook: " in err, err
    assert err.count("\n") == 1 and "-----" not in err and "Traceback" not in err
    assert out.splitlines()[-2].split()[-2:] == ["cell", "3"]


def test_every_command_and_option_says_what_it_does(capsys):
    from paper_repro.cli import build_parser
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == {"list", "run", "params", "report", "bench", "readme"}
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        assert helps.get(name), f"{name} has no summary in `paper-repro --help`"
        assert p.description and len(p.description) > len(helps[name]) + 20, f"{name} --help does not say what it does"
        for action in p._actions:
            if isinstance(action, argparse._HelpAction): continue
            assert action.help, f"paper-repro {name}: {action.option_strings or action.dest} has no help"
        assert main([name, "--help"]) == 0
        text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, breaking at hyphens too
        assert "".join(p.description.split()) in text
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "-f YAML, --params-file YAML notebook parameters from a YAML file" in text and "--no-store" in text


def test_annotated_parameters_read_as_papermill_reads_them():
    "`paper-repro params` and papermill's --help-notebook agree on an annotated parameters cell (the tiny fixture's)."
    import papermill
    from paper_repro.cli import parameter_specs
    tiny = Path(__file__).parent / "fixtures" / "tiny_paper.ipynb"
    ours = {p.name: p for p in parameter_specs(tiny)}
    theirs = papermill.inspect_notebook(str(tiny))
    assert list(ours) == list(theirs)
    for name in ("steps", "edit_self"):
        assert ours[name].kind.__name__ == theirs[name]["inferred_type_name"]
        assert ours[name].help == theirs[name]["help"] and repr(ours[name].default) == theirs[name]["default"]
