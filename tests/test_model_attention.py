"""Attention backends and text packing against plain PyTorch references (values and gradients)."""

import importlib.util

import pytest
import torch

from hqclip_fast.model import attention, create_model, varlen_attention
from hqclip_fast.model.attention import check_backend, varlen_attention_by_padding

HAS_CUDA = torch.cuda.is_available()
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def reference_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v in fp32, (B, L, H, D) layout."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1).to(scores.device), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def reference_varlen(q, k, v, cu_seqlens, causal):
    outs = [reference_attention(q[None, a:b], k[None, a:b], v[None, a:b], causal)[0]
            for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    return torch.cat(outs)


def qkv(shape, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_()
            for _ in range(3)]


def check_close_with_grads(fn, ref_fn, inputs, dtype):
    out = fn(*inputs)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_inputs)
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    grad_out = torch.randn_like(ref)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    for t, r in zip(inputs, ref_inputs):
        torch.testing.assert_close(t.grad.float(), r.grad, atol=5 * tol, rtol=5 * tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 13, 3, 16), (3, 50, 2, 24), (1, 1, 1, 8)])
def test_sdpa_matches_reference(shape, causal, dtype):
    check_close_with_grads(lambda q, k, v: attention(q, k, v, causal=causal),
                           lambda q, k, v: reference_attention(q, k, v, causal), qkv(shape, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[5, 1, 17, 9], [33], [2, 2, 2]])
def test_varlen_matches_per_sequence_reference(lengths, causal, dtype):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = qkv((sum(lengths), 3, 16), dtype, seed=len(lengths))
    check_close_with_grads(lambda q, k, v: varlen_attention(q, k, v, cu, max(lengths), causal=causal),
                           lambda q, k, v: reference_varlen(q, k, v, cu, causal), inputs, dtype)


def test_missing_optional_backends_are_clear_errors():
    for backend, package, present in (("flash_attn", "flash-attn", HAS_FLASH), ("xformers", "xformers", HAS_XFORMERS)):
        if present:
            continue
        with pytest.raises(ImportError, match=f"needs the '{package}' package"):
            check_backend(backend)
        with pytest.raises(ImportError, match=f"needs the '{package}' package"):
            create_model("hqclip-micro", attn_backend=backend)
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        attention(*qkv((1, 4, 1, 8), torch.float32), backend="nope")
    if not HAS_CUDA:  # flash_attn refuses CPU/fp32 input by our own check, before importing the package
        with pytest.raises(ValueError, match="needs CUDA fp16/bf16"):
            attention(*qkv((1, 4, 1, 8), torch.float32), backend="flash_attn")


def _backend_params():
    params = []
    for backend, present, package in (("flash_attn", HAS_FLASH, "flash-attn"), ("xformers", HAS_XFORMERS, "xformers")):
        marks = []
        if not HAS_CUDA:
            marks.append(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif not present:
            marks.append(pytest.mark.skip(reason=f"{package} not installed"))
        params.append(pytest.param(backend, marks=marks))
    params.append(pytest.param("sdpa", marks=[] if HAS_CUDA else [pytest.mark.skip(reason="needs a CUDA GPU")]))
    return params


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_backends_match_reference(backend, causal):
    dtype = torch.bfloat16
    check_close_with_grads(lambda q, k, v: attention(q, k, v, causal=causal, backend=backend),
                           lambda q, k, v: reference_attention(q, k, v, causal),
                           qkv((3, 77, 4, 64), dtype, "cuda"), dtype)
    lengths = [7, 77, 1, 40]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    check_close_with_grads(lambda q, k, v: varlen_attention(q, k, v, cu, 77, causal=causal, backend=backend),
                           lambda q, k, v: reference_varlen(q, k, v, cu, causal),
                           qkv((sum(lengths), 4, 64), dtype, "cuda"), dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_isolates_sequences(causal):
    # Changing one sequence must not change another's output (attention is block diagonal).
    cu = torch.tensor([0, 4, 9, 12], dtype=torch.int32)
    q, k, v = (t.detach() for t in qkv((12, 2, 8), torch.float32))
    base = varlen_attention_by_padding(q, k, v, cu, 5, causal=causal)
    v2 = v.clone()
    v2[4:9] += 1.0
    moved = varlen_attention_by_padding(q, k, v2, cu, 5, causal=causal)
    assert torch.equal(base[:4], moved[:4]) and torch.equal(base[9:], moved[9:])
    assert not torch.allclose(base[4:9], moved[4:9])


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_packed_text_equals_padded_text(quick_gelu):
    torch.manual_seed(0)
    model = create_model("hqclip-tiny", quick_gelu=quick_gelu)
    # Very different lengths, as with long descriptions and short tags; one row fills the context.
    lengths = [3, 77, 12, 2, 40, 5]
    tokens = torch.zeros(len(lengths), 77, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, : n - 1] = torch.randint(1, 49406, (n - 1,))
        tokens[i, n - 1] = 49407
    padded = model.encode_text(tokens, packed=False)
    grads_padded = torch.autograd.grad(padded.square().sum(), list(model.text.parameters()))
    packed = model.encode_text(tokens, packed=True)
    grads_packed = torch.autograd.grad(packed.square().sum(), list(model.text.parameters()))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)
    for (name, _), a, b in zip(model.text.named_parameters(), grads_packed, grads_padded):
        # fp32 summation order differs; compare relative to the gradient's scale (some reach ~1e3).
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-7, name
    # The config switch picks the packed path for encode_text and forward.
    packed_model = create_model("hqclip-tiny", quick_gelu=quick_gelu, pack_text=True)
    packed_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(packed_model.encode_text(tokens), padded, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_bf16_packed_text_equals_padded_text():
    # On CUDA in bf16 the packed path runs torch's varlen flash attention.
    torch.manual_seed(0)
    model = create_model("ViT-B-16").text.cuda().to(torch.bfloat16)
    lengths = [3, 77, 12, 2, 40, 5, 77, 9]
    tokens = torch.zeros(len(lengths), 77, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, : n - 1] = torch.randint(1, 49406, (n - 1,))
        tokens[i, n - 1] = 49407
    tokens = tokens.cuda()
    padded, packed = model(tokens).float(), model(tokens, packed=True).float()
    assert (packed - padded).abs().max() <= 3e-2 * padded.abs().max()
