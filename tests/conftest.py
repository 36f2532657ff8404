import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores on CI: keep intra-op threads from oversubscribing when tests spawn worker processes.
torch.set_num_threads(min(2, os.cpu_count() or 1))
