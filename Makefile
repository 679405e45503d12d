# The commands README names. `make setup` creates .venv; everything else runs from it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/vanilla-mnist-sample

.PHONY: setup train test test-all lint bench docs clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch where this machine has it, so no multi-GB CUDA build is pulled.
	$(PY) -m pip install --quiet "torch==2.13.0" || echo "torch 2.13.0 not available here; the [test] extra picks a torch"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,docs]"
	$(PY) -c "import jaxae, jax; print('jaxae', jaxae.__version__, 'on jax', jax.__version__, jax.devices())"

# The document's experiment on the embedded MNIST sample: writes $(WORKDIR)/reconstructions.png.
train:
	rm -rf $(WORKDIR)
	$(PY) -m jaxae train --variant vanilla --dataset mnist-sample --epochs 20 --workdir $(WORKDIR)

# pytest-xdist: one worker per core, each test file on one worker (--dist loadscope), so a
# file's module-scoped fixtures (the 4-device and 2-process runs) are computed once, not once per
# worker. `test` leaves out the tests marked slow (the docs pages' examples, conv runs end to
# end, some real-process fault tests); `test-all` runs every test.
test:
	$(PY) -m pytest -q -n auto --dist loadscope -m "not slow" --durations=15 tests

test-all:
	$(PY) -m pytest -q -n auto --dist loadscope tests

# jaxae vs the document's PyTorch loop on this machine, one run; figures to stdout and bench.json.
bench:
	$(PY) -m jaxae bench --json bench.json

# The documentation site into site/; any warning (broken link, a docstring naming something missing) fails it.
docs:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

lint:
	$(PY) -m ruff check jaxae tests experiments
	$(PY) -m ruff format --check jaxae tests experiments

clean:
	rm -rf runs site .pytest_cache .hypothesis build *.egg-info jaxae.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
