# graphopt: two commands do everything on a fresh machine.
#   make demo   bootstrap .venv from pyproject.toml and run the main job on a bundled model
#   make test   bootstrap .venv and run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench fuzz lint clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch: the CPU wheel (the digits fixture is trained with it; from_torch uses it)
	$(BIN)/python -m pip install -q "torch==2.13.0" || echo "torch 2.13.0 CPU wheel not found: from_torch tests will skip"
	$(BIN)/python -m pip install -q -e ".[test,tvm,plot]"
	# silero-vad ships its ONNX models; its runtime deps (torch, torchaudio) are not needed here
	$(BIN)/python -m pip install -q --no-deps "silero-vad>=5"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/graphopt inspect fixtures/mobilenet_block.onnx
	$(BIN)/graphopt optimize fixtures/mobilenet_block.onnx -o out/mobilenet_block.opt.onnx

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not real" $(PYTEST_ARGS)

BENCHES := simplify quantize prune memory tvm

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	for b in $(BENCHES); do $(BIN)/python bench/$$b.py || exit 1; done

fuzz: $(STAMP)
	GRAPHOPT_FUZZ_EXAMPLES=1000 $(BIN)/python -m pytest -q tests/test_fuzz.py -p no:randomly

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff mypy
	$(BIN)/ruff check graphopt passes tests bench fixtures
	$(BIN)/ruff format --check graphopt passes tests bench fixtures
	$(BIN)/mypy graphopt passes tests fixtures
	# the bench scripts import each other as bench.<module>: module names from the repository root
	$(BIN)/mypy --explicit-package-bases bench

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache
