# One-command setup + main job / tests on a fresh machine (Python 3.11).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.irformer-installed
# spandrel is an independent implementation used only by the fidelity tests;
# installed without its dependencies because it declares torchvision (which
# would pull a CUDA torch).
TEST_EXTRAS := spandrel==0.4.2
# The export extra (onnx, onnxscript, onnxruntime; pinned in pyproject.toml) is
# installed with its dependencies (protobuf, ml_dtypes, ...) by `.[dev,export]`
# below: the ONNX export tests need it and skip, naming it, without it.

.PHONY: setup demo test test-slow lint bench clean-venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,export]'
	$(BIN)/pip install -q --no-deps $(TEST_EXTRAS)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/irformer demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
