"""Packaging hook: the wheel carries the committed data.

The metadata is in pyproject.toml. Building a wheel (not an editable install, which reads the checkout's data/) copies
the top-level files of data/ of the "core" family (MANIFEST.json whole, the substrate's files it lists, the zoo card)
into paper_repro/_data/, where paper_repro.core.data finds them with importlib.resources. A paper family's files go into
its companion wheel paper-repro-data-<family> instead (ci/build_data_wheels.py, `make wheels`), so no wheel passes the
public index's 100 MB limit. Every file shipped must be present with its recorded checksum, or the build fails naming
it: a wheel never ships data its own manifest would reject.
"""
import hashlib
import json
import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA = Path(__file__).resolve().parent / "data"


def shipped_files(folder: Path) -> list[str]:
    "Top-level, regular, not hidden files (the rule of paper_repro.core.data.shipped_files, which setup.py cannot import)."
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


_FAMILY_NOTEBOOK = re.compile(r"\bnbs/([a-z][a-z0-9_]*)/")


def data_family(entry: dict) -> str:
    "The family whose wheel ships an entry's file (paper_repro.core.data.data_family's rule: setup.py cannot import it)."
    for field in ("source", "rebuild"):
        found = _FAMILY_NOTEBOOK.search(entry.get(field, ""))
        if found: return found.group(1)
    return "core"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""): h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path = DATA) -> dict:
    "data/MANIFEST.json as a dict; a SystemExit if it is missing."
    manifest_path = folder / "MANIFEST.json"
    if not manifest_path.is_file(): raise SystemExit(f"setup.py: {manifest_path} is missing: the wheel would ship no data")
    return json.loads(manifest_path.read_text(encoding="utf-8"))


def data_families(folder: Path = DATA) -> list[str]:
    "The paper families that have a companion data wheel (every family of the manifest but core)."
    return sorted({data_family(entry) for entry in read_manifest(folder).values()} - {"core"})


def checked_data_files(folder: Path = DATA, family: str = "core") -> list[str]:
    """The files the wheel of `family` ships, after checking each manifest entry among them against its file; a
    SystemExit naming the first bad one. The core wheel ships the files the manifest does not list too (the manifest
    itself, the zoo card); a companion wheel ships only its family's manifest entries."""
    manifest = read_manifest(folder)
    mine = {name for name, entry in manifest.items() if data_family(entry) == family}
    for name in sorted(mine):
        entry, path = manifest[name], folder / name
        if not path.is_file(): raise SystemExit(f"setup.py: {path} is listed in data/MANIFEST.json but missing")
        if _sha256(path) != entry["sha256"]:
            raise SystemExit(f"setup.py: {path} does not match its sha256 in data/MANIFEST.json; rebuild or restore it")
    if family != "core": return sorted(mine)
    return [name for name in shipped_files(folder) if name in mine or name not in manifest]


class build_py_with_data(build_py):
    "build_py, then copy the checked data files into <build_lib>/paper_repro/_data (not for editable installs)."

    def run(self):
        editable = getattr(self, "editable_mode", False)  # an editable install runs from the checkout: data/ is read
        package = Path(self.build_lib) / "paper_repro"
        if not editable and package.exists(): shutil.rmtree(package)  # nothing removed since an earlier build lingers
        super().run()
        if editable: return
        dest = package / "_data"
        dest.mkdir(parents=True)
        for name in checked_data_files(): shutil.copyfile(DATA / name, dest / name)


if __name__ == "__main__":  # what pip and setuptools.build_meta run; tests import the helpers above
    setup(cmdclass={"build_py": build_py_with_data})
