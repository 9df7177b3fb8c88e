PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned for the project's own set-up; the package itself requires torch>=2.11.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fxmem plan fxmem.examples:demo_workload --budget 70% --plot demo_plan.png

# one worker per CPU; a module's tests stay on one worker (module-scoped fixtures plan once)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadscope

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadscope -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/estimate_accuracy.py
	$(BIN)/python bench/estimate_large.py
	$(BIN)/python bench/ilp_gpt2_small.py
	$(BIN)/python bench/recompute_peers.py
	$(BIN)/python bench/microbatch.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
