# Set-up and entry points. Each target creates the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Torch threads per process on the 2-core reference machine (tests use one per worker, two workers).
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test benchmarks fashion-mnist gpu-bundle clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[test,openvino]"
	touch $(STAMP)

install: $(STAMP)

## demo: train AdvRAD (CPU preset) on the embedded Fashion-MNIST data, test it next to Padim, print the table.
demo: $(STAMP)
	$(BIN)/python examples/demo.py

## test: the test suite (CPU, offline).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

## fashion-mnist: the full Fashion-MNIST from Debian (benchmarks use it; demo and tests use the embedded subset).
fashion-mnist:
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

benchmarks: $(STAMP) fashion-mnist
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

## gpu-bundle: the wheels the GPU machine lacks (Python 3.12, no network there) and this package's, into .whl/,
## checked against the machine's packages; benchmarks/gpu/install.sh installs them there.
gpu-bundle: $(STAMP)
	$(BIN)/python benchmarks/gpu/bundle.py .whl

clean:
	rm -rf $(VENV) results .whl
