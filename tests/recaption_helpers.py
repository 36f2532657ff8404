"""What the recaptioner tests share: the tiny model's limits, each backend's options, raw shards."""

import io
import tarfile

import pytest
from hqclip_recaption.backends import create_backend
from hqclip_recaption.prompts import get_prompt
from hqclip_recaption.schema import CaptionLimits, caption_schema, max_answer_tokens
from PIL import Image

LIMITS = CaptionLimits(max_description_chars=24, max_tags=2, max_tag_chars=8)
SCHEMA = caption_schema(LIMITS)
MAX_PIXELS = 112 * 112
LIMIT_ARGS = ["--max-description-chars", "24", "--max-tags", "2", "--max-tag-chars", "8"]
BACKENDS = ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)]
# vLLM on 2 CPU cores: no compilation (a faster engine start), a KV cache sized for the tiny model.
VLLM_OPTIONS = {"enforce_eager": True, "kv_cache_memory_bytes": 256 << 20, "max_num_seqs": 8}
VLLM_ARGS = ["--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20), "--max-num-seqs", "8"]


def require(backend_name: str) -> None:
    if backend_name == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed here; `make test-vllm` runs this in .venv-vllm")


def backend_args(backend_name: str) -> list[str]:
    """The CLI options of a run of `backend_name` with the tiny model."""
    return ["--backend", backend_name, *(VLLM_ARGS if backend_name == "vllm" else [])]


def make_backend(backend_name: str, model: str, **options):
    require(backend_name)
    extra = VLLM_OPTIONS if backend_name == "vllm" else {}
    return create_backend(backend_name, model=model, prompt=get_prompt(), schema=SCHEMA,
                          max_new_tokens=max_answer_tokens(LIMITS), max_pixels=MAX_PIXELS, **extra, **options)


def jpeg(seed: int, size=(97, 61)) -> bytes:
    image = Image.effect_noise(size, 40 + seed).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def write_raw_shard(path, samples):
    """samples: (key, {ext: bytes}) in order, written like img2dataset does (members of a key adjacent)."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
