"""Loss fwd+bwd beside its peers, one benchmark group per (device, shape): hqclip-fast's implementations,
open_clip's ClipLoss, Inf-CL (CUDA, where installed) and the GEMM floor (the matrix products alone). The case,
its inputs and the timed step are bench_loss.build_step, the same as `python benchmarks/bench_loss.py`."""

import pytest
import torch
from bench_loss import Unavailable, _launch, build_step

# (batch, dim): the CPU's are what this machine times in a minute; the GPU's a node's per-GPU local batch.
SHAPES = {"cpu": {"small": (1024, 512), "large": (4096, 512)}, "cuda": {"small": (8192, 768), "large": (32768, 768)}}
SMOKE_SHAPE = (16, 8)
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
IMPLS = ["chunked", "reference", "triton", "open_clip", "inf_cl", "gemm_floor"]


def pytest_generate_tests(metafunc):
    smoke = metafunc.config.getoption("benchmark_disable") and not metafunc.config.getoption("benchmark_enable")
    metafunc.parametrize("shape", ["smoke"] if smoke else ["small", "large"])


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_fwd_bwd(benchmark, device, smoke, impl, shape):
    if impl == "triton" and device.type != "cuda":
        pytest.skip("Triton kernels need a CUDA device (the CPU interpreter's timings mean nothing)")
    batch, dim = SMOKE_SHAPE if smoke else SHAPES[device.type][shape]
    try:
        _, _, step = build_step(impl, batch, dim, device, DTYPES[device.type])
    except Unavailable as err:
        pytest.skip(str(err))
    benchmark.group = f"loss {device.type} B={batch} D={dim}"
    benchmark.extra_info.update(batch=batch, dim=dim, dtype=str(DTYPES[device.type]))
    with _launch(impl):
        step()  # warm-up: compilation, allocator, caches
        loss = benchmark.pedantic(step, rounds=1 if smoke else 5, iterations=1)
    assert torch.isfinite(loss)
