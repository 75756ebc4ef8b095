# advtrain: `make demo` and `make test` work on a fresh machine (they run `setup` first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
METHOD ?= baseline
ARGS   ?=
# Without an NVIDIA driver, pin the CPU build of torch (a plain `pip install torch` pulls several GB of CUDA).
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-ci.txt)

.PHONY: setup demo test train

setup: $(BIN)/.installed

$(BIN)/.installed: requirements.txt requirements-dev.txt constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt $(CONSTRAINTS)
	touch $@

demo: setup  ## the whole pipeline offline: synthetic tweets, tiny DeBERTa-v2 -> submissions/demo/
	$(BIN)/python advtrain.py demo $(ARGS)

test: setup  ## the test suite (CPU, offline)
	$(BIN)/python -m pytest -q tests

train: setup  ## make train METHOD=awp ARGS="--epochs 3" -> submissions/$(METHOD)/
	$(BIN)/python advtrain.py train --method $(METHOD) --output-dir submissions/$(METHOD) $(ARGS)
