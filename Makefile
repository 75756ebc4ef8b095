# advtrain: `make demo` and `make test` work on a fresh machine (they run `setup` first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
METHOD ?= baseline
METHODS ?= baseline,fgm,awp,sift
SEEDS  ?= 42,43,44
ARGS   ?=
COMPETITION ?= nlp-getting-started
DATA   := $(if $(filter nlp-getting-started,$(COMPETITION)),data,data/$(COMPETITION))
# Without an NVIDIA driver, pin the CPU build of torch (a plain `pip install torch` pulls several GB of CUDA).
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-ci.txt)

.PHONY: help setup demo test test-all lint train predict blend bench compare notebooks data push status output submit submissions

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

setup: $(BIN)/.installed

$(BIN)/.installed: requirements.txt requirements-dev.txt constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt $(CONSTRAINTS)
	touch $@

demo: setup  ## the whole pipeline offline: synthetic tweets, tiny DeBERTa-v2 -> submissions/demo/
	$(BIN)/python advtrain.py demo $(ARGS)

test: setup  ## the fast tests (CPU, offline, under 2 minutes)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: setup  ## every test, the slow end-to-end ones too (torchrun, notebooks, compare, compile); what CI runs
	$(BIN)/python -m pytest -q tests

lint: setup  ## ruff with the settings in pyproject.toml
	$(BIN)/python -m ruff check advtrain.py tools tests

train: setup  ## make train METHOD=awp ARGS="--epochs 3" [COMPETITION=slug] -> submissions/$(METHOD)/
	$(BIN)/python advtrain.py train --method $(METHOD) --competition $(COMPETITION) --data-dir $(DATA) \
		--output-dir submissions/$(METHOD) $(ARGS)

predict: setup  ## make predict RUNS=submissions/awp,submissions/fgm -> submissions/predict/ (offline, saved runs)
	$(BIN)/python advtrain.py predict --runs $(RUNS) --data-dir $(DATA) --output-dir submissions/predict --overwrite $(ARGS)

blend: setup  ## make blend RUNS=submissions/a,submissions/b -> submissions/blend/ (weights fitted on validation)
	$(BIN)/python advtrain.py blend --runs $(RUNS) --output-dir submissions/blend --overwrite $(ARGS)

bench: setup  ## speed table of every method and of the article's setup -> submissions/bench/
	$(BIN)/python tools/bench.py $(ARGS)

compare: setup  ## make compare METHODS=baseline,fgm SEEDS=42,43 ARGS="--epochs 2" -> submissions/compare/
	$(BIN)/python advtrain.py compare --methods $(METHODS) --seeds $(SEEDS) --competition $(COMPETITION) \
		--data-dir $(DATA) $(ARGS)

# --- Kaggle round trip: `make setup` installs the kaggle CLI into .venv; credentials as the CLI accepts them ---
KIT := $(BIN)/python tools/kaggle_kit.py
METHODS_FROM := $(origin METHODS)
SUBMIT_MESSAGE = $(value MSG)
export METHODS METHODS_FROM METHOD FILE SUBMIT_MESSAGE FORCE GPU_SESSIONS COMPETITION INFERENCE KERNEL VERSION

notebooks:  ## regenerate notebooks/ from the templates in tools/kaggle_kit.py
	$(PYTHON) tools/kaggle_kit.py notebooks

data: setup  ## download and unzip the competition files into data/ (data/<slug>/ for COMPETITION=<slug>)
	$(KIT) data

push: setup  ## utility script, then the notebooks in waves of GPU_SESSIONS (2); METHODS=fgm,awp; INFERENCE=1 adds the inference one
	$(KIT) push

status: setup  ## run status of every kernel, and the end of the log of a failed one
	$(KIT) status

output: setup  ## each finished kernel's submission, metrics, log, plots -> submissions/kaggle/<name>/ (FORCE=1 replaces)
	$(KIT) output

submit:  ## METHOD=awp|ensemble or FILE=path: check, then submit; KERNEL=slug [VERSION=N]: a code competition's notebook
	$(PYTHON) tools/kaggle_kit.py submit-check
	$(MAKE) --no-print-directory setup
	$(KIT) submit

submissions: setup  ## your past submissions and their scores
	$(KIT) submissions
