"""Notebooks read as tutorials (issue 13 §3): no export cell over 40 lines unless the prose before it says why, and no
exported docstring that points at notebook prose ("see above") that the module does not have."""
import ast
import json
from pathlib import Path

import pytest

from paper_repro.core.repro import project_root

ROOT = project_root()
NOTEBOOKS = sorted((ROOT / "nbs").glob("*/*.ipynb"))
MAX_EXPORT_LINES = 40
REASON = "*Why one cell:*"


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(ROOT / "nbs")) for p in NOTEBOOKS])
def test_export_cells_are_short_or_say_why(path):
    cells, long = _cells(path), []
    for i, c in enumerate(cells):
        src = "".join(c["source"])
        if c["cell_type"] != "code" or not src.startswith("#| export"): continue
        n = len(src.splitlines())
        before = "".join(cells[i - 1]["source"]) if i and cells[i - 1]["cell_type"] == "markdown" else ""
        if n > MAX_EXPORT_LINES and REASON not in before: long.append(f"cell {i} ({n} lines)")
    assert not long, (f"{path.name}: export cells over {MAX_EXPORT_LINES} lines without a '{REASON}' sentence in the "
                      f"markdown cell before them: {', '.join(long)}")


def _docstrings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc: yield getattr(node, "name", "<module>"), doc


MODULES = sorted(p for p in (ROOT / "paper_repro").rglob("*.py") if p.name != "_modidx.py")


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_docstrings_do_not_point_at_notebook_prose(path):
    bad = [name for name, doc in _docstrings(ast.parse(path.read_text()))
           if any(w in doc.lower() for w in ("see above", "see below"))]
    assert not bad, f"{path.name}: docstrings of {bad} say 'see above/below', which means nothing in the module"
