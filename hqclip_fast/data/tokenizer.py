"""CLIP BPE tokenizer giving exactly open_clip's token ids, backed by the Rust `tokenizers` library.

open_clip's SimpleTokenizer is pure Python (a few thousand captions/s). We keep its text cleaning (ftfy, html
unescape, whitespace collapse, lower case; skipped for printable ASCII, which it leaves unchanged), its
chunking regex and its truncation rule (sot + tokens + eot, cut to the context length with eot kept last,
zero padded), and run the byte-level BPE of each new chunk in Rust (`tokenizers`, built from OpenAI's merges
file shipped with open_clip, MIT license); chunk ids are cached, since captions repeat words.
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
import os
from collections.abc import Sequence
from functools import lru_cache

import ftfy
import numpy as np
import regex
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

SOT, EOT = "<start_of_text>", "<end_of_text>"
DEFAULT_CONTEXT_LENGTH = 77
# The merges file lists 48894 merges after its header line; CLIP uses this many (vocab 49408).
_NUM_MERGES = 49152 - 256 - 2
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_OPEN_CLIP_PATTERN = regex.compile(f"{SOT}|{EOT}|{_WORD_PATTERN}", regex.IGNORECASE)
# Printable ASCII without '&': ftfy.fix_text and html.unescape leave such text unchanged, so we skip them.
_WORD_CACHE_SIZE = 500_000
_SAFE_ASCII = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"&"} | {"\t", "\n"}


def default_bpe_path() -> str:
    """OpenAI's BPE merges file as shipped in the open_clip package (or our own copy next to this file)."""
    local = os.path.join(os.path.dirname(__file__), "bpe_simple_vocab_16e6.txt.gz")
    if os.path.exists(local):
        return local
    try:
        return str(importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "CLIP BPE vocabulary not found: install open_clip_torch or pass bpe_path=") from e


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy + html unescape (twice), collapse whitespace, lower case."""
    if not _SAFE_ASCII.issuperset(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


@lru_cache(maxsize=4)
def _build_backend(bpe_path: str) -> tuple[Tokenizer, int, int]:
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        # Keep the regex matches (words, digits, punctuation runs), drop the whitespace between them.
        pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return backend, vocab[SOT], vocab[EOT]


class ClipTokenizer:
    """`tok(texts) -> LongTensor[n, context_length]`, identical to `open_clip.tokenize(texts, context_length)`."""

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, bpe_path: str | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (sot and eot), got {context_length}")
        self.context_length = context_length
        self.bpe_path = bpe_path or default_bpe_path()
        self._backend, self.sot_token_id, self.eot_token_id = _build_backend(self.bpe_path)
        self.vocab_size = self._backend.get_vocab_size()
        self._word_cache: dict[str, list[int]] = {}

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, without sot/eot, padding or truncation."""
        return [self._encode_one(clean_text(t)) for t in texts]

    def _encode_one(self, text: str) -> list[int]:
        # open_clip's algorithm: split the cleaned text with its regex (special tokens first), BPE each chunk.
        # Chunks repeat a lot across captions, so their ids are cached; the BPE itself runs in Rust.
        ids: list[int] = []
        cache = self._word_cache
        for chunk in _OPEN_CLIP_PATTERN.findall(text):
            word_ids = cache.get(chunk)
            if word_ids is None:
                if chunk == SOT or chunk == EOT:
                    word_ids = [self.sot_token_id if chunk == SOT else self.eot_token_id]
                else:
                    word_ids = self._backend.encode(chunk, add_special_tokens=False).ids
                if len(cache) >= _WORD_CACHE_SIZE:
                    cache.clear()
                cache[chunk] = word_ids
            ids.extend(word_ids)
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        result = np.zeros((len(texts), length), dtype=np.int64)
        for row, ids in enumerate(self.encode(texts)):
            n = min(len(ids), length - 2)
            result[row, 0] = self.sot_token_id
            result[row, 1 : n + 1] = ids[:n]
            result[row, n + 1] = self.eot_token_id  # truncation keeps eot as the last token
        return torch.from_numpy(result)

    def decode(self, ids: Sequence[int]) -> str:
        """One row of token ids back to text: skips sot, stops at eot (the padding follows it)."""
        inverse = {i: t for t, i in self._backend.get_vocab().items()}
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_token_id:
                break
            if i != self.sot_token_id:
                out.extend(bytes(byte_decoder[c] for c in inverse[i].replace("</w>", "")))
                if inverse[i].endswith("</w>"):
                    out.extend(b" ")
        return out.decode("utf-8", errors="replace").strip()
