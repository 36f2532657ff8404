import os

import pytest
import torch

# Triton kernels run on the GPU when there is one. Without one they run through Triton's CPU interpreter,
# which must be chosen before triton is imported (the kernels read the flag at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every process a test starts (gloo ranks, torchrun, CLIs) dumps its Python stacks on a fatal signal: a rank
# that aborts (std::terminate, seen rarely in gloo CPU ranks) then shows where, in the failing test's output.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

# Two cores on CI: keep intra-op threads from oversubscribing when tests spawn worker processes.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def kernel_device() -> torch.device:
    """Where tests launch Triton kernels: the GPU when there is one (compiled kernels), else the CPU through
    the interpreter. A GPU machine run with TRITON_INTERPRET=1 also gets the CPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("no CUDA device, and TRITON_INTERPRET=0 turned off the CPU interpreter")


@pytest.fixture
def device():
    """The device of every test that launches a Triton kernel (see `kernel_device`). fp32 matmuls are pinned
    to full precision for the test: the kernels' fp32 contract is exact fp32 products (dot_precision in
    kernels/_common.py), but the backward's cuBLAS calls follow torch's global TF32 switch, which an earlier
    test or the caller may have turned on (TF32's ~5e-4 relative error is above the fp32 tolerances)."""
    chosen = kernel_device()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield chosen
    torch.set_float32_matmul_precision(precision)


@pytest.fixture
def interpreter_env(monkeypatch) -> None:
    """For tests that spawn gloo CPU ranks running Triton kernels: the children inherit TRITON_INTERPRET=1,
    also on a GPU machine (gloo ranks hold CPU tensors, which only the interpreter can launch kernels on).
    Set for the test's duration only; the test itself launches no kernel in this process."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
