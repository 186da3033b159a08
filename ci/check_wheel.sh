#!/usr/bin/env bash
# The package is installable anywhere: build the sdist and, from it, the wheel; check what they hold (the code as git
# tracks it, the committed data with its checksums, LICENSE, CITATION.cff); install the wheel with --no-deps into a
# fresh virtual environment outside the checkout and, from a folder that is not a checkout, run README.md's "Using
# the library" snippet (cut from between its markers, so README and check cannot drift), a Hugging Face adapter
# snippet, and the commands that need a checkout (one line, exit 2).
#
# What is honest here: the wheel's own files must suffice for the package, its data and its licence. Its dependencies
# (torch and friends, gigabytes) are not reinstalled: the fresh environment sees the existing environment's
# site-packages through a .pth file, via a folder of links to every entry there except this project's own (the
# editable install's finder, its .pth and metadata), so nothing of the checkout can be imported. It does not prove
# that pyproject.toml declares every dependency.
#
# Usage: ci/check_wheel.sh [VENV]   (default .venv: the environment that builds the wheel and lends the dependencies)
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="$(cd "$VENV/bin" && pwd)/python"
unset PYTHONPATH PAPER_REPRO_DATA PAPER_REPRO_TRACEBACK
export PYTHONHASHSEED=0 MPLBACKEND=Agg PIP_DISABLE_PIP_VERSION_CHECK=1
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/paper_repro_wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
case "$(cd "$WORK" && pwd -P)/" in "$(pwd -P)"/*) fail "the temporary folder $WORK lies inside the checkout" ;; esac

echo "check_wheel: sdist from the checkout, then the wheel from the unpacked sdist (PEP 517 hooks, no isolation)"
"$PY" -c "import setuptools, sys; v = tuple(int(x) for x in setuptools.__version__.split('.')[:2]);
sys.exit(0 if v >= (77, 0) else f'check_wheel: setuptools {setuptools.__version__} in $VENV is older than 77')"
hook() {  # hook NAME OUTDIR: run setuptools' PEP 517 hook in the current folder, its log kept unless it fails
  "$PY" -c "import setuptools.build_meta as b, sys; r = getattr(b, sys.argv[1])(sys.argv[2]); print(r, file=sys.stderr)" \
    "$1" "$2" > "$WORK/$1.log" 2>&1 || { cat "$WORK/$1.log" >&2; fail "$1 failed"; }
  tail -n1 "$WORK/$1.log"
}
SDIST=$(hook build_sdist "$WORK/sdist")
mkdir "$WORK/src" && tar -xzf "$WORK/sdist/$SDIST" -C "$WORK/src"
SRC=$(echo "$WORK"/src/*/)
WHEEL=$(cd "$SRC" && hook build_wheel "$WORK/dist")
echo "check_wheel: built $SDIST and $WHEEL ($(du -h "$WORK/dist/$WHEEL" | cut -f1)) in ${SECONDS}s"
mkdir "$WORK/data_dist"
(cd "$SRC" && "$PY" ci/build_data_wheels.py "$WORK/data_dist") || fail "the companion data wheels did not build"

# what they must hold: git's view of the checkout (tracked files), not whatever lies around in it
git ls-files -- 'paper_repro/*.py' > "$WORK/tracked_py.txt"
git ls-files -- data | awk -F/ 'NF == 2 { print $2 }' > "$WORK/tracked_data.txt"
"$PY" - "$WORK/sdist/$SDIST" "$WORK/dist/$WHEEL" "$WORK/tracked_py.txt" "$WORK/tracked_data.txt" "$WORK/data_dist" <<'PY'
import hashlib, importlib.util, json, re, sys, tarfile, zipfile
from email.parser import Parser
from pathlib import Path
sdist, wheel, tracked_py, tracked_data, data_dist = sys.argv[1:]
tracked_py = set(open(tracked_py).read().split())
tracked_data = set(open(tracked_data).read().split())
errors = []
with tarfile.open(sdist) as t:
    names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
for need in ["CITATION.cff", "LICENSE", "pyproject.toml", "setup.py", "README.md"] + [f"data/{f}" for f in tracked_data]:
    if need not in names: errors.append(f"sdist lacks {need}")
z = zipfile.ZipFile(wheel)
files = set(z.namelist())
info = next(n.split("/")[0] for n in files if n.split("/")[0].endswith(".dist-info"))
meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
if meta["Name"] != "paper-repro-notebooks": errors.append(f"wheel's distribution name is {meta['Name']!r}")
if meta.get("License-Expression") != "Apache-2.0": errors.append(f"License-Expression is {meta.get('License-Expression')!r}")
if f"{info}/licenses/LICENSE" not in files: errors.append(f"wheel lacks {info}/licenses/LICENSE")
if "paper-repro = paper_repro.cli:main" not in z.read(f"{info}/entry_points.txt").decode():
    errors.append("wheel has no console script paper-repro = paper_repro.cli:main")
py = {n for n in files if n.endswith(".py")}
if py != tracked_py:
    errors.append(f"wheel's modules differ from git's: missing {sorted(tracked_py - py)[:5]}, extra {sorted(py - tracked_py)[:5]}")
# the data: the main wheel ships the manifest and the core files, each companion paper_repro_data_<family> the rest
wheels = {"paper_repro": z} | {re.match(r"(paper_repro_data_[a-z0-9_]+)-", p.name).group(1): zipfile.ZipFile(p)
                               for p in sorted(Path(data_dist).glob("*.whl"))}
shipped = {}  # file name -> the package whose _data holds it
for package, wz in wheels.items():
    for n in wz.namelist():
        if not n.startswith(f"{package}/_data/"): continue
        name = n.removeprefix(f"{package}/_data/")
        if name in shipped: errors.append(f"{name} ships in both {shipped[name]} and {package}")
        shipped[name] = package
if set(shipped) != tracked_data:
    errors.append(f"the wheels' _data differ from git's data/: missing {sorted(tracked_data - set(shipped))}, "
                  f"extra {sorted(set(shipped) - tracked_data)}")
manifest = json.loads(z.read("paper_repro/_data/MANIFEST.json")) if shipped.get("MANIFEST.json") == "paper_repro" else {}
if not manifest: errors.append("the main wheel has no paper_repro/_data/MANIFEST.json")
spec = importlib.util.spec_from_file_location("paper_repro_setup", "setup.py")  # its data_family rule
helpers = importlib.util.module_from_spec(spec); spec.loader.exec_module(helpers)
for name, entry in manifest.items():
    family = helpers.data_family(entry)
    want = "paper_repro" if family == "core" else f"paper_repro_data_{family}"
    if shipped.get(name) != want: errors.append(f"{name} (family {family}) ships in {shipped.get(name)}, not {want}")
    got = hashlib.sha256(wheels[want].read(f"{want}/_data/{name}")).hexdigest() if shipped.get(name) == want else None
    if got != entry["sha256"]: errors.append(f"{want}/_data/{name}: sha256 {got} != manifest {entry['sha256']}")
for package, wz in wheels.items():
    size = sum(i.compress_size for i in wz.infolist())
    if size > 95 * 2**20:  # the public index refuses files over 100 MB unless asked: split the family's data further
        errors.append(f"the wheel of {package} is {size / 2**20:.0f} MiB, over 95 MiB")
if errors: sys.exit("check_wheel: FAILED:\n  " + "\n  ".join(errors))
print(f"check_wheel: contents ok: {len(py)} modules, {len(shipped)} data files in {len(wheels)} wheels "
      f"({len(manifest)} in the manifest, checksums match), LICENSE, CITATION.cff in the sdist")
PY

echo "check_wheel: [${SECONDS}s] a fresh venv outside the checkout, the wheel installed with --no-deps"
"$PY" -m venv --without-pip "$WORK/venv"
SHARED=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
OWN=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir "$WORK/deps"
for entry in "$SHARED"/*; do
  name=$(basename "$entry")
  case "$name" in
    paper_repro|paper_repro[-_.]*|paper_repro_notebooks*|__editable__*|*.pth|*.egg-link|__pycache__) continue ;;
  esac
  ln -s "$entry" "$WORK/deps/$name"
done
echo "$WORK/deps" > "$OWN/_existing_dependencies.pth"
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WORK/dist/$WHEEL"
NEW="$WORK/venv/bin"
mkdir "$WORK/elsewhere" && cd "$WORK/elsewhere"

echo "check_wheel: [${SECONDS}s] without its companion wheel, a paper family's file is a one-line error naming it"
"$NEW/python" - <<'PY'
from paper_repro.core.data import DataError, data_family, data_path, read_manifest
name = next(n for n, e in sorted(read_manifest().items()) if data_family(e) == "speech")
try: data_path(name)
except DataError as e: assert "paper-repro-data-speech, which is not installed" in str(e), e
else: raise AssertionError(f"{name} was found without its companion wheel")
PY
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WORK"/data_dist/*.whl

echo "check_wheel: [${SECONDS}s] the package, its data and its licence come from the wheel"
"$NEW/python" - "$OWN" <<'PY'
import sys
from importlib.metadata import distribution
from pathlib import Path
import paper_repro
from paper_repro.core.data import data_path, data_source, read_manifest
from paper_repro.core.repro import checkout_root
own = Path(sys.argv[1]).resolve()
where = Path(paper_repro.__file__).resolve()
assert where.is_relative_to(own), f"paper_repro imported from {where}, not from the venv's {own}"
assert checkout_root() is None, checkout_root()
folder, source = data_source()
assert source == "package" and folder.resolve() == own / "paper_repro" / "_data", (folder, source)
for name in read_manifest(): data_path(name)  # every shipped file, companions included, against its checksum
dist = distribution("paper-repro-notebooks")
assert any(f.name == "LICENSE" for f in dist.files), "LICENSE not installed"
print(f"check_wheel: paper_repro {paper_repro.__version__} from {where.parent}, {len(read_manifest())} data files verified")
PY

echo "check_wheel: [${SECONDS}s] README.md's 'Using the library' snippet"
"$NEW/python" - "$ROOT/README.md" > "$WORK/usage.py" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
m = re.search(r"<!-- usage:start -->\s*```python\n(.*?)```\s*<!-- usage:end -->", text, re.S)
if m is None: sys.exit("check_wheel: README.md has no ```python block between <!-- usage:start --> and <!-- usage:end -->")
print(m.group(1))
PY
"$NEW/python" "$WORK/usage.py"

echo "check_wheel: [${SECONDS}s] a Hugging Face model through HFCausalLM and drafters"
"$NEW/python" - <<'PY'
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from paper_repro.core.decoding import DraftModelDrafter, generate
from paper_repro.core.hf import HFCausalLM
from paper_repro.decoding.copyspec import CopySpecDrafter

def tiny_gpt2(seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_positions=128, n_embd=32, n_layer=1, n_head=2, initializer_range=0.3,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return GPT2LMHeadModel(cfg).to(torch.float64).eval()

hf, small = tiny_gpt2(0), tiny_gpt2(1)
prompt = [5, 17, 42, 17, 42, 17, 9, 3]
with torch.no_grad():
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=24, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
target = HFCausalLM(hf)
for name, drafter in [("greedy", None), ("copyspec", CopySpecDrafter(gamma=3)),
                      ("draft model", DraftModelDrafter(HFCausalLM(small), gamma=3))]:
    out = generate(target, prompt, max_new_tokens=24, drafter=drafter)
    assert out.tokens == ref, f"{name}: {out.tokens} != generate(do_sample=False) {ref}"
print("check_wheel: HFCausalLM on a 1-layer GPT-2: greedy, CopySpec and a draft model give generate()'s tokens")
PY

echo "check_wheel: [${SECONDS}s] outside a checkout, the commands that need one say so in one line and exit 2"
expect() {  # expect CODE PATTERN COMMAND...: exit status CODE, and PATTERN in a one-line stderr
  local code=$1 pattern=$2; shift 2
  local rc=0; "$@" > "$WORK/out.txt" 2> "$WORK/err.txt" || rc=$?
  [[ $rc == "$code" ]] || { cat "$WORK/err.txt" >&2; fail "'$*' exited $rc, expected $code"; }
  [[ $(wc -l < "$WORK/err.txt") == 1 ]] && grep -q -- "$pattern" "$WORK/err.txt" \
    || { cat "$WORK/err.txt" >&2; fail "'$*' should say '$pattern' in one line on stderr"; }
}
expect 0 "status .* needs a source checkout" "$NEW/paper-repro" list
grep -q "copyspec" "$WORK/out.txt" || fail "'paper-repro list' outside a checkout does not list the catalogue"
grep -Eq "planned|implemented|reproduced" "$WORK/out.txt" && fail "'paper-repro list' outside a checkout shows a status"
expect 2 "needs a source checkout" "$NEW/paper-repro" run copyspec --scale ci
expect 2 "needs a source checkout" "$NEW/paper-repro" report --scale ci
expect 2 "needs a source checkout" "$NEW/paper-repro" readme --check
expect 1 "set PAPER_REPRO_DATA" "$NEW/python" -c "
import sys
from paper_repro.core.data import register_file
try: register_file('code_tokenizer.json', 's', 'l', 'r')
except PermissionError as e: sys.exit(print(e, file=sys.stderr) or 1)"
[[ -z "$(ls -A "$WORK/elsewhere")" ]] || fail "the snippets or commands wrote into the current folder: $(ls -A)"
echo "check_wheel: ok (${SECONDS}s)"
