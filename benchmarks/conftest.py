"""pytest-benchmark suites (benchmarks/test_bench_*.py): `make bench` times them (`pytest benchmarks/
--benchmark-enable --benchmark-only`); `make test` runs each once at a tiny size, as a smoke test (pyproject's
addopts hold --benchmark-disable, under which a benchmark calls its function once and times nothing).

The bench_*.py scripts beside them import the same functions, so that one measurement has one implementation.
"""

import pytest
import torch


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Every suite runs on the CPU and, where there is one, on the GPU (the same files, device a parameter)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    """True when benchmarks are disabled (make test), as pytest-benchmark decides it: the suites then run one
    call at a tiny size."""
    config = request.config
    return config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")
