"""Peers of the fused loss for benchmarks/bench_loss.py on a GPU: Inf-CL and the GEMM floor.

Each builder returns a zero-argument callable that runs one forward + backward at the benchmark's shapes on
already-made inputs, so the caller times all entries the same way.

GEMM floor: the cuBLAS time of the matrix products that a loss which never stores the logits must do,
at the same shapes and dtype, measured in the same run:
  forward   S = I @ K.T                         (K = [T; N]: B x (B or 2B) x D)
  backward  S = I @ K.T again (recomputed), dI = G @ K, dK = G.T @ I
`gemm_floor_products(..., recompute=False)` gives the 3-product variant (a loss that kept S) for reference.
"""

from __future__ import annotations

import torch


def gemm_floor_products(image: torch.Tensor, keys: torch.Tensor, *, recompute: bool = True):
    """Callable running the fused loss's unavoidable GEMMs (cuBLAS) on image (B, D) and keys (N, D)."""
    grad_logits = torch.empty(image.shape[0], keys.shape[0], device=image.device, dtype=image.dtype)

    def run():
        logits = image @ keys.T
        if recompute:
            torch.mm(image, keys.T, out=grad_logits)
        else:
            grad_logits.copy_(logits)
        grad_image = grad_logits @ keys
        grad_keys = grad_logits.T @ image
        return grad_image, grad_keys

    return run


def inf_cl_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor):
    """Callable running Inf-CL's loss in both directions (image->text and text->image) with backward.

    Needs the `inf-cl` package (pip install inf-cl==1.2.1) and a CUDA device; Inf-CL has no extra negative
    columns, so it is compared on the plain CLIP loss only. It expects an initialized process group (one rank
    is enough: benchmarks create it when missing).
    """
    try:
        from inf_cl import cal_inf_loss
    except ImportError as err:
        raise RuntimeError("the 'inf_cl' entry needs the inf-cl package: pip install inf-cl==1.2.1 "
                           f"({err})") from err
    if not image.is_cuda:
        raise RuntimeError("the 'inf_cl' entry needs CUDA tensors (Inf-CL's kernels are GPU-only)")
    _ensure_process_group(image.device)

    def run():
        scale = logit_scale
        loss = (cal_inf_loss(image, text, scale=scale) + cal_inf_loss(text, image, scale=scale)) / 2
        loss.backward()
        return loss

    return run


def _ensure_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    store = dist.HashStore()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
