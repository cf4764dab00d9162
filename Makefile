# Two entry points: `make demo` (train the embedded digits demo) and `make test` (lint + tests).
# Each creates its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are installed as a matched pair first, so the resolver never swaps torch for
# another build; override on machines that need another pair, e.g. `make TORCH=torch==2.11.0 TORCHVISION=torchvision==0.26.0`.
TORCH ?= torch==2.14.1
TORCHVISION ?= torchvision==0.29.1

.PHONY: venv demo test lint clean

$(BIN)/isd-train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" "$(TORCHVISION)"
	$(BIN)/pip install -q -e ".[cpu,serve,parquet,timm,milvus,map,dev]"
	touch $@

venv: $(BIN)/isd-train

# train ISD on digits, build the train/test indices, k-NN (trained vs untrained), a neighbours report
# (isdretrieve/demo.py); rerunning resumes, and reuses what is finished
demo: venv
	$(BIN)/python -m isdretrieve.cli.demo --out runs/demo

lint: venv
	$(BIN)/ruff check isdretrieve tests benchmarks
	$(BIN)/ruff format --check isdretrieve tests benchmarks

test: venv
	$(BIN)/ruff check isdretrieve tests benchmarks
	$(BIN)/ruff format --check isdretrieve tests benchmarks
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
