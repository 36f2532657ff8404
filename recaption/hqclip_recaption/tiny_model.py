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

# The tiny model is small enough for a CPU test step in milliseconds, yet shaped like the real one (mrope,
# 2x2 merge, 14 px patches); head sizes of 64 keep vLLM's attention backends usable. "qwen2-vl-7b" is the
# published Qwen2-VL-7B architecture, written without weights for vLLM's load_format="dummy" benchmarks.
ARCHITECTURES = {
    "tiny": {
        "text": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        },
        "vision": {"depth": 2, "embed_dim": 64, "num_heads": 1, "mlp_ratio": 2},
        "pixels": {"min_pixels": 56 * 56, "max_pixels": 112 * 112},
    },
    "qwen2-vl-7b": {
        "text": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        },
        "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4},
        "pixels": {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280},
    },
}


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
    """Write the tiny random model (weights included) to ``out_dir`` and return its path."""
    return write_model_dir(out_dir, arch="tiny", vocab_size=vocab_size, seed=seed, weights=True)


def write_model_dir(
    out_dir: str | Path, *, arch: str = "tiny", vocab_size: int = 512, seed: int = 0, weights: bool = True
) -> Path:
    """Write config, tokenizer, processor and (if ``weights``) random weights of ``arch`` to ``out_dir``."""
    import torch
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + special tokens + merges), got {vocab_size}")
    spec = ARCHITECTURES[arch]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={},
        model_max_length=spec["text"]["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    token_id = tokenizer.convert_tokens_to_ids
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**spec["pixels"]),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**spec["pixels"]),
        chat_template=CHAT_TEMPLATE,
    )
    special = {
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "pad_token_id": token_id("<|endoftext|>"),
    }
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), **spec["text"], **special},
        vision_config={
            **spec["vision"],
            "hidden_size": spec["text"]["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        **special,  # vLLM and older transformers read these from the top level of config.json
    )
    generation_config = GenerationConfig(**special)
    if weights:
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
        model.generation_config = generation_config
        model.save_pretrained(out_dir)
    else:
        config.dtype = torch.bfloat16  # what the published checkpoint ships; vLLM's dtype="auto" reads it
        # save_pretrained of a model writes this; without it vLLM resolves the base Qwen2VLModel as a pooling model
        config.architectures = [Qwen2VLForConditionalGeneration.__name__]
        config.save_pretrained(out_dir)
        generation_config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
