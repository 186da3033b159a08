"""The `paper-repro` command line (paper_repro.cli) against fake checkouts in temporary folders.
A few notebook runs start a kernel (a few seconds each); everything else is checked on hand-made files."""
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


def fake_paper_notebook(path: Path, slug: str, fail: bool = False) -> Path:
    "A tiny paper notebook with the standard parameters cell; it records one claim, or raises if `fail`."
    body = ('raise ValueError("boom from the fake paper")' if fail else
            "from paper_repro.core.repro import start_run\n"
            f"run = start_run({slug!r}, scale=scale, device=device, seed=seed, out_dir=out_dir)\n"
            'run.record_claim(id="toy_claim", statement="the toy holds", metric="x", unit="u", paper_value=1.0, '
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
    assert f"FAILED  pearl: ValueError: boom from the fake paper (executed notebook: {pearl_nb})" in err
    assert "Traceback" not in err
    assert "ok      copyspec" in out and "1 ok, 1 failed" in out
    summary = out.split("summary:")[1].split()
    assert summary[:2] == ["FAILED", "pearl"] and summary[4:6] == ["ok", "copyspec"]  # catalogue order
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
    (["run", "copyspec", "-p", "seed", "3"], "parameter 'seed' has its own option (--seed)"),
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
    (tmp_path / "nbs").mkdir()  # a checkout, without paper notebooks
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
    claims = [CLAIM, {**CLAIM, "id": "quality", "statement": "same | output", "paper_value": None, "our_value": 0.25,
                      "holds": False, "note": "too small\na model"}]
    touch(res / "claims.json", json.dumps(claims))
    touch(results_dir("pearl", "cpu", tmp_path) / "claims.json", json.dumps([CLAIM]))
    return tmp_path


def test_report_content(results_root):
    md = build_report("cpu", results_root)
    assert md.startswith("# Results report: scale `cpu`")
    assert "**Status:** 1 reproduced · 1 implemented · 51 planned (53 papers)" in md
    assert "**Claims at scale `cpu`:** 2 of 3 hold (2 papers with results)." in md
    assert "### 53. copyspec: CopySpec" in md and "Status: **reproduced** · [figure.png](cpu/copyspec/figure.png)" in md
    assert "| copyspec | `speedup` | faster than greedy | 2 | 1.5 | x | ✓ |  |" in md
    assert r"| copyspec | `quality` | same \| output | — | 0.25 | x | ✗ | too small a model |" in md
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
    assert "| pearl | `speedup` |" in (results_root / "results/ci/REPORT.md").read_text()
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
    (tmp_path / "nbs").mkdir()  # a checkout
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
    (tmp_path / "nbs").mkdir()  # a checkout
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
