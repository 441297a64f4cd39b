# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# The fused CPU kernels (else built on first use); without a compiler the
	# pure-TF pipeline runs instead.
	$(PY) -m wa_tf.kernels || echo "fused kernels not built: the pure-TF pipeline will run"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# A Winograd-aware F(4x4,3x3) INT8 model with learnable transforms on the digits bundled
# with scikit-learn (offline): a few minutes on 2 CPU cores. Re-running it after an
# interruption resumes the run; a finished run is never overwritten.
demo: $(STAMP)
	$(PY) bin/train.py --flagfile=configs/demo_digits.flags

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
