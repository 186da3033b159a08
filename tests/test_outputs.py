"""Stored outputs (paper_repro.core.outputs): every paper notebook that stores outputs shows its committed cpu run, and a
cpu run writes them back while other runs leave the notebook alone. The fake checkout runs tests/fixtures/tiny_paper.ipynb
(a kernel start and a second of work) in place of copyspec's notebook."""
import base64
import io
import json
import shutil
from pathlib import Path

import pytest

from paper_repro.cli import main, run_papers
from paper_repro.core.catalog import notebook_path, results_dir
from paper_repro.core.outputs import (META_KEY, check_stored_outputs, clean_notebook_text, outputs_digest,
                                      papers_with_stored_outputs, run_link, same_value, shown_tables)
from paper_repro.core.repro import project_root

TINY = Path(__file__).parent / "fixtures" / "tiny_paper.ipynb"
ROOT = project_root()


# --- the committed notebooks ---------------------------------------------------------------------------------------

def test_every_notebook_with_outputs_shows_its_committed_cpu_run():
    papers = papers_with_stored_outputs(ROOT)
    assert papers, "no paper notebook stores outputs: `paper-repro run SLUG --scale cpu` writes them"
    problems = [p for paper in papers for p in check_stored_outputs(paper, ROOT)]
    assert not problems, "\n".join(problems)


def test_committed_notebooks_with_outputs_are_in_nbdev_clean_form():
    for paper in papers_with_stored_outputs(ROOT):
        text = notebook_path(paper, ROOT).read_text(encoding="utf-8")
        assert clean_notebook_text(json.loads(text), ROOT) == text, paper.slug


# --- a fake checkout -------------------------------------------------------------------------------------------------

def fake_checkout(root: Path) -> Path:
    "A checkout with the tiny paper as copyspec's notebook, and the project's nbdev settings."
    nb = notebook_path("copyspec", root)
    nb.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY, nb)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return nb


@pytest.fixture(scope="module")
def stored_root(tmp_path_factory) -> Path:
    "A fake checkout after `paper-repro run copyspec --scale cpu`."
    root = tmp_path_factory.mktemp("stored")
    fake_checkout(root)
    (o,) = run_papers(["copyspec"], scale="cpu", device="cpu", root=root)
    assert o.ok and o.note is None, (o.error, o.note)
    assert o.stored == notebook_path("copyspec", root)
    return root


@pytest.fixture
def copy_root(stored_root, tmp_path) -> Path:
    "A fresh copy of the stored checkout, to tamper with."
    shutil.copytree(stored_root, tmp_path / "copy")
    return tmp_path / "copy"


def _outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] for o in c.get("outputs", [])]


def test_a_cpu_run_stores_its_outputs_small_clean_and_linked(stored_root):
    path = notebook_path("copyspec", stored_root)
    text = path.read_text()
    nb = json.loads(text)
    source = json.loads(TINY.read_text())
    assert [c["source"] for c in nb["cells"]] == [c["source"] for c in source["cells"]]  # the code is as it was
    outs = _outputs(nb)
    streams = "".join("".join(o["text"]) for o in outs if o["output_type"] == "stream")
    assert "writing to results/cpu/copyspec\n" in streams  # the checkout's path is made relative
    bar = [line for line in streams.splitlines() if line.startswith("toy loop:")]
    assert len(bar) == 1 and "100%" in bar[0] and "3/3 [" in bar[0]  # the bar's last state, with its timing
    assert "\r" not in streams and "IProgress" not in streams
    (png,) = [o["data"]["image/png"] for o in outs if "image/png" in o.get("data", {})]
    from PIL import Image
    width, height = Image.open(io.BytesIO(base64.b64decode(png))).size
    assert width < 400 and height < 300  # a 4 x 2.5 inch figure at the inline dpi (72), not at the saved figure's 120
    assert all(c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
    assert all(o.get("execution_count") is None for o in outs)
    link = nb["metadata"][META_KEY]
    assert link["run"] == run_link(results_dir("copyspec", "cpu", stored_root))
    assert link["outputs_sha256"] == outputs_digest(nb)
    assert clean_notebook_text(nb, ROOT) == text  # what nbdev-clean would write with this project's settings
    assert len(text) < 60_000
    assert check_stored_outputs("copyspec", stored_root) == []


def test_other_runs_leave_the_notebook_alone(tmp_path, capsys):
    nb = fake_checkout(tmp_path)
    before = nb.read_bytes()
    code = main(["--root", str(tmp_path), "run", "copyspec", "--scale", "ci", "--device", "cpu"])
    assert code == 0 and (tmp_path / "results/ci/copyspec/claims.json").is_file()
    code = main(["--root", str(tmp_path), "run", "copyspec", "--scale", "cpu", "--device", "cpu",
                 "--out-root", str(tmp_path / "elsewhere")])
    assert code == 0 and (tmp_path / "elsewhere/cpu/copyspec/claims.json").is_file()
    code = main(["--root", str(tmp_path), "run", "copyspec", "--scale", "cpu", "--device", "cpu", "--no-store"])
    assert code == 0 and (tmp_path / "results/cpu/copyspec/claims.json").is_file()
    out = capsys.readouterr().out
    assert "outputs stored" not in out
    assert nb.read_bytes() == before
    assert check_stored_outputs("copyspec", tmp_path) == []  # no outputs: nothing to check


def test_a_notebook_edited_while_it_runs_is_not_overwritten(tmp_path, capsys):
    nb = fake_checkout(tmp_path)
    code = main(["--root", str(tmp_path), "run", "copyspec", "--scale", "cpu", "--device", "cpu", "-p", "edit_self", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and "ok      copyspec" in out and "outputs stored" not in out
    assert f"note    copyspec: outputs not stored in the notebook: {nb} was edited while it ran" in err
    assert nb.read_text() == TINY.read_text() + " "  # the edit is kept, no outputs written over it


def test_a_failed_cpu_run_stores_nothing(tmp_path):
    nb = fake_checkout(tmp_path)
    before = nb.read_bytes()
    (o,) = run_papers(["copyspec"], scale="cpu", device="cpu", root=tmp_path, params={"steps": 0})  # values[-1] fails
    assert not o.ok and o.cell == 6 and "IndexError" in o.error and o.stored is None
    assert nb.read_bytes() == before


# --- the check fails when the notebook and the results disagree ---------------------------------------------------

def _edit(path: Path, change) -> None:
    nb = json.loads(path.read_text())
    change(nb)
    path.write_text(json.dumps(nb, indent=1))


def _html_outputs(nb: dict) -> list[dict]:
    return [o for o in _outputs(nb) if "text/html" in o.get("data", {})]


def _replace_in_html(nb: dict, which: int, old: str, new: str) -> None:
    data = _html_outputs(nb)[which]["data"]
    html = "".join(data["text/html"])
    assert old in html
    data["text/html"] = html.replace(old, new, 1)


def test_the_check_fails_on_a_changed_claim(copy_root):
    claims_file = results_dir("copyspec", "cpu", copy_root) / "claims.json"
    claims = json.loads(claims_file.read_text())
    flipped = "fails" if claims[0]["holds"] else "holds"   # a consistent record: the verdict passed by hand flips
    claims[0].update(holds=flipped == "holds", outcome=flipped, threshold=None)
    claims_file.write_text(json.dumps(claims))
    problems = check_stored_outputs("copyspec", copy_root)
    assert "nbs/decoding/copyspec.ipynb: results file claims.json has changed since the outputs were stored" in problems
    assert any("claim 'toy_claim' is shown with holds=" in p for p in problems), problems


def test_the_check_compares_what_is_shown_even_with_a_matching_link(copy_root):
    "Someone regenerates the link after editing claims.json: the claims shown still give it away."
    res = results_dir("copyspec", "cpu", copy_root)
    claims = json.loads((res / "claims.json").read_text())
    (res / "claims.json").write_text(json.dumps([{**claims[0], "our_value": 9.5}, claims[1], {**claims[1], "id": "extra"}]))
    nb_path = notebook_path("copyspec", copy_root)
    _edit(nb_path, lambda nb: nb["metadata"][META_KEY].update(run=run_link(res)))
    problems = check_stored_outputs("copyspec", copy_root)
    assert problems == [
        "nbs/decoding/copyspec.ipynb: the claims shown are ['toy_claim', 'toy_invariant'] but claims.json has "
        "['extra', 'toy_claim', 'toy_invariant']",
        "nbs/decoding/copyspec.ipynb: claim 'toy_claim' is shown with our_value=1.5 but claims.json says 9.5"], problems


@pytest.mark.parametrize("tamper, expected", [
    # a number of the shown table edited by hand
    (lambda nb: _replace_in_html(nb, 0, "<td>toy</td>\n      <td>1.5", "<td>toy</td>\n      <td>1.7"),
     ["the stored outputs differ from those written by the run", "the table shown differs from table.md"]),
    # a claim shown with the other outcome
    (lambda nb: _replace_in_html(nb, 1, "<td>True</td>", "<td>False</td>"),
     ["the stored outputs differ", "claim 'toy_claim' is shown with holds=False but claims.json says True"]),
    # the claims display removed
    (lambda nb: nb["cells"][-1].update(outputs=[]),
     ["the stored outputs differ", "its outputs show no claims table"]),
    # the figure removed
    (lambda nb: nb["cells"][4].update(outputs=[]),
     ["the stored outputs differ", "its outputs show no figure though the run saved figure.png"]),
    # a link to another run
    (lambda nb: nb["metadata"][META_KEY]["run"].update(started="2020-01-01T00:00:00+00:00"),
     ["metadata.paper_repro.run.started is '2020-01-01T00:00:00+00:00' but copyspec/run.json says"]),
    # outputs saved from an interactive session: no link at all
    (lambda nb: nb["metadata"].pop(META_KEY),
     ["its stored outputs have no metadata.paper_repro.run: they are not from a recorded run"]),
])
def test_the_check_fails_on_a_tampered_notebook(copy_root, tamper, expected):
    assert check_stored_outputs("copyspec", copy_root) == []
    _edit(notebook_path("copyspec", copy_root), tamper)
    problems = check_stored_outputs("copyspec", copy_root)
    assert len(problems) == len(expected), problems
    for p, want in zip(problems, expected):
        assert p.startswith("nbs/decoding/copyspec.ipynb: ") and want in p, (p, want)


def test_the_check_fails_when_the_results_were_regenerated_without_the_outputs(copy_root):
    res = results_dir("copyspec", "cpu", copy_root)
    info = json.loads((res / "run.json").read_text())
    (res / "run.json").write_text(json.dumps({**info, "started": "2031-01-01T00:00:00+00:00"}))
    (res / "figure.png").unlink()
    problems = check_stored_outputs("copyspec", copy_root)
    assert any("run.started is" in p and "2031-01-01" in p for p in problems), problems
    assert any("results file figure.png is missing" in p for p in problems), problems
    assert any("results file run.json has changed" in p for p in problems), problems


def test_a_link_without_outputs_is_reported(copy_root):
    _edit(notebook_path("copyspec", copy_root), lambda nb: [c.update(outputs=[]) for c in nb["cells"] if "outputs" in c])
    assert check_stored_outputs("copyspec", copy_root) == [
        "nbs/decoding/copyspec.ipynb: metadata.paper_repro links to a run but no output is stored"]


def test_shown_tables_and_values():
    import pandas as pd
    df = pd.DataFrame({"a": [1.0, 2.5], "b": ["x", "y"]}, index=pd.Index([3, 4], name="k"))
    nb = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "execute_result", "data": {"text/html": df._repr_html_()}}]}]}
    assert shown_tables(nb) == [(["a", "b"], [["1.0", "x"], ["2.5", "y"]])]
    long = pd.DataFrame({"v": range(100)})
    nb["cells"][0]["outputs"][0]["data"]["text/html"] = long._repr_html_()
    (cols, rows), = shown_tables(nb)
    assert cols == ["v"] and ["..."] in rows and len(rows) < 100  # pandas' truncated display
    from paper_repro.core.outputs import _rows_match
    assert _rows_match(rows, [[str(i)] for i in range(100)], ".3g")
    assert not _rows_match(rows, [[str(i)] for i in range(1, 101)], ".3g")
    assert same_value("0.523457", "0.523") and same_value("1234.5", "1.23e+03") and same_value("NaN", "nan")
    assert not same_value("0.53", "0.523") and not same_value("x", "y") and not same_value("True", "False", sig=None)
    # pandas cuts long text cells to their start plus "..." (display.max_colwidth): a prefix of the stored text
    assert same_value("naive multi-task (conv fusion, learned queries...", "naive multi-task (conv fusion, learned queries, no TCS)")
    assert not same_value("naive multi-task (conv fusion, other...", "naive multi-task (conv fusion, learned queries, no TCS)")
