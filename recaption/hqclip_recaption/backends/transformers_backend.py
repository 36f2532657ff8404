"""Hugging Face transformers backend: batched ``generate`` with an xgrammar JSON-schema logits processor.

Works on CPU and GPU with any Qwen2-VL-style checkpoint (``AutoModelForImageTextToText`` + ``AutoProcessor``).
It is the reference backend and the one the tests run (with the tiny model from ``make-tiny-model``).
"""

from __future__ import annotations

import json

import torch

from ..budget import DEFAULT_MAX_ALT_TEXT_TOKENS, PromptAltText, alt_text_budget, model_context_length
from ..prompts import PromptTemplate
from ..startup import check_model
from . import CaptionRequest, Generation


class TransformersBackend:
    def __init__(
        self,
        *,
        model: str,
        prompt: PromptTemplate,
        schema: dict,
        max_new_tokens: int = 2048,
        temperature: float = 0.0,
        max_pixels: int | None = None,
        max_alt_text_tokens: int = DEFAULT_MAX_ALT_TEXT_TOKENS,
        max_model_len: int | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        seed: int = 0,
    ):
        import xgrammar as xgr
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        config = check_model(model)
        self.model_name = model
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = torch.device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.processor = AutoProcessor.from_pretrained(model)
        if max_pixels is not None:
            # Qwen2-VL's image processor keeps its pixel budget as size = {shortest_edge, longest_edge} (in pixels).
            size = self.processor.image_processor.size
            self.processor.image_processor.size = {
                "shortest_edge": min(size["shortest_edge"], max_pixels),
                "longest_edge": max_pixels,
            }
        self.alt_text_budget = alt_text_budget(
            self.processor,
            prompt,
            max_model_len=max_model_len or model_context_length(config),
            answer_tokens=max_new_tokens,
            max_pixels=max_pixels,
            max_alt_text_tokens=max_alt_text_tokens,
        )
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batching: prompts end at the same position
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.eos_token_ids = set(_as_list(self.model.generation_config.eos_token_id))
        self.pad_token_id = self.tokenizer.pad_token_id

        # The model's vocabulary can be larger than the tokenizer's (padding rows); the mask must cover it.
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(self.eos_token_ids)
        )
        # Compact JSON, as vLLM's structured outputs write it (disable_any_whitespace): no free whitespace, which a
        # model that likes spaces could fill its budget with, and no space after separators (xgrammar's default).
        self.grammar = xgr.GrammarCompiler(tokenizer_info).compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        if temperature > 0:
            torch.manual_seed(seed)  # generate() samples from the global generator

    def prompt_alt_text(self, alt_text: str) -> PromptAltText:
        return self.alt_text_budget.prepare(alt_text)

    def close(self) -> None:
        """Nothing to release: the model is freed with the backend."""

    def chat_text(self, alt_text: str) -> str:
        return self.processor.apply_chat_template(
            self.prompt.messages(alt_text), tokenize=False, add_generation_prompt=True
        )

    @torch.inference_mode()
    def generate(self, requests: list[CaptionRequest]) -> list[Generation]:
        import xgrammar as xgr

        if not requests:
            return []
        inputs = self.processor(
            text=[self.chat_text(r.alt_text) for r in requests],
            images=[r.image for r in requests],
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        sampling = {"do_sample": False}
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": 1.0, "top_k": 0}
        # A fresh processor per call: xgrammar's HF processor keeps per-sequence matcher state.
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            logits_processor=[xgr.contrib.hf.LogitsProcessor(self.grammar)],
            pad_token_id=self.pad_token_id,
            **sampling,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [self._to_generation(tokens) for tokens in new_tokens]

    def _to_generation(self, tokens: list[int]) -> Generation:
        end = next((i for i, t in enumerate(tokens) if t in self.eos_token_ids), None)
        kept = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        num_tokens = len(kept) + (end is not None)
        return Generation(text=text, num_tokens=num_tokens, finished=end is not None)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
