# Panacea for LRS2: `make demo` simulates a night and reduces it; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATE ?= 20181108
DEMO_DIR ?= LRS2/demo

.PHONY: demo test venv bench lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,plot]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/panacea-lrs2 simulate --date $(DEMO_DATE) --out $(DEMO_DIR)/raw --seed 1
	$(BIN)/panacea-lrs2 -d $(DEMO_DATE) -s uv,orange,red,farred --baseraw $(DEMO_DIR)/raw --output $(DEMO_DIR)/reduced
	@echo "QA report: $(abspath $(DEMO_DIR))/reduced/NIGHTS/$(DEMO_DATE)/report.html"

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/science.py --reuse
	$(BIN)/panacea-lrs2 -d 20181108 --baseraw benchmarks/out --output benchmarks/out/reduced
	$(BIN)/python benchmarks/sources.py --raw benchmarks/out --reduced benchmarks/out/reduced

lint: venv
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
