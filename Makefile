# All set-up a fresh machine needs: `make demo` or `make test`.
# torch is pinned to the CPU build first, so the `torch>=2.4` requirement is already
# met and pip never pulls the multi-GB CUDA wheels on a development machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -q
TORCH_CPU ?= torch==2.13.0
# Suites that need their own process: Keras reads KERAS_BACKEND at import, and
# TensorFlow and Triton must not share one (their LLVM copies clash).
SEPARATE := tests/tensorflow tests/keras tests/triton

# dist-check installs the built wheel (not editable) here, fresh each time
DIST_VENV := build/dist-venv

.PHONY: demo test lint docs dist dist-check bench clean

$(VENV)/.%-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e ".[$*]"
	# timm's pooling module, for the reduction tests: without its dependencies, since its torchvision
	# requirement would replace the CPU build of torch with a CUDA one (no CPU torchvision on PyPI)
	if [ "$*" = test ]; then $(PY) -m pip install -q --no-deps "timm>=1.0"; fi
	# compile the torch C++ CPU kernels now (about a minute, cached on disk) rather than on first use
	$(PY) -c "from anypool.backends.torch import cpu" || echo "anypool: C++ kernels not built; torch uses the portable path"
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/anypool demo

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check src tests docs $(wildcard benchmarks examples)

# the documentation site, into site/; a broken reference or link is an error
docs: $(VENV)/.test-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

test: $(VENV)/.test-installed lint docs
	$(PYTEST) tests $(foreach d,$(SEPARATE),--ignore=$(d))
	if [ -d tests/tensorflow ]; then KERAS_BACKEND=tensorflow $(PYTEST) tests/tensorflow; fi
	if [ -d tests/keras ]; then for b in tensorflow jax torch; do KERAS_BACKEND=$$b $(PYTEST) tests/keras || exit 1; done; fi
	if [ -d tests/triton ]; then TRITON_INTERPRET=1 $(PYTEST) tests/triton; fi

# sdist and wheel into dist/
dist: $(VENV)/.test-installed
	rm -rf dist
	$(PY) -m build --outdir dist .

# the wheel installed in a fresh venv with the demo's frameworks, then a smoke test run
# outside the source tree (so only the installed copy can be imported)
dist-check: dist
	rm -rf $(DIST_VENV)
	python3 -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install -q --upgrade pip
	$(DIST_VENV)/bin/python -m pip install -q $(TORCH_CPU)
	$(DIST_VENV)/bin/python -m pip install -q "$$(ls dist/anypool-*.whl)[demo]"
	cp tests/smoke_installed.py build/  # run from build/: tests/ on sys.path would shadow packages (tests/triton)
	cd build && ANYPOOL_CACHE_DIR=$(CURDIR)/build/dist-cache PATH=$(CURDIR)/$(DIST_VENV)/bin:$$PATH \
		$(CURDIR)/$(DIST_VENV)/bin/python smoke_installed.py

bench: $(VENV)/.test-installed
	$(VENV)/bin/anypool bench --json benchmarks/cpu.json --png benchmarks/cpu.png
	$(PY) benchmarks/render.py  # the tables of BENCHMARKS.md from the new JSON

clean:
	rm -rf $(VENV) build dist site *.egg-info src/*.egg-info
