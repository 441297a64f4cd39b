# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: lint test test-slow demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# The fused CPU kernels (else built on first use). Where a C++ compiler exists they
	# must build: a failure stops here. Without one the pure-TF pipeline runs instead.
	if command -v "$${CXX:-g++}" >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1; then \
	  $(PY) -m wa_tf.kernels; \
	else \
	  echo "no C++ compiler: the fused kernels are not built, the pure-TF pipeline runs"; \
	fi
	touch $(STAMP)

# ruff (ruff.toml: pyflakes, import order, pycodestyle) first, then the tests.
lint: $(STAMP)
	$(PY) -m ruff check wa_tf bin bench tests

test: lint
	$(PY) -m pytest

test-slow: lint
	$(PY) -m pytest -m slow

# A Winograd-aware F(4x4,3x3) INT8 model with learnable transforms on the digits bundled
# with scikit-learn (offline): a few minutes on 2 CPU cores. Re-running it after an
# interruption resumes the run; a finished run is never overwritten.
demo: $(STAMP)
	$(PY) bin/train.py --flagfile=configs/demo_digits.flags

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
