"""The embedded catalogue, the path helpers and the derived paper status (paper_repro.core.catalog)."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from paper_repro.core.catalog import (FAMILIES, PAPERS, STATUSES, Paper, catalog_frame, catalog_markdown, get_paper,
                                      load_claims, module_path, notebook_path, paper_status, papers_in, results_dir,
                                      status_counts)
from paper_repro.core.catalog import test_path as paper_test_path
from paper_repro.core.repro import project_root

from conftest import CLAIM, touch


def make_reproduced(root: Path, slug: str, claims: list | None = None) -> Path:
    "Create every file that makes `slug` count as reproduced; return its cpu results folder."
    touch(notebook_path(slug, root), "{}")
    touch(module_path(slug, root))
    touch(paper_test_path(slug, root))
    res = results_dir(slug, "cpu", root)
    touch(res / "figure.png")
    touch(res / "table.csv", "a\n1\n")
    touch(res / "claims.json", json.dumps([CLAIM] if claims is None else claims))
    return res


def test_catalogue_shape():
    assert len(PAPERS) == 53
    assert [p.number for p in PAPERS] == list(range(1, 54))
    assert len({p.slug for p in PAPERS}) == 53
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", p.slug) for p in PAPERS)
    assert all(p.family in FAMILIES and 2000 <= p.year <= 2030 and p.title for p in PAPERS)
    assert Counter(p.family for p in PAPERS) == dict(decoding=8, dllm=4, lm=10, speech=5, generation=6, vision=7,
                                                     recognition=7, multimodal=6)
    with pytest.raises(Exception):  # frozen
        PAPERS[0].slug = "x"


CATALOG_MD = project_root().parent / "shared" / "papers" / "CATALOG.md"


@pytest.mark.skipif(not CATALOG_MD.is_file(), reason="design folder not beside this checkout")
def test_embedded_rows_match_catalog_md():
    rows = re.findall(r"^\| (\d+) \| (\w+) \| (\w+) \| .*\((?:.*, )?(\d{4})\) \|", CATALOG_MD.read_text(), re.M)
    assert [(int(n), s, f, int(y)) for n, s, f, y in rows] == [(p.number, p.slug, p.family, p.year) for p in PAPERS]


def test_get_paper():
    assert get_paper("copyspec") == Paper(53, "copyspec", "decoding", PAPERS[-1].title, 2025, "RazvanDu/CopySpec")
    with pytest.raises(ValueError, match=r"unknown paper slug 'copyspek'; did you mean copyspec\?.*paper-repro list"):
        get_paper("copyspek")
    with pytest.raises(ValueError, match="unknown paper slug 'qqqq'; `paper-repro list` shows all 53 papers"):
        get_paper("qqqq")


def test_paths(tmp_path):
    p = get_paper("learn2pd")
    assert notebook_path(p, tmp_path) == tmp_path / "nbs/dllm/learn2pd.ipynb"
    assert module_path("learn2pd", tmp_path) == tmp_path / "paper_repro/dllm/learn2pd.py"
    assert paper_test_path(p, tmp_path) == tmp_path / "tests/test_learn2pd.py"
    assert results_dir(p, "gpu", tmp_path) == tmp_path / "results/gpu/learn2pd"
    assert notebook_path(p).parent.parent.parent == project_root()
    with pytest.raises(ValueError, match="valid scales"):
        results_dir(p, "huge", tmp_path)


def test_status_progression(tmp_path):
    slug = "pearl"
    assert paper_status(slug, tmp_path) == "planned"
    touch(notebook_path(slug, tmp_path), "{}")
    assert paper_status(slug, tmp_path) == "planned"  # notebook not exported yet
    touch(module_path(slug, tmp_path))
    assert paper_status(slug, tmp_path) == "implemented"
    res = make_reproduced(tmp_path, slug)
    assert paper_status(slug, tmp_path) == "reproduced"
    assert status_counts(tmp_path) == dict(planned=52, implemented=0, reproduced=1)
    # each missing piece drops it back to implemented
    for missing in [paper_test_path(slug, tmp_path), res / "figure.png", res / "table.csv", res / "claims.json"]:
        saved = missing.read_text()
        missing.unlink()
        assert paper_status(slug, tmp_path) == "implemented", missing
        touch(missing, saved)
    assert paper_status(slug, tmp_path) == "reproduced"


@pytest.mark.parametrize("claims", ["[]", "{}", "not json", json.dumps([{**CLAIM, "holds": "yes"}]),
                                    json.dumps([{k: v for k, v in CLAIM.items() if k != "note"}])])
def test_bad_claims_are_not_reproduced(tmp_path, claims):
    res = make_reproduced(tmp_path, "ccd")
    touch(res / "claims.json", claims)
    assert paper_status("ccd", tmp_path) == "implemented"


def test_load_claims_names_the_file(tmp_path):
    good = touch(tmp_path / "a" / "claims.json", json.dumps([CLAIM]))
    assert load_claims(good) == [CLAIM]
    for text, msg in [("{}", "must be a JSON list"), ("[1]", "claim #0 is not an object"), ("{", "cannot read"),
                      (json.dumps([{**CLAIM, "our_value": True}]), "field 'our_value' must be a number")]:
        bad = touch(tmp_path / "b" / "claims.json", text)
        with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*" + msg):
            load_claims(bad)


def test_frame_and_markdown(tmp_path):
    make_reproduced(tmp_path, "copyspec")
    touch(notebook_path("pearl", tmp_path), "{}")
    touch(module_path("pearl", tmp_path))
    df = catalog_frame(tmp_path)
    assert list(df.columns) == ["no", "slug", "family", "title", "year", "status", "detail"] and len(df) == 53
    assert set(df.status) <= set(STATUSES)
    assert df.set_index("slug").status[["copyspec", "pearl", "ppd"]].tolist() == ["reproduced", "implemented", "planned"]
    md = catalog_markdown(tmp_path)
    assert "| 53 | [copyspec](nbs/decoding/copyspec.ipynb) | decoding |" in md
    assert "| 25 | [pearl](nbs/decoding/pearl.ipynb) |" in md and "| 51 | ppd | decoding |" in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 54  # header + 53 rows
    assert md.rstrip().splitlines()[-1] == "**Status:** 1 reproduced · 1 implemented · 51 planned (53 papers)"


def test_family_filter():
    assert [p.slug for p in papers_in("speech")] == ["speecht5", "subtitle_asr", "oneavm", "stateful_conformer",
                                                    "qwen_audio"]
    assert len(catalog_frame(family="lm")) == 10
    with pytest.raises(ValueError, match="unknown family 'llm'; valid families: decoding, dllm, lm"):
        catalog_markdown(family="llm")
