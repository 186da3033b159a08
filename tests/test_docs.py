"""The documentation site's staging (ci/build_docs.py): what each page is made of. The rendered site itself is checked
in headless Chromium by ci/check_docs.py, after `make docs`, in ci/test.sh."""
import base64
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
import build_docs as bd  # noqa: E402

from paper_repro.core.catalog import PAPERS, load_claims, notebook_path  # noqa: E402


def code(source: str, outputs: list | None = None, tags: list | None = None) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": "x", "metadata": {"tags": tags} if tags else {},
            "outputs": outputs or [], "source": source}


def test_split_directives():
    directives, src = bd.split_directives("#| export\n#|hide\n#| echo: false\nx = 1\n# a comment\n")
    assert directives == {"export": "", "hide": "", "echo": "false"}
    assert src == "x = 1\n# a comment"
    assert bd.split_directives("#| default_exp decoding.copyspec") == ({"default_exp": "decoding.copyspec"}, "")


def test_stage_cell():
    assert bd.stage_cell(code("#| hide\nimport secret")) is None
    assert bd.stage_cell(code("#| default_exp core.lm")) is None              # a directive-only cell goes
    kept = bd.stage_cell(code("#| export\ndef f(): pass", tags=["parameters"]))
    assert kept["source"] == "def f(): pass" and kept["metadata"]["tags"] == ["parameters"]
    assert bd.stage_cell(code("#| echo: false\nplot()"))["metadata"]["tags"] == ["remove-input"]
    assert bd.stage_cell(code("#| output: false\nf()"))["metadata"]["tags"] == ["remove-output"]
    md = {"cell_type": "markdown", "metadata": {}, "source": "#| not a directive in prose"}
    assert bd.stage_cell(md) == md


def test_stored_outputs_are_kept_exactly():
    outputs = [{"output_type": "stream", "name": "stdout", "text": ["done\n"]},
               {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBORw0KGgo=", "text/plain": ["<Figure>"]}}]
    staged = bd.stage_cell(code("#| export\nshow()", outputs))
    assert staged["outputs"] == outputs and staged["source"] == "show()"
    assert bd.stage_cell(code("#| export\n", outputs))["outputs"] == outputs  # an output alone keeps its cell


def test_markdown_to_rst():
    assert bd.markdown_to_rst("see [the code](https://x.org/a)") == "see `the code <https://x.org/a>`__"
    assert bd.markdown_to_rst("calls `generate` then `Cache.truncate()`") == "calls :py:obj:`generate` then :py:obj:`Cache.truncate`"
    assert bd.markdown_to_rst("writes `results/<scale>/`") == "writes ``results/<scale>/``"
    assert bd.markdown_to_rst("a `Draft`s list") == r"a :py:obj:`Draft`\ s list"      # reST needs a break after markup
    assert bd.markdown_to_rst("|a - b| and `x|y`") == r"\|a - b\| and ``x|y``"        # `|x|` is a reST substitution
    assert bd.markdown_to_rst("Returns:\n- one\n- two") == "Returns:\n\n- one\n- two"


def test_link_api_names():
    names = {"generate": "paper_repro.core.decoding.generate", "CopyIndex.update": "paper_repro.decoding.copyspec.CopyIndex.update"}
    text = "Use `generate` or `CopyIndex.update()`, not `unknown`.\n```python\n`generate`\n```\n"
    out = bd.link_api_names(text, names)
    assert "{py:obj}`generate <paper_repro.core.decoding.generate>`" in out
    assert "{py:obj}`CopyIndex.update() <paper_repro.decoding.copyspec.CopyIndex.update>`" in out
    assert "`unknown`" in out and "```python\n`generate`\n```" in out      # unknown names and code blocks unchanged


def test_name_resolver_prefers_the_notebooks_imports():
    symbols = {"paper_repro.core.decoding": {"generate": "paper_repro.core.decoding.generate"},
               "paper_repro.dllm.core": {"generate": "paper_repro.dllm.core.generate", "Rule": "paper_repro.dllm.core.Rule"}}
    assert "generate" not in bd.name_resolver(symbols, None, "")               # ambiguous: not linked
    assert bd.name_resolver(symbols, "paper_repro.dllm.core", "")["generate"] == "paper_repro.dllm.core.generate"
    imports = "from paper_repro.core.decoding import (Draft,\n    generate)"
    assert bd.name_resolver(symbols, "paper_repro.dllm.core", imports)["generate"] == "paper_repro.core.decoding.generate"


def test_claims_table_has_one_row_per_claim():
    claims = load_claims(ROOT / "results" / "cpu" / "copyspec" / "claims.json")
    table = bd.claims_table(claims + [{**claims[0], "id": "piped", "statement": "a | b"}])
    rows = [l for l in table.splitlines() if l.startswith("| ") and "`" in l]
    assert sorted(r.split("`")[1] for r in rows) == sorted([c["id"] for c in claims] + ["piped"])
    assert any(r"a \| b" in r for r in rows)


def test_readme_links_become_site_links(tmp_path):
    (tmp_path / "LICENSE").write_text("x")
    text = "[copyspec](nbs/decoding/copyspec.ipynb) [fig](results/cpu/bench/decoding.png) [l](LICENSE) [w](https://a.b)"
    out = bd.rewrite_readme_links(text, tmp_path, "https://github.com/o/r")
    assert out == ("[copyspec](decoding/copyspec.ipynb) [fig](results/cpu/bench/decoding.png) "
                   "[l](https://github.com/o/r/blob/main/LICENSE) [w](https://a.b)")


def test_pages_and_navigation():
    pages = bd.discover_pages()
    docnames = [p.docname for p in pages]
    assert docnames[0] == "start" and docnames[1:3] == ["core/repro", "core/data"]
    with_nb = {(p.family, p.slug) for p in PAPERS if notebook_path(p).is_file()}
    assert {(p.paper.family, p.paper.slug) for p in pages if p.paper} == with_nb   # planned papers get no page
    nav = bd.toctrees(pages)
    assert all(re.search(rf"^{re.escape(d)}$|<{re.escape(d)}>$", nav, re.M) for d in docnames)   # no orphan page
    assert ":caption: LLM decoding" in nav and ":caption: Speech" in nav


def test_docs_links_point_at_the_site():
    "nbdev-export writes `Docs: <Documentation>/<page>.html.md`: the markdown twin this build writes beside each page."
    site = bd.project_urls()["Documentation"].rstrip("/")
    for page in bd.discover_pages():
        if not page.module: continue
        src = (ROOT / Path(*page.module.split("."))).with_suffix(".py").read_text()
        assert f"Docs: {site}/{page.docname}.html.md" in src, page.module


def _mini_checkout(root: Path, outputs: list) -> None:
    "A checkout with copyspec's notebook (given stored outputs), module, results, README and pyproject."
    for rel in ("pyproject.toml", "README.md", "paper_repro/decoding/copyspec.py", "results/REPORT.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    shutil.copytree(ROOT / "results" / "cpu" / "copyspec", root / "results" / "cpu" / "copyspec")
    nb = json.loads((ROOT / "nbs" / "decoding" / "copyspec.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code": cell["outputs"] = outputs
    (root / "nbs" / "decoding").mkdir(parents=True)
    (root / "nbs" / "decoding" / "copyspec.ipynb").write_text(json.dumps(nb))


@pytest.mark.parametrize("with_outputs", [False, True])
def test_stage_a_paper_page(tmp_path, with_outputs):
    png = base64.b64encode((ROOT / "results" / "cpu" / "copyspec" / "figure.png").read_bytes()).decode()
    outputs = [{"output_type": "display_data", "metadata": {}, "data": {"image/png": png}}] if with_outputs else []
    root = tmp_path / "checkout"
    _mini_checkout(root, outputs)
    src = tmp_path / "src"
    pages = bd.stage(src, root)
    assert [p.docname for p in pages] == ["decoding/copyspec"]
    nb = json.loads((src / "decoding" / "copyspec.ipynb").read_text())
    sources = ["".join(c["source"]) for c in nb["cells"]]
    assert not any(re.search(r"^\s*#\|", s, re.M) for c, s in zip(nb["cells"], sources) if c["cell_type"] == "code")
    assert all(c.get("outputs", []) == outputs for c in nb["cells"] if c["cell_type"] == "code")
    roles = [c["metadata"].get("docs_role") for c in nb["cells"]][-3:]
    assert roles == ["source", "results", "api"]
    results, api = sources[-2], sources[-1]
    assert "![copyspec: figure (cpu scale)](../results/cpu/copyspec/figure.png)" in results
    assert (src / "results" / "cpu" / "copyspec" / "figure.png").is_file()
    n_claims = len(load_claims(root / "results" / "cpu" / "copyspec" / "claims.json"))
    assert sum(l.startswith("| ") and " | `" in l for l in results.splitlines()) == n_claims
    assert ".. automodule:: paper_repro.decoding.copyspec" in api and "   CopySpecDrafter" in api
    assert len(nb["metadata"]["source_map"]) == len(nb["cells"])
    assert "(decoding/copyspec.ipynb)" in (src / "index.md").read_text()


def test_markdown_twin_is_plain_markdown(tmp_path):
    root = tmp_path / "checkout"
    _mini_checkout(root, [{"output_type": "stream", "name": "stdout", "text": "hello\n"}])
    pages = bd.stage(tmp_path / "src", root)
    staged = json.loads((tmp_path / "src" / "decoding" / "copyspec.ipynb").read_text())
    twin = bd.markdown_twin(staged, pages[0], "https://o.github.io/r/")
    assert twin.startswith("<!-- The markdown twin of https://o.github.io/r/decoding/copyspec.html")
    assert "{eval-rst}" not in twin and "{py:obj}" not in twin and ":::" not in twin and ")=\n" not in twin
    assert "### `CopySpecDrafter`" in twin and "```text\nhello\n```" in twin
