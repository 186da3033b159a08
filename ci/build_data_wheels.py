"""Build the companion data wheels: one `paper-repro-data-<family>` per paper family of data/MANIFEST.json.

The package's own wheel (`pip wheel --no-deps -w dist .`) ships the substrate's data and the whole manifest; each paper
family's committed files (trained nets, mostly) ship in a wheel of their own, so that no wheel passes the public index's
100 MB limit. Each is a plain setuptools project written to a temporary folder: the package `paper_repro_data_<family>`
with the family's files, checksum-checked by setup.py's rule, under `_data/`, the licence, and a pin on the same version
of paper-repro-notebooks (whose manifest lists their checksums). paper_repro.core.data finds them once installed.

Usage: python ci/build_data_wheels.py OUTDIR [FAMILY ...]   (run from a checkout or an unpacked sdist; default: all)
"""
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = """[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
description = "The committed data of paper_repro's {family} notebooks (trained nets), for paper-repro-notebooks"
requires-python = ">=3.11"
license = "Apache-2.0"
license-files = ["LICENSE"]
dependencies = ["paper-repro-notebooks=={version}"]

[tool.setuptools]
packages = ["{package}"]

[tool.setuptools.package-data]
{package} = ["_data/*"]
"""


def _setup_helpers():
    "setup.py's data rules (importing it does not run setup())."
    spec = importlib.util.spec_from_file_location("paper_repro_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def package_version() -> str:
    text = (ROOT / "paper_repro" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def build(family: str, out: Path, helpers, version: str) -> Path:
    "Write the project of `family`'s companion wheel to a temporary folder and build its wheel into `out`."
    files = helpers.checked_data_files(helpers.DATA, family)
    if not files: raise SystemExit(f"build_data_wheels: no data file of family {family!r} in data/MANIFEST.json")
    package = f"paper_repro_data_{family}"
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / package / "_data").mkdir(parents=True)
        (project / package / "__init__.py").write_text(
            f'"The committed data of paper_repro\'s {family} notebooks; paper_repro.core.data reads _data/."\n')
        for name in files: shutil.copyfile(helpers.DATA / name, project / package / "_data" / name)
        shutil.copyfile(ROOT / "LICENSE", project / "LICENSE")
        (project / "pyproject.toml").write_text(PYPROJECT.format(dist=f"paper-repro-data-{family}", version=version,
                                                                  family=family, package=package))
        hook = "import setuptools.build_meta as b, sys; print(b.build_wheel(sys.argv[1]))"
        done = subprocess.run([sys.executable, "-c", hook, str(out.resolve())], cwd=project, capture_output=True,
                              text=True)
        if done.returncode: sys.exit(f"build_data_wheels: {family}: the build failed:\n{done.stdout}{done.stderr}")
        return out / done.stdout.strip().splitlines()[-1]


def main(argv: list[str]) -> None:
    if not argv: sys.exit(__doc__)
    out, wanted = Path(argv[0]), argv[1:]
    helpers = _setup_helpers()
    families = helpers.data_families()
    unknown = sorted(set(wanted) - set(families))
    if unknown: sys.exit(f"build_data_wheels: unknown families {unknown}; the manifest has {families}")
    out.mkdir(parents=True, exist_ok=True)
    version = package_version()
    for family in wanted or families:
        wheel = build(family, out, helpers, version)
        print(f"build_data_wheels: {wheel.name} ({wheel.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
