#!/usr/bin/env bash
# Create the virtual environment (if missing) and install everything the project needs:
# Debian packages from ci/debian-packages.txt, torch from this machine's wheel cache, the package with its extras.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."

missing=()
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done < ci/debian-packages.txt
if (( ${#missing[@]} )); then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "bootstrap: creating $VENV"
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  echo "bootstrap: installing torch 2.14.1 / torchvision 0.29.1"
  $PIP install torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"
fi
# the distribution was called paper_repro (the public index's paper-repro, normalised) before it became
# paper-repro-notebooks: remove that one, so that one distribution provides the package and the command
if "$VENV/bin/python" -c "import importlib.metadata as m; m.distribution('paper_repro')" 2>/dev/null; then
  echo "bootstrap: removing the distribution installed under the old name paper_repro"
  $PIP uninstall -y paper_repro 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "bootstrap: installing paper_repro (distribution paper-repro-notebooks, editable) with the dev and hf extras"
$PIP install -e ".[dev,hf]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import paper_repro, nbdev, papermill, transformers" 
echo "bootstrap: done"
