"""Packaging hook: the wheel carries the committed data.

The metadata is in pyproject.toml. Building a wheel (not an editable install, which reads the checkout's data/) copies
the top-level files of data/ (MANIFEST.json, every file it lists, the zoo card) into paper_repro/_data/, where
paper_repro.core.data finds them with importlib.resources. Every file the manifest lists must be present with its
recorded checksum, or the build fails naming it: a wheel never ships data its own manifest would reject.
"""
import hashlib
import json
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA = Path(__file__).resolve().parent / "data"


def shipped_files(folder: Path) -> list[str]:
    "Top-level, regular, not hidden files (the rule of paper_repro.core.data.shipped_files, which setup.py cannot import)."
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""): h.update(block)
    return h.hexdigest()


def checked_data_files(folder: Path = DATA) -> list[str]:
    "The files to ship, after checking every manifest entry against its file; a SystemExit naming the first bad one."
    manifest_path = folder / "MANIFEST.json"
    if not manifest_path.is_file(): raise SystemExit(f"setup.py: {manifest_path} is missing: the wheel would ship no data")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for name, entry in sorted(manifest.items()):
        path = folder / name
        if not path.is_file(): raise SystemExit(f"setup.py: {path} is listed in data/MANIFEST.json but missing")
        if _sha256(path) != entry["sha256"]:
            raise SystemExit(f"setup.py: {path} does not match its sha256 in data/MANIFEST.json; rebuild or restore it")
    return shipped_files(folder)


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
