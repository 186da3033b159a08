# Sphinx settings of the documentation site. `make docs` (ci/build_docs.py) stages the source tree in _docs_src/
# and builds it with this file (`sphinx-build -c docs`); do not run sphinx-build on nbs/ directly.
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
sys.path.insert(0, str(ROOT))  # autodoc imports this checkout's package

import build_docs  # noqa: E402
import paper_repro  # noqa: E402

project = "paper_repro"
author = "paper_repro developers"
copyright = "paper_repro developers (Apache-2.0)"
release = version = paper_repro.__version__
html_baseurl = build_docs.project_urls(ROOT).get("Documentation", "")

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.autosummary"]
exclude_patterns = [build_docs.CACHE, "**/.ipynb_checkpoints"]

# Notebooks are rendered from their stored outputs, never executed (the committed run is what the reader sees).
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "show"
# Widgets need a live kernel: show a progress bar's text fallback instead of an empty widget view.
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# API: signatures with type hints, docstrings (nbdev writes markdown; build_docs.process_docstring converts it).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True, "no-value": True}  # PAPERS' value is 53 entries long
autosummary_generate = False

html_theme = "furo"
html_title = f"paper_repro {release}"
html_static_path = [str(ROOT / "docs" / "_static")]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None


def _outputs_beside_the_stage(app) -> None:
    "myst-nb writes notebook output files (images) to <site>/../jupyter_execute, the checkout root: keep them in the stage."
    app.env.mystnb_config = app.env.mystnb_config.copy(
        output_folder=str(Path(app.srcdir) / build_docs.CACHE / "jupyter_execute"))


def setup(app):
    app.connect("autodoc-process-docstring", build_docs.process_docstring)
    app.connect("autodoc-process-bases", build_docs.process_bases)
    app.connect("builder-inited", _outputs_beside_the_stage, priority=900)  # after myst-nb's own handler (500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
