# `make test` and `make demo` build their own environment on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: test demo lint bench gpu data clean

# The run-time environment (what `make demo` needs), then the test extra on top for `make test`.
$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[plot]'
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

demo: $(RUN_STAMP)
	$(VENV)/bin/minidpo demo

# The shipped LibraChem-mini sets, regenerated from the shipped lists and banks (tests check they match).
SHIPPED := minidpo/data/librachem_mini
data: $(STAMP)
	rm -rf build/librachem_mini
	$(VENV)/bin/minidpo gen all --offline --modes text,smiles -k 6 --out build/librachem_mini --no-progress
	cd build/librachem_mini && cp train.jsonl test_triplets.jsonl val_*.jsonl eval_*.jsonl ../../$(SHIPPED)/

bench: $(STAMP)
	$(PY) -m benchmarks

# One call on a fresh H100/H200 with the image's python3 (benchmarks/gpu_check.sh says what to carry).
gpu:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
