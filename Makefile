# Two commands a fresh machine needs: `make demo` and `make test`. Both set up .venv first.
# `make test` leaves out the tests marked heavy (pyproject's addopts); `make test-heavy` runs
# just those, `make test-all` both: every test once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch keeps the install small; override for a GPU machine (TORCH=torch).
TORCH ?= torch==2.13.0

.PHONY: demo test test-heavy test-all check bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,examples,dev]"
	# The CPU kernels of gatattn/csrc, built once here rather than inside the first test.
	$(PY) -c "from gatattn.backends.native import cpu_kernels; cpu_kernels()"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

# loadfile: the three kernel-build tests share one worker, which builds once (loadgroup's
# xdist_group marks are ignored with pytest 9.2: pytest-xdist issue 1386); in collection order,
# which conftest.py starts with the builds, the longest file.
test-heavy: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q -m heavy

test-all: test test-heavy

check: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m gatattn.check --device cpu

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_sparse.py
	$(PY) benchmarks/bench_gps.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check gatattn kernels tests examples benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
