"""A tiny, randomly initialised Qwen2-VL written entirely offline (for tests and CPU benchmarks).

Everything is built here: a byte-level BPE tokenizer trained on a fixed in-repo corpus (so any text, including
all JSON punctuation, can be encoded), Qwen2-VL's chat and vision special tokens, a chat template, a
Qwen2VLImageProcessor with a small pixel budget, and a Qwen2VLConfig small enough to run in milliseconds.
The directory loads with ``from_pretrained`` in transformers and has a valid config for vLLM.
"""

from __future__ import annotations

from pathlib import Path

from .prompts import PROMPTS
from .schema import CAPTION_FIELDS

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The same message layout as Qwen2-VL's template: text parts verbatim, an image as vision_start/pad/end.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_EXTRA = [
    '{"positive_description": "a red cube on a blue table", "negative_description": "a green cube on a '
    'blue table", "positive_tags": ["red cube", "table"], "negative_tags": ["green cube", "chair"]}',
    "a photo of a dog, two cats, a small house, the sky, grass, a person walking, a car on the street.",
    "[] {} : , \" \\ \\n 0123456789 ( ) - _ . ! ? ' /",
]

# Small enough for a CPU test step in milliseconds, shaped like the real model (mrope, 2x2 merge, 14px patches).
TINY_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [p.system for p in PROMPTS.values()] + [p.user for p in PROMPTS.values()]
    corpus += list(CAPTION_FIELDS) + _CORPUS_EXTRA
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def make_tiny_model(out_dir: str | Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write the tiny model to ``out_dir`` (created if needed) and return its path."""
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + special tokens + merges), got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={},
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    token_id = tokenizer.convert_tokens_to_ids
    image_processor = Qwen2VLImageProcessor(**TINY_PIXELS)
    video_processor = Qwen2VLVideoProcessor(**TINY_PIXELS)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    # Head sizes of 64 keep vLLM's attention backends usable; everything else is as small as it gets.
    hidden = 128
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": hidden,
            "num_heads": 1,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        # vLLM and older transformers read these from the top level of config.json.
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=token_id("<|im_end|>"),
        pad_token_id=token_id("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = token_id("<|im_end|>")
    model.generation_config.pad_token_id = token_id("<|endoftext|>")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
