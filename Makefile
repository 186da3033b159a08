# paper_repro: the two commands are `make repro` and `make test`; both set up .venv first.
SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.bootstrapped

.PHONY: repro test zoo docs wheels venv clean-results

$(STAMP): pyproject.toml ci/bootstrap.sh ci/debian-packages.txt
	bash ci/bootstrap.sh $(VENV)
	touch $(STAMP)

venv: $(STAMP)

## Regenerate every paper and every benchmark at cpu scale; write results/REPORT.md and the README tables
repro: $(STAMP)
	$(BIN)/paper-repro run --all --scale cpu
	$(BIN)/paper-repro bench core --scale cpu
	$(BIN)/paper-repro bench decoding --scale cpu
	$(BIN)/paper-repro bench dllm --scale cpu
	$(BIN)/paper-repro bench lm --scale cpu
	$(BIN)/paper-repro bench generation --scale cpu
	$(BIN)/paper-repro report --scale cpu
	$(BIN)/paper-repro readme

## Everything CI checks (see ci/test.sh)
test: $(STAMP)
	bash ci/test.sh $(VENV)

## Retrain the tokenizer and the zoo LMs (about 10 minutes on 2 cores) and update data/MANIFEST.json
zoo: $(STAMP)
	cd nbs/core && ../../$(BIN)/papermill zoo.ipynb /tmp/zoo_executed.ipynb -p retrain True --cwd .

## Build the wheels into dist/: the package (code, substrate data, manifest) and one data wheel per paper family
wheels: $(STAMP)
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation -w dist .
	$(BIN)/python ci/build_data_wheels.py dist

## Build the documentation site into _docs/ (offline; notebooks with their stored outputs, README, report, API)
docs: $(STAMP)
	$(BIN)/python ci/build_docs.py
