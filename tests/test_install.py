"""An installed package outside a checkout (paper_repro.core.catalog.require_checkout and the command line): the
commands that need the notebooks say so in one line and exit 2; `list` gives the catalogue without the status.
ci/check_wheel.sh checks the same with a real wheel in a fresh environment."""
import json
from pathlib import Path

import pytest

import paper_repro.core.repro as repro_mod
from paper_repro.cli import main
from paper_repro.core.catalog import PAPERS, CheckoutError, is_checkout, require_checkout
from paper_repro.core.repro import project_root


@pytest.fixture
def outside(tmp_path, monkeypatch):
    "The package as a wheel runs it: no checkout around it, the current folder an ordinary one."
    monkeypatch.setattr(repro_mod, "checkout_root", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert project_root() == tmp_path
    return tmp_path


def test_require_checkout(outside):
    assert not is_checkout()
    with pytest.raises(CheckoutError, match=rf"^`x` needs a source checkout .*, and {outside} has no nbs/"):
        require_checkout("`x`")
    (outside / "nbs").mkdir()
    assert is_checkout() and require_checkout("`x`") == outside


@pytest.mark.parametrize("argv", [["run", "copyspec", "--scale", "ci"], ["run", "--all"], ["report", "--scale", "ci"],
                                  ["bench", "decoding", "--scale", "ci"], ["readme", "--check"],
                                  ["list", "--format", "markdown"]])
def test_commands_that_need_the_notebooks_say_so(outside, capsys, argv):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    command = " ".join(argv[:1] + (["--format", "markdown"] if argv[0] == "list" else []))
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"paper-repro: error: `paper-repro {command}` needs a source checkout of paper_repro"), err
    assert list(outside.iterdir()) == []  # no results/, no report written


def test_list_gives_the_catalogue_without_a_status(outside, capsys):
    assert main(["list", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [r["slug"] for r in rows] == [p.slug for p in PAPERS] and all("status" not in r for r in rows)
    assert err.count("\n") == 1 and "the status column needs a source checkout" in err
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    assert "copyspec" in out and "status" not in out and "planned" not in out
    assert main(["--root", str(Path(__file__).resolve().parents[1]), "list"]) == 0
    assert "status" in capsys.readouterr().out  # --root names a checkout: the status is back
