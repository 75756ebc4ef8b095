# advtrain: `make demo` and `make test` work on a fresh machine (they run `setup` first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
METHOD ?= baseline
MSG    ?=
METHODS ?= baseline,fgm,awp,sift
SEEDS  ?= 42,43,44
ARGS   ?=
# Without an NVIDIA driver, pin the CPU build of torch (a plain `pip install torch` pulls several GB of CUDA).
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-ci.txt)

.PHONY: help setup demo test test-all lint train bench compare notebooks data push status output submit submissions

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

train: setup  ## make train METHOD=awp ARGS="--epochs 3" -> submissions/$(METHOD)/
	$(BIN)/python advtrain.py train --method $(METHOD) --output-dir submissions/$(METHOD) $(ARGS)

bench: setup  ## speed table of every method and of the article's setup -> submissions/bench/
	$(BIN)/python tools/bench.py $(ARGS)

compare: setup  ## make compare METHODS=baseline,fgm SEEDS=42,43 ARGS="--epochs 2" -> submissions/compare/
	$(BIN)/python advtrain.py compare --methods $(METHODS) --seeds $(SEEDS) $(ARGS)

# --- Kaggle round trip (needs `pip install kaggle` and an API token; see the README) ---
KIT := $(PYTHON) tools/kaggle_kit.py

notebooks:  ## regenerate notebooks/ from the templates in tools/kaggle_kit.py
	$(KIT) notebooks

data:  ## download and unzip the competition files into data/ (idempotent)
	$(KIT) data

push:  ## push the utility script, wait until its run is COMPLETE, then push every notebook
	$(KIT) push

status:  ## run status of every kernel
	$(KIT) status

output:  ## fetch each finished kernel's files into submissions/<method>/
	$(KIT) output

submit: setup  ## make submit METHOD=awp [MSG="..."]: check, then submit submissions/$(METHOD)/submission.csv
	$(BIN)/python tools/kaggle_kit.py submit "$(METHOD)" "$(MSG)"

submissions:  ## your past submissions and their scores
	$(KIT) submissions
