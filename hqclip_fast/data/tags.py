"""Short-tag vocabulary: normalization, frequency-ranked building, encoding to ids."""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

_SPACES = re.compile(r"\s+")
_EDGE_PUNCT = " \t\n.,;:!?\"'()[]{}"


def normalize_tag(tag: str) -> str:
    """NFKC, lower case, collapsed whitespace, surrounding punctuation removed ("  Red  Cube." -> "red cube")."""
    tag = unicodedata.normalize("NFKC", tag).lower()
    return _SPACES.sub(" ", tag).strip(_EDGE_PUNCT)


class TagVocab:
    """Ordered tag list; id = position. Unknown tags are dropped by `encode`."""

    def __init__(self, tags: Iterable[str], counts: Iterable[int] | None = None):
        self.tags = list(tags)
        self.counts = list(counts) if counts is not None else None
        self._index = {t: i for i, t in enumerate(self.tags)}
        if len(self._index) != len(self.tags):
            raise ValueError("tags: duplicate entries in the vocabulary")

    def __len__(self) -> int:
        return len(self.tags)

    def __contains__(self, tag: str) -> bool:
        return normalize_tag(tag) in self._index

    def encode(self, tags: Iterable[str]) -> list[int]:
        """Normalized, known, de-duplicated tag ids in input order."""
        ids: list[int] = []
        for tag in tags:
            i = self._index.get(normalize_tag(tag))
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    @classmethod
    def build(cls, tag_lists: Iterable[Iterable[str]], size: int, min_count: int = 1) -> TagVocab:
        """The `size` most frequent normalized tags (ties broken alphabetically, so the result is stable)."""
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        counter: Counter[str] = Counter()
        for tags in tag_lists:
            counter.update({t for t in (normalize_tag(x) for x in tags) if t})
        ranked = sorted((item for item in counter.items() if item[1] >= min_count), key=lambda kv: (-kv[1], kv[0]))
        ranked = ranked[:size]
        return cls([t for t, _ in ranked], [c for _, c in ranked])

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"tags": self.tags, "counts": self.counts}, f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: str) -> TagVocab:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, list):
            return cls(data)
        return cls(data["tags"], data.get("counts"))
