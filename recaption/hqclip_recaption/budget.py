"""The alt-text as it goes into a prompt: special-token strings removed (``special_tokens.py``), then cut to the
prompt-length budget, how many alt-text tokens fit in the model's context.

Web alt-text is sometimes thousands of tokens long, and a prompt longer than the engine's context is rejected:
vLLM rejects it inside ``LLM.generate``, cancelling the whole batch with it. So the alt-text that goes into the
prompt is cut to a number of tokens fixed at start-up, such that every prompt plus its answer fits:

    template tokens + image tokens at max_pixels + alt-text tokens + margin + answer tokens <= max_model_len

The record keeps the full original alt-text; only the prompt sees the cleaned and cut one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from .prompts import PromptTemplate
from .special_tokens import SpecialTokenRemover
from .startup import BackendStartupError

log = logging.getLogger(__name__)

DEFAULT_MAX_ALT_TEXT_TOKENS = 512  # far beyond any useful alt-text (CLIP itself reads 77 tokens)
# The alt-text is counted on its own; token merges with the quotes around it in the prompt can shift the count
# of the whole prompt by a token at either end.
EDGE_MARGIN_TOKENS = 4


def max_image_tokens(image_processor, max_pixels: int) -> int:
    """An upper bound on the tokens of one image resized to at most ``max_pixels`` (Qwen2-VL: one token per
    ``(patch_size * merge_size)**2`` pixels)."""
    unit = image_processor.patch_size * image_processor.merge_size
    return max_pixels // (unit * unit)


def model_context_length(config) -> int:
    """The model's own context length (``max_position_embeddings`` of its text config)."""
    return getattr(config, "text_config", config).max_position_embeddings


@dataclass(frozen=True)
class PromptAltText:
    text: str  # what goes into the prompt
    truncated: bool  # cut to the token budget
    special_tokens: int  # special-token strings removed


@dataclass(frozen=True)
class AltTextBudget:
    tokenizer: object  # a Hugging Face fast tokenizer (offsets are needed to cut at a character)
    max_tokens: int
    remove_special_tokens: SpecialTokenRemover

    def prepare(self, alt_text: str) -> PromptAltText:
        """The alt-text for the prompt: without special-token strings (and the whitespace they leave at its ends),
        then cut to ``max_tokens``. (A prefix of text without special-token strings has none either, so the cut
        cannot bring one back.)"""
        cleaned, removed = self.remove_special_tokens(alt_text)
        cleaned = cleaned.strip() if removed else cleaned
        fitted = self.fit(cleaned)
        return PromptAltText(fitted, truncated=len(fitted) < len(cleaned), special_tokens=removed)

    def fit(self, alt_text: str) -> str:
        """``alt_text``, or its longest prefix of whole tokens within ``max_tokens``."""
        encoding = self.tokenizer(alt_text, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoding["input_ids"]) <= self.max_tokens:
            return alt_text
        # A token that holds part of a multi-byte character has that character's offsets: the cut drops it whole.
        return alt_text[: encoding["offset_mapping"][self.max_tokens][0]]


def alt_text_budget(
    processor,
    prompt: PromptTemplate,
    *,
    max_model_len: int,
    answer_tokens: int,
    max_pixels: int | None,
    max_alt_text_tokens: int = DEFAULT_MAX_ALT_TEXT_TOKENS,
) -> AltTextBudget:
    """The alt-text budget of prompts rendered with ``processor``'s chat template (``max_pixels`` None: the
    image processor's own cap); ValueError when the template, the largest image and the answer leave no room
    for alt-text in ``max_model_len``."""
    if max_alt_text_tokens < 1:
        raise ValueError(f"max_alt_text_tokens must be >= 1, got {max_alt_text_tokens}")
    if max_pixels is None:
        max_pixels = processor.image_processor.size["longest_edge"]
    text = processor.apply_chat_template(prompt.template_messages(), tokenize=False, add_generation_prompt=True)
    # The template holds one image placeholder token, which the processor replaces by the image's tokens.
    template_tokens = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1
    image_tokens = max_image_tokens(processor.image_processor, max_pixels)
    fixed = template_tokens + image_tokens + EDGE_MARGIN_TOKENS + answer_tokens
    room = max_model_len - fixed
    if room < 1:
        raise BackendStartupError(
            f"max_model_len={max_model_len} leaves no room for alt-text next to the rest of the prompt and the answer: "
            f"{template_tokens} template tokens + {image_tokens} image tokens at max_pixels={max_pixels} + "
            f"{EDGE_MARGIN_TOKENS} margin + {answer_tokens} answer tokens (max_new_tokens) = {fixed}; "
            "raise max_model_len or lower max_new_tokens or max_pixels"
        )
    if room < max_alt_text_tokens:
        log.warning(
            "alt-text cut to %d tokens (max_alt_text_tokens=%d does not fit in max_model_len=%d next to %d "
            "template, image and answer tokens)",
            room, max_alt_text_tokens, max_model_len, fixed,
        )
    # Its own tokenizer: the runner cuts alt-text on its reader thread while the backend may be tokenizing a batch
    # with padding, and a fast tokenizer raises "Already borrowed" when used from two threads at once.
    return AltTextBudget(
        copy.deepcopy(processor.tokenizer),
        min(room, max_alt_text_tokens),
        SpecialTokenRemover.from_tokenizer(processor.tokenizer),
    )
