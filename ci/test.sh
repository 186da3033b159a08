#!/usr/bin/env bash
# What `make test` (and so CI) checks, in order. Each step names itself; the first failure stops the run.
set -euo pipefail
VENV=${1:-.venv}
BIN="$VENV/bin"
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0 MPLBACKEND=Agg
step() { echo; echo "=== $* ==="; }

step "nbdev-export leaves paper_repro/ unchanged"
"$BIN/nbdev-export"
if [[ -n "$(git status --porcelain -- paper_repro)" ]]; then
  git status --porcelain -- paper_repro; git diff --stat -- paper_repro
  echo "paper_repro/ is out of date with nbs/: run nbdev-export and commit the result"; exit 1
fi

step "nbdev-clean leaves nbs/ unchanged"
"$BIN/nbdev-clean"
if [[ -n "$(git status --porcelain -- nbs)" ]]; then
  git status --porcelain -- nbs
  echo "notebooks in nbs/ are not clean: run nbdev-clean and commit the result"; exit 1
fi

step "README catalogue is up to date"
"$BIN/paper-repro" readme --check

step "pytest"
"$BIN/pytest" -q

step "the wheel: built from the sdist, installed outside the checkout, the README snippet run there (ci/check_wheel.sh)"
ci/check_wheel.sh "$VENV"

step "docs build (make docs: the site in _docs/ from nbs/, README.md and results/, offline)"
make --no-print-directory docs VENV="$VENV"

step "docs site in headless Chromium: the landing page, copyspec and parallelbench show the figure, claims and API"
"$BIN/python" ci/check_docs.py

step "nbdev-test the substrate notebooks (nbs/core and every non-paper notebook of a family folder)"
"$BIN/nbdev-test" nbs/core
for nb in $("$BIN/python" -c "
from pathlib import Path; from paper_repro.core.catalog import PAPERS
slugs = {p.slug for p in PAPERS}
print(' '.join(str(n) for n in sorted(Path('nbs').glob('*/*.ipynb')) if n.parent.name != 'core' and n.stem not in slugs))"); do
  "$BIN/nbdev-test" "$nb"
done

step "every paper notebook at ci scale (papermill)"
"$BIN/paper-repro" run --all --scale ci

step "decoding baseline benchmark (bench core) at ci scale"
"$BIN/paper-repro" bench core --scale ci

step "decoding benchmark at ci scale"
"$BIN/paper-repro" bench decoding --scale ci

step "diffusion-LM decoding benchmark at ci scale"
"$BIN/paper-repro" bench dllm --scale ci

step "language-model architecture benchmark at ci scale"
"$BIN/paper-repro" bench lm --scale ci

step "visual generation benchmark at ci scale"
"$BIN/paper-repro" bench generation --scale ci

step "report builds"
"$BIN/paper-repro" report --scale ci --out results/ci/REPORT.md
"$BIN/paper-repro" report --scale cpu --out results/ci/REPORT-cpu.md
echo; echo "make test: all checks passed"
