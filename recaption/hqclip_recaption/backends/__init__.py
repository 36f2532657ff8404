"""Backends turn (image, alt-text) requests into raw model answers; the runner parses and validates them.

Every backend is built from the same three things: a prompt template, the caption JSON schema (for
constrained decoding) and a token budget: its answer length, and the alt-text length that keeps every prompt
within the model's context (``budget.py``), checked at start-up. The runner turns alt-text into a request's
alt-text with ``prompt_alt_text``, which also removes the tokenizer's special-token strings
(``special_tokens.py``). ``create_backend`` imports a backend's heavy dependencies (transformers, vLLM) only
when that backend is asked for. Whatever stops a backend from starting is a ``startup.BackendStartupError``,
raised before any shard is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from ..budget import PromptAltText


@dataclass
class CaptionRequest:
    image: Image.Image
    alt_text: str


@dataclass
class Generation:
    text: str
    num_tokens: int  # generated tokens, end-of-sequence token included, padding excluded
    finished: bool  # False when generation stopped at the token limit


class Backend(Protocol):
    model_name: str

    def prompt_alt_text(self, alt_text: str) -> PromptAltText:
        """The alt-text as it may go into a prompt: without the tokenizer's special-token strings, cut to the
        backend's alt-text token budget."""
        ...

    def generate(self, requests: list[CaptionRequest]) -> list[Generation]: ...

    def close(self) -> None:
        """Release the engine now rather than at interpreter exit (vLLM's holds a torch.distributed group)."""
        ...


BACKENDS = ("transformers", "vllm")


def create_backend(name: str, **kwargs) -> Backend:
    if name == "transformers":
        from .transformers_backend import TransformersBackend

        return TransformersBackend(**kwargs)
    if name == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(**kwargs)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
