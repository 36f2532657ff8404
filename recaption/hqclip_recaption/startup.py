"""What a backend checks before it starts, so that a run that cannot work stops before it opens a shard: the
model loads and is an architecture the recaptioner is written for; the options leave room for a prompt
(``budget.py``); the engine starts. Each failure is one ``BackendStartupError`` saying what to change.
"""

from __future__ import annotations

# The prompts, the image-token budget and the special-token handling are written for Qwen2-VL's processor.
SUPPORTED_ARCHITECTURES = ("Qwen2VLForConditionalGeneration",)


class BackendStartupError(RuntimeError):
    """A backend cannot start: the message says why and what to change."""


def check_model(model: str):
    """The model's config, after checking that it loads and is an architecture the recaptioner is written for."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise BackendStartupError(f"cannot load model {model!r}: {exc}") from exc
    architectures = list(config.architectures or [])
    if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise BackendStartupError(
            f"model {model!r} is {architectures or 'of no named architecture'}; the recaptioner's prompts and "
            f"image-token budget are written for {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config
