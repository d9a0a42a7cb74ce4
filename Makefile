# Two commands on a fresh clone: `make demo` and `make test`. Each makes its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= torch,jax,flax,equinox,tensorflow,test,viz,models,peers,experiments,metrics,metrics-peers,dataset,dask,ray
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	$(if $(findstring tensorflow,$(EXTRAS)),$(PY) -m pip install -q --no-deps -c constraints.txt $(XPLIQUE))
	touch $@

# xplique 2.0.2 declares tensorflow<=2.20, scipy<=1.15.3 and scikit-image<=0.25.2, which pip cannot
# resolve with the pinned tensorflow 2.21.0 and scipy 1.17.1; it runs on them (tests/backends/test_tf_peers.py),
# so it is installed without its declared dependencies, with those it imports.
XPLIQUE := xplique tensorflow-probability tf-keras einops dm-tree decorator

demo: $(STAMP)
	$(VENV)/bin/gradcam-ref demo

# Chromium lays out the built site's math in tests/test_docs.py; where apt-get cannot install it, that test skips.
test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || echo "make test: no chromium, its test will skip"
	$(PY) -m pytest
	$(MAKE) lint

# mypy sees the package as it is installed (backends/ inside gradcam_ref/), through a tree of links.
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(VENV)/bin/ruff check gradcam_ref backends tests benchmarks
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)
	cp -rs $(CURDIR)/gradcam_ref $(TYPECHECK)/gradcam_ref
	ln -s $(CURDIR)/backends $(TYPECHECK)/gradcam_ref/backends
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p gradcam_ref

# The teaching site in site/: figures from docs/make_figures.py, then mkdocs build --strict.
.PHONY: docs
docs: $(STAMP)
	$(PY) docs/make_figures.py docs/figures
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	mkdir -p out/bench
	$(PY) -m benchmarks.run --json out/bench/results.json
	@echo "rows in out/bench/results.json; to publish: cp out/bench/results.json benchmarks/ and update docs/benchmarks.md from python -m benchmarks.report"

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
