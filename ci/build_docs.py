"""Build the documentation site (`make docs`): stage a Sphinx source tree, render it with myst-nb, add markdown twins.

1. **Stage** `_docs_src/` from the checkout: every notebook under `nbs/` (stored outputs kept, nbdev `#|` directive
   lines stripped, `#| hide` cells dropped), with each paper's committed results (figure, table, claims) and each
   module's API (autodoc) appended as markdown cells; the README as the landing page; `results/REPORT.md`; the
   benchmark tables; an API index. Planned papers (no notebook) appear in the landing page's catalogue only.
2. **Render** it with Sphinx (`docs/conf.py`: myst-nb with execution off, autodoc, furo) into `_docs/`.
3. **Twins**: nbdev writes each module's `Docs:` link (and `nbs/llms.txt`) as `<site>/<family>/<slug>.html.md`, the
   markdown twin of the page `<family>/<slug>.html`; this step writes those twins and `llms.txt` into the site.

Nothing is executed and nothing is downloaded. Run from anywhere: `python ci/build_docs.py [--src DIR] [--out DIR]`.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import importlib
import json
import os
import re
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # document this checkout's package, not an installed one

from paper_repro.cli import claim_table  # noqa: E402  (the report's claims table, so both show the same numbers)
from paper_repro.core.claims import holding_summary  # noqa: E402
from paper_repro.core.catalog import FAMILIES, PAPERS, Paper, load_claims  # noqa: E402

SCALES_SHOWN: tuple[str, ...] = ("cpu", "gpu")  # committed result scales a page shows, in this order
BENCH_SUITES: tuple[tuple[str, str], ...] = (("decoding", "Decoding benchmark"), ("dllm", "Diffusion-LM decoding benchmark"),
                                             ("lm", "Language-model architecture benchmark"))
FAMILY_TITLES: dict[str, str] = {
    "core": "Core substrate", "decoding": "LLM decoding", "dllm": "Diffusion LMs", "lm": "Language models",
    "speech": "Speech", "generation": "Generation", "vision": "Vision", "recognition": "Recognition",
    "multimodal": "Multimodal"}
# Substrate notebooks in reading order (as in README's layout); notebooks not listed follow alphabetically.
READING_ORDER: dict[str, tuple[str, ...]] = {
    "core": ("repro", "data", "lm", "fused", "train", "zoo", "decoding", "bench", "bench_core", "catalog", "cli"),
    "dllm": ("tasks", "core", "bench"),
    "lm": ("bench",),
    "speech": ("corpus", "features", "asr", "seq2seq"),
    "vision": ("data", "render", "video", "raycast", "backbones", "metrics", "fd"),
    "generation": ("core", "dit", "unet")}
CACHE = ".sphinx"  # folder of the stage holding Sphinx's doctrees and the warnings of the last build
# Warnings that name something the build could resolve (a missing file, page, label or module): they fail the build.
FIXABLE_WARNINGS = re.compile(r"image file not readable|unknown document|undefined label|failed to import|"
                              r"No module named|toctree contains reference to nonexisting|"
                              r"document isn't included in any toctree|duplicate label", re.I)


def project_urls(root: Path = ROOT) -> dict[str, str]:
    "`[project.urls]` of pyproject.toml: `Repository` (the code host) and `Documentation` (this site's base URL)."
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]


def write_if_changed(path: Path, text: str) -> None:
    "Write `text` to `path` unless it already holds it (an unchanged mtime lets Sphinx skip the page next time)."
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text: path.write_text(text)


def copy_if_changed(src: Path, dest: Path) -> None:
    "Copy a file unless `dest` already has the same bytes."
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.is_file() or dest.read_bytes() != src.read_bytes(): shutil.copy2(src, dest)


# --- notebook cells -------------------------------------------------------------------------------------------

_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def split_directives(source: str) -> tuple[dict[str, str], str]:
    "nbdev `#| name [value]` lines of a code cell's `source` as `{name: value}`, and the source without them."
    directives, kept = {}, []
    for line in source.splitlines():
        m = _DIRECTIVE.match(line)
        if m: directives[m.group(1)] = m.group(2)
        else: kept.append(line)
    return directives, "\n".join(kept).strip("\n")


def _source(cell: dict) -> str:
    "A cell's source as one string (notebooks store it as a string or a list of lines)."
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def stage_cell(cell: dict) -> dict | None:
    """The cell as the site shows it, or None to drop it. Code cells lose their `#|` lines; `#| hide` drops a cell,
    `#| echo: false` keeps only its output, `#| output: false` only its code; a cell left empty with no output goes."""
    if cell.get("cell_type") != "code": return dict(cell)
    directives, code = split_directives(_source(cell))
    if "hide" in directives: return None
    outputs = cell.get("outputs", [])
    if not code.strip() and not outputs: return None
    tags = list(cell.get("metadata", {}).get("tags", []))
    if directives.get("echo", "").lower() == "false": tags.append("remove-input")
    if directives.get("output", "").lower() == "false": tags.append("remove-output")
    metadata = {**cell.get("metadata", {}), **({"tags": tags} if tags else {})}
    return {**cell, "source": code, "metadata": metadata}


def default_exp(nb: dict) -> str | None:
    "The dotted module a notebook exports to (`#| default_exp X` -> `paper_repro.X`), or None."
    for cell in nb["cells"]:
        if cell.get("cell_type") == "code":
            directives, _ = split_directives(_source(cell))
            if "default_exp" in directives: return f"paper_repro.{directives['default_exp'].split()[0]}"
    return None


def markdown_cell(text: str, role: str, n: int = 0) -> dict:
    "A markdown cell this script adds; `role` (source / results / api) tells the markdown-twin writer what it is."
    return {"cell_type": "markdown", "id": f"docs-{role}-{n}", "metadata": {"docs_role": role},
            "source": text.strip() + "\n"}


# --- API names in prose: `name` -> a link to its autodoc entry, as nbdev's own docs do -------------------------

def api_symbols() -> dict[str, dict[str, str]]:
    "`{module: {qualified name: full dotted name}}` for the public functions, classes and methods in `_modidx`."
    from paper_repro._modidx import d
    out: dict[str, dict[str, str]] = {}
    for mod, syms in d["syms"].items():
        for full in syms:
            qual = full[len(mod) + 1:]
            if any(part.startswith("_") for part in qual.split(".")): continue
            out.setdefault(mod, {})[qual] = full
    return out


def name_resolver(symbols: dict[str, dict[str, str]], module: str | None, source_code: str) -> dict[str, str]:
    """Map short names to full dotted names for one page: names the page imports from `paper_repro` first, then its
    own module's, then names defined in exactly one module."""
    counts: dict[str, list[str]] = {}
    for syms in symbols.values():
        for qual, full in syms.items(): counts.setdefault(qual, []).append(full)
    names = {q: fulls[0] for q, fulls in counts.items() if len(fulls) == 1}
    names.update(symbols.get(module, {}) if module else {})
    for mod, imported in re.findall(r"from (paper_repro(?:\.\w+)*) import \(?([\w ,\n]+)\)?", source_code):
        for name in (n.strip() for n in imported.replace("\n", " ").split(",")):
            if name in symbols.get(mod, {}): names[name] = symbols[mod][name]
    return {q: f for q, f in names.items() if len(q.split(".")[-1]) > 2}


_INLINE_CODE = re.compile(r"(?<![`{}\w])`([A-Za-z_][\w.]*)(\(\))?`(?!`)")


def link_api_names(markdown: str, names: dict[str, str]) -> str:
    "Turn inline code naming an API object (`generate`, `CopyIndex.update()`) into a MyST `{py:obj}` link."
    def one(m: re.Match) -> str:
        full = names.get(m.group(1)) or (m.group(1) if m.group(1) in names.values() else None)
        return f"{{py:obj}}`{m.group(1)}{m.group(2) or ''} <{full}>`" if full else m.group(0)
    return _outside_fences(markdown, lambda text: _INLINE_CODE.sub(one, text))


def _outside_fences(markdown: str, transform) -> str:
    "Apply `transform` to the parts of `markdown` outside fenced code blocks and `$$` math."
    parts = re.split(r"(^```.*?^```[ \t]*$|^\$\$.*?^\$\$[ \t]*$)", markdown, flags=re.M | re.S)
    return "".join(p if i % 2 else transform(p) for i, p in enumerate(parts))


# --- docstrings: nbdev writes markdown, autodoc reads reStructuredText -----------------------------------------

_MD_LINK = re.compile(r"\[([^\]\n]+)\]\(([^)\s]+)\)")
_MD_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _rst_code(inner: str, before: str, after: str) -> str:
    "Inline code as reStructuredText: a cross-reference if it names a Python object, else a literal."
    rst = f":py:obj:`{inner.removesuffix('()')}`" if re.fullmatch(r"[A-Za-z_][\w.]*(\(\))?", inner) else f"``{inner}``"
    # reST inline markup must not touch a letter: `Draft`s -> :py:obj:`Draft`\ s
    return ("\\ " if before.isalnum() or before in ")]" else "") + rst + ("\\ " if after.isalnum() or after in "([" else "")


def _rst_text(text: str) -> str:
    "Plain docstring text as reST: links converted; `|` and a word's trailing `_` (reST syntax) escaped."
    text = text.replace("|", "\\|")
    text = re.sub(r"(?<=\w)_(?=\s|$|[.,;:!?)])", r"\\_", text)
    return _MD_LINK.sub(lambda m: f"`{m.group(1)} <{m.group(2)}>`__", text)


def markdown_to_rst(text: str) -> str:
    """The markdown of an nbdev docstring as reStructuredText: links, inline code (a cross-reference when it names
    a Python object), reST's special characters escaped, and a blank line before a list that follows a paragraph."""
    out, last = [], 0
    for m in _MD_CODE.finditer(text):
        before = text[m.start() - 1] if m.start() else " "
        after = text[m.end()] if m.end() < len(text) else " "
        out += [_rst_text(text[last:m.start()]), _rst_code(m.group(1), before, after)]
        last = m.end()
    lines = ("".join(out) + _rst_text(text[last:])).split("\n")
    item = re.compile(r"\s*([-*]|\d+\.) ")
    spaced = []
    for i, line in enumerate(lines):
        if item.match(line) and i and lines[i - 1].strip() and not item.match(lines[i - 1]): spaced.append("")
        spaced.append(line)
    return "\n".join(spaced)


def process_docstring(app, what: str, name: str, obj, options, lines: list[str]) -> None:
    """autodoc hook: a module's docstring is dropped (its page opens with the same summary, and its `Docs:` line
    points at that very page); every other docstring is converted from markdown to reStructuredText."""
    if what == "module": lines.clear(); return
    if what in ("data", "attribute") and "\n".join(lines).strip() == (inspect.getdoc(type(obj)) or "").strip():
        lines.clear(); return  # a constant has no docstring of its own: not its type's (dict's, tuple's)
    converted = markdown_to_rst("\n".join(lines)).split("\n")
    lines[:] = converted


def process_bases(app, name: str, obj, options, bases: list) -> None:
    "autodoc hook: a class that only derives from `object` gets no 'Bases' line."
    if bases == [object]: bases.clear()


# --- pages ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Page:
    "One notebook page of the site."
    docname: str          # path in the site without suffix, e.g. "decoding/copyspec" (-> decoding/copyspec.html)
    source: Path          # the notebook under nbs/
    family: str           # its nbs/ folder ("core", "decoding", ...), "" for the top level
    module: str | None    # the module it exports (`#| default_exp`), if any
    paper: Paper | None   # the catalogue entry, for a paper notebook


def discover_pages(root: Path = ROOT) -> list[Page]:
    "Every notebook under `nbs/` as a `Page`, in navigation order (`nbs/index.ipynb` becomes the `start` page)."
    by_slug = {(p.family, p.slug): p for p in PAPERS}
    pages = []
    for nb_path in sorted((root / "nbs").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in nb_path.parts: continue
        rel = nb_path.relative_to(root / "nbs").with_suffix("")
        family = rel.parent.as_posix() if rel.parent != Path(".") else ""
        docname = "start" if rel.as_posix() == "index" else rel.as_posix()
        nb = json.loads(nb_path.read_text())
        pages.append(Page(docname, nb_path, family, default_exp(nb), by_slug.get((family, rel.name))))
    return sorted(pages, key=_nav_key)


def family_order(family: str) -> tuple[int, str]:
    "Navigation order of an nbs/ folder: the top level, core, then the catalogue's families, then the rest."
    known = ("", "core", *FAMILIES)
    return (known.index(family), "") if family in known else (len(known), family)


def _nav_key(page: Page) -> tuple:
    "Within a folder: substrate notebooks in reading order, then papers by slug."
    stem = Path(page.docname).name
    order = READING_ORDER.get(page.family, ())
    rank = order.index(stem) if stem in order else len(order)
    return (family_order(page.family), page.paper is not None, rank, stem)


def _run_line(run_json: Path) -> str:
    "One sentence of provenance from a `run.json`."
    if not run_json.is_file(): return "No `run.json` was committed with these files."
    r = json.loads(run_json.read_text())
    commit = (r.get("git_commit") or "unknown")[:10]
    when = (r.get("started") or "")[:10]
    return (f"Run at commit `{commit}` on {when}, device `{r.get('device')}`, seed {r.get('seed')}, "
            f"{r.get('wall_s', 0):.0f} s wall time" + (f", {r['cpu_s']:.0f} CPU seconds." if "cpu_s" in r else "."))


def claims_table(claims: list[dict]) -> str:
    """Claims as the report's markdown table (`paper_repro.cli.claim_table`: kind, claim, statement, the paper's number
    and source, ours with its interval, unit, outcome, note) in a `claims-table` container, which
    docs/_static/custom.css lays out."""
    return ":::{container} claims-table\n" + "\n".join(claim_table(claims)) + "\n:::"


def results_markdown(paper: Paper, scale: str, page_dir: str, root: Path = ROOT, git_url: str = "") -> str | None:
    """The 'Committed results' section of a paper page at `scale` (figures, table, claims, provenance), or None when
    nothing was committed at that scale. Image paths are relative to the page's folder `page_dir`."""
    res = root / "results" / scale / paper.slug
    if not (res / "claims.json").is_file() and not (res / "figure.png").is_file(): return None
    site_rel = os.path.relpath(f"results/{scale}/{paper.slug}", page_dir or ".")
    label = f"{paper.slug}-results-{scale}"
    tree = f"[`results/{scale}/{paper.slug}/`]({git_url}/tree/main/results/{scale}/{paper.slug})" if git_url else \
        f"`results/{scale}/{paper.slug}/`"
    parts = [f"({label})=", f"## Committed results at `{scale}` scale", "",
             f"What `paper-repro run {paper.slug} --scale {scale}` wrote to {tree}. {_run_line(res / 'run.json')}"]
    figures = sorted(res.glob("*.png"), key=lambda p: (p.name != "figure.png", p.name))
    if figures:
        parts += ["", f"({paper.slug}-figure-{scale})=", "### Figure", ""]
        parts += [f"![{paper.slug}: {f.stem} ({scale} scale)]({site_rel}/{f.name})" for f in figures]
    if (res / "table.md").is_file():
        parts += ["", f"({paper.slug}-table-{scale})=", "### Table", "", (res / "table.md").read_text().strip()]
    if (res / "claims.json").is_file():
        claims = load_claims(res / "claims.json")
        parts += ["", f"({paper.slug}-claims-{scale})=", "### Claims", "",
                  f"At this scale {holding_summary(claims)} (a claim holds when its test, written before the run, "
                  "passes, with its whole 95% interval beyond the threshold where seeds, timing or test items move "
                  "it; not that we matched the paper's number). Ablations and invariants are listed but not "
                  "counted.", "", claims_table(claims)]
    return "\n".join(parts)


def public_names(module: str, root: Path = ROOT) -> list[str]:
    "The module's `__all__`, read from its source without importing it."
    path = root / Path(*module.split(".")).with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def module_summary(module: str, root: Path = ROOT) -> str:
    "The first paragraph of a module's docstring, read from its source."
    doc = ast.get_docstring(ast.parse((root / Path(*module.split(".")).with_suffix(".py")).read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def api_markdown(page: Page, root: Path = ROOT) -> str:
    "The page's 'API' section: a summary table of the module's public names, then autodoc's entry for each."
    names = public_names(page.module, root)
    summary = "\n".join(f"   {n}" for n in names)
    table = f".. autosummary::\n   :nosignatures:\n\n{summary}\n\n" if names else ""
    return (f"({page.docname.replace('/', '-')}-api)=\n## API: `{page.module}`\n\n"
            f"The public names of the module this notebook exports (`nbdev-export` → "
            f"`{Path(*page.module.split('.')).with_suffix('.py').as_posix()}`), with their signatures and docstrings.\n\n"
            f"```{{eval-rst}}\n.. currentmodule:: {page.module}\n\n{table}"
            f".. automodule:: {page.module}\n   :members:\n   :undoc-members:\n```")


def source_link(page: Page, git_url: str, root: Path = ROOT) -> str:
    "A line linking the notebook on the code host."
    rel = page.source.relative_to(root).as_posix()
    return f"*This page is the notebook [`{rel}`]({git_url}/blob/main/{rel}) with its stored outputs.*"


def source_map(cells: list[dict]) -> list[int]:
    """Each cell's first line, counting the cells' lines one after another. myst-nb otherwise numbers cell `i` from
    line 10000 * (i + 1), and pads every `{eval-rst}` block (the API) with that many blank lines before parsing it."""
    starts, line = [], 0
    for cell in cells:
        starts.append(line)
        line += _source(cell).count("\n") + 2
    return starts


def stage_notebook(page: Page, dest: Path, names: dict[str, str], root: Path = ROOT, git_url: str = "") -> dict:
    "Write the site's copy of one notebook to `dest`: cleaned cells, linked API names, then results and API sections."
    nb = json.loads(page.source.read_text())
    cells = [c for c in map(stage_cell, nb["cells"]) if c is not None]
    for c in cells:
        if c["cell_type"] == "markdown": c["source"] = link_api_names(_source(c), names)
    page_dir = Path(page.docname).parent.as_posix()
    extra = [markdown_cell(source_link(page, git_url, root), "source")] if git_url else []
    if page.paper:
        sections = [results_markdown(page.paper, s, page_dir, root, git_url) for s in SCALES_SHOWN]
        sections = [s for s in sections if s] or [
            f"({page.paper.slug}-results-cpu)=\n## Committed results\n\nNothing committed yet: "
            f"`paper-repro run {page.paper.slug} --scale cpu` writes `results/cpu/{page.paper.slug}/`."]
        extra += [markdown_cell(s, "results", i) for i, s in enumerate(sections)]
    if page.module: extra.append(markdown_cell(api_markdown(page, root), "api"))
    cells += extra
    metadata = {**nb.get("metadata", {}), "source_map": source_map(cells)}
    metadata.setdefault("language_info", {"name": "python", "pygments_lexer": "ipython3"})
    staged = {**nb, "metadata": metadata, "cells": cells}
    write_if_changed(dest, json.dumps(staged, indent=1, ensure_ascii=False) + "\n")
    return staged


def rewrite_readme_links(text: str, root: Path, git_url: str) -> str:
    """README links as the site needs them: a notebook becomes its page, a committed result stays (results/ is
    mirrored), anything else in the checkout points at the code host."""
    def one(m: re.Match) -> str:
        label, target = m.group(1), m.group(2)
        if re.match(r"[a-z]+:|#", target): return m.group(0)
        if target.startswith("nbs/") and target.endswith(".ipynb"):
            target = target[4:]
            if target == "index.ipynb": target = "start.ipynb"
        elif target.startswith("results/") and target.endswith(".png"): pass
        elif (root / target).exists(): target = f"{git_url}/blob/main/{target}"
        return f"[{label}]({target})"
    return _outside_fences(text, lambda t: _MD_LINK.sub(one, t))


def toctrees(pages: list[Page]) -> str:
    "The site's navigation: hidden toctrees, one per group (start pages, core substrate, each family)."
    groups: dict[str, list[str]] = {"Start here": ["Where to start <start>", "results/REPORT", "results/benchmarks", "api"]}
    for page in pages:
        if page.family:
            title = FAMILY_TITLES.get(page.family, page.family.replace("_", " ").capitalize())
            groups.setdefault(title, []).append(page.docname)
    blocks = [f"```{{toctree}}\n:hidden:\n:caption: {caption}\n\n" + "\n".join(docs) + "\n```"
              for caption, docs in groups.items()]
    return "\n\n".join(blocks)


def landing_page(pages: list[Page], names: dict[str, str], root: Path, git_url: str) -> str:
    "The landing page: the README (its catalogue lists every paper with its status) and the navigation."
    text = rewrite_readme_links((root / "README.md").read_text(), root, git_url)
    return link_api_names(text, names).rstrip() + "\n\n" + toctrees(pages) + "\n"


def report_page(root: Path) -> str | None:
    "results/REPORT.md as it is (its figure links are relative to results/, which the stage mirrors)."
    report = root / "results" / "REPORT.md"
    return report.read_text() if report.is_file() else None


def benchmarks_page(root: Path) -> str:
    "Every committed benchmark table, figure and claims ledger, per suite and scale."
    parts = ["# Benchmarks", "",
             "Each benchmark runs every method of a family on the same model, data and device in one process; speed is "
             "a ratio against the baseline measured in the same run. The tables are the committed files under "
             "`results/<scale>/bench/`, written by `paper-repro bench <suite> --scale <scale>`."]
    for suite, title in BENCH_SUITES:
        for scale in SCALES_SHOWN:
            table = root / "results" / scale / "bench" / f"{suite}.md"
            if not table.is_file(): continue
            parts += ["", f"(bench-{suite}-{scale})=", f"## {title} (`{scale}` scale)", "",
                      f"`paper-repro bench {suite} --scale {scale}`. {_run_line(table.with_name(f'{suite}.run.json'))}"]
            if table.with_suffix(".png").is_file(): parts += ["", f"![{title}, {scale} scale]({scale}/bench/{suite}.png)"]
            parts += ["", table.read_text().strip()]
            ledger = table.with_name(f"{suite}.claims.json")
            if ledger.is_file():
                parts += ["", f"(bench-{suite}-{scale}-claims)=", f"### Claims ledger ({scale})", "", "Each paper's headline next to the number measured "
                          "here.", "", claims_table(load_claims(ledger))]
    return "\n".join(parts) + "\n"


def api_index_page(pages: list[Page], root: Path) -> str:
    "A list of every module, grouped like the navigation, each with its summary and a link to its API section."
    parts = ["# API index", "", "Every module of `paper_repro`, with the notebook it is exported from. Each page ends "
             "with the module's API: signatures and docstrings of its public names."]
    family = None
    for page in pages:
        if not page.module: continue
        if page.family != family:
            family = page.family
            parts += ["", f"## {FAMILY_TITLES.get(family, family.capitalize())}", ""]
        parts.append(f"- {{py:mod}}`{page.module}` ([tutorial]({page.docname}.ipynb)): {module_summary(page.module, root)}")
    return "\n".join(parts) + "\n"


def stage(src: Path, root: Path = ROOT) -> list[Page]:
    "Build the Sphinx source tree in `src` (files that did not change keep their mtime); return the notebook pages."
    git_url = project_urls(root).get("Repository", "").rstrip("/")
    pages = discover_pages(root)
    symbols = api_symbols()
    wanted: set[Path] = set()
    for page in pages:
        dest = src / f"{page.docname}.ipynb"
        code = "\n".join(_source(c) for c in json.loads(page.source.read_text())["cells"] if c.get("cell_type") == "code")
        stage_notebook(page, dest, name_resolver(symbols, page.module, code), root, git_url)
        wanted.add(dest)
    names = name_resolver(symbols, None, "")
    generated = {"index.md": landing_page(pages, names, root, git_url), "results/benchmarks.md": benchmarks_page(root),
                 "api.md": api_index_page(pages, root)}
    report = report_page(root)
    generated["results/REPORT.md"] = report if report is not None else "# Results report\n\nNot generated yet: `paper-repro report`.\n"
    for rel, text in generated.items():
        write_if_changed(src / rel, text)
        wanted.add(src / rel)
    for png in (root / "results").rglob("*.png"):  # figures, mirrored so the report's relative links resolve
        dest = src / png.relative_to(root)
        copy_if_changed(png, dest)
        wanted.add(dest)
    for stale in [p for p in src.rglob("*") if p.is_file() and p not in wanted and CACHE not in p.relative_to(src).parts]:
        stale.unlink()  # e.g. the page of a notebook that was deleted
    return pages


# --- markdown twins (the `.html.md` pages nbdev's `Docs:` links and llms.txt point at) ------------------------------

def api_plain_markdown(module: str) -> str:
    "A module's public names with signatures and docstrings, in plain markdown (for the markdown twin)."
    mod = importlib.import_module(module)
    parts = [f"## API: `{module}`"]
    for name in getattr(mod, "__all__", []):
        obj = getattr(mod, name, None)
        if obj is None or getattr(obj, "__module__", module) != module: continue
        try: sig = str(inspect.signature(obj)) if callable(obj) else ""
        except (TypeError, ValueError): sig = ""
        kind = "class" if inspect.isclass(obj) else "def" if callable(obj) else ""
        parts += ["", f"### `{name}`", "", f"```python\n{kind} {name}{sig}\n```" if kind else f"`{name}`"]
        if inspect.getdoc(obj) and (callable(obj) or inspect.isclass(obj)): parts += ["", inspect.getdoc(obj)]
    return "\n".join(parts)


def _output_text(output: dict) -> str | None:
    "The text of a stored output (stream, or text/plain of a result), or None for images and other media."
    if output.get("output_type") == "stream": return "".join(output.get("text", ""))
    data = output.get("data", {})
    if "text/markdown" in data: return None
    if "text/plain" in data and not any(k.startswith("image/") for k in data): return "".join(data["text/plain"])
    return None


def markdown_twin(staged: dict, page: Page, site_url: str) -> str:
    "The markdown twin of a staged notebook page: its prose, code and text outputs, results, and plain-markdown API."
    html = f"{site_url.rstrip('/')}/{page.docname}.html"
    parts = [f"<!-- The markdown twin of {html} (nbdev's `Docs:` links and llms.txt point here). -->"]
    for cell in staged["cells"]:
        src = _source(cell)
        role = cell.get("metadata", {}).get("docs_role")
        if role == "api": parts.append(api_plain_markdown(page.module)); continue
        if cell["cell_type"] == "markdown":
            src = re.sub(r"^\([\w-]+\)=\n|^:::(\{container\}.*)?\n?", "", src, flags=re.M)
            parts.append(re.sub(r"\{py:obj\}`([^<`]+) <[^>]+>`", r"`\1`", src))
        elif cell["cell_type"] == "code":
            parts.append(f"```python\n{src}\n```")
            for out in cell.get("outputs", []):
                text = _output_text(out)
                if text is not None: parts.append(f"```text\n{text.rstrip()}\n```")
                elif any(k.startswith("image/") for k in out.get("data", {})): parts.append(f"*(figure: see {html})*")
    return "\n\n".join(parts).strip() + "\n"


def write_twins(pages: list[Page], src: Path, out: Path, root: Path = ROOT) -> int:
    "Write `<out>/<docname>.html.md` for every page that exports a module, the result figures, and `llms.txt`."
    site_url = project_urls(root).get("Documentation", "")
    n = 0
    for page in pages:
        if not page.module: continue
        staged = json.loads((src / f"{page.docname}.ipynb").read_text())
        write_if_changed(out / f"{page.docname}.html.md", markdown_twin(staged, page, site_url))
        n += 1
    for png in (src / "results").rglob("*.png"): copy_if_changed(png, out / png.relative_to(src))
    if (root / "nbs" / "llms.txt").is_file(): copy_if_changed(root / "nbs" / "llms.txt", out / "llms.txt")
    return n


# --- build -------------------------------------------------------------------------------------------------------

def sphinx_build(src: Path, out: Path, jobs: str, warnings_file: Path) -> int:
    "Run Sphinx's html builder with docs/conf.py; warnings go to the console and to `warnings_file`."
    from sphinx.cmd.build import build_main
    doctrees = src / CACHE / "doctrees"  # beside the stage, so the site folder holds only what is published
    return build_main(["-b", "html", "-c", str(ROOT / "docs"), "-d", str(doctrees), "-j", jobs, "-q",
                       "-w", str(warnings_file), str(src), str(out)])


def fixable_warnings(warnings_file: Path) -> list[str]:
    "The warnings that name something the build could resolve (see `FIXABLE_WARNINGS`)."
    if not warnings_file.is_file(): return []
    return [w for w in warnings_file.read_text().splitlines() if FIXABLE_WARNINGS.search(w)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=ROOT / "_docs_src", help="staging folder (default _docs_src/)")
    parser.add_argument("--out", type=Path, default=ROOT / "_docs", help="site folder (default _docs/)")
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose nbs/, README and results/ to stage")
    # Serial is faster here: on 2 busy cores -j 2 took 94 s wall / 53 s CPU against 70 s / 44 s for -j 1.
    parser.add_argument("-j", "--jobs", default="1", help="Sphinx parallel processes (default 1; 'auto' = one per core)")
    parser.add_argument("--stage-only", action="store_true", help="stage the source tree, do not render it")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    pages = stage(args.src, args.root.resolve())
    print(f"docs: staged {len(pages)} notebooks in {args.src} ({time.perf_counter() - t0:.1f} s)")
    if args.stage_only: return 0
    warnings_file = args.src / CACHE / "warnings.txt"
    warnings_file.parent.mkdir(parents=True, exist_ok=True)
    rc = sphinx_build(args.src, args.out, args.jobs, warnings_file)
    if rc: print(f"docs: sphinx-build failed (exit {rc})", file=sys.stderr); return rc
    n = write_twins(pages, args.src, args.out, args.root.resolve())
    all_warnings = warnings_file.read_text().splitlines() if warnings_file.is_file() else []
    fixable = fixable_warnings(warnings_file)
    print(f"docs: site in {args.out}/index.html, {n} markdown twins; {len(all_warnings)} warning lines "
          f"({len(fixable)} fixable) in {warnings_file}; {time.perf_counter() - t0:.1f} s")
    if fixable:
        print("docs: these warnings name a missing file, page, label or module:\n  " + "\n  ".join(fixable), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
