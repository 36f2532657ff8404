"""Triton kernels for the HQ-CLIP loss and their autograd Functions. Knows nothing of models or configs."""
