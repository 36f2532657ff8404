"""Tokenizer captions/s: ours against open_clip's tokenize on the same captions (bench_loader.tokenizers, the
functions `python benchmarks/bench_loader.py` times)."""

import pytest
import torch
from bench_loader import tokenizer_captions, tokenizers


@pytest.mark.parametrize("name", ["hqclip", "open_clip"])
def test_tokenizer(benchmark, smoke, name):
    functions = tokenizers()
    if name not in functions:
        pytest.skip("open_clip_torch is not installed")
    texts = tokenizer_captions(8 if smoke else 1000)
    benchmark.group = f"tokenizer, {len(texts)} captions"
    tokens = benchmark.pedantic(functions[name], args=(texts,), rounds=1 if smoke else 5, iterations=1)
    assert tokens.shape == (len(texts), 77) and tokens.dtype in (torch.long, torch.int)
