"""The four HQ-CLIP texts as a bounded JSON schema, and validation of what a model wrote.

The same schema drives constrained decoding (xgrammar, in both backends) and the validation after it, so a
record is either schema-valid or carries an ``error``. Lengths are bounded because an unbounded string lets a
model run until ``max_new_tokens`` and end in truncated JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import jsonschema

CAPTION_FIELDS = ("positive_description", "negative_description", "positive_tags", "negative_tags")


@dataclass(frozen=True)
class CaptionLimits:
    """Length bounds, in characters (Unicode code points, as JSON schema counts them) and list items."""

    max_description_chars: int = 1500
    min_tags: int = 1
    max_tags: int = 16
    max_tag_chars: int = 48

    def __post_init__(self):
        if self.max_description_chars < 1:
            raise ValueError(f"max_description_chars must be >= 1, got {self.max_description_chars}")
        if not 1 <= self.min_tags <= self.max_tags:
            raise ValueError(f"need 1 <= min_tags <= max_tags, got min_tags={self.min_tags}, max_tags={self.max_tags}")
        if self.max_tag_chars < 1:
            raise ValueError(f"max_tag_chars must be >= 1, got {self.max_tag_chars}")


def caption_schema(limits: CaptionLimits = CaptionLimits()) -> dict:
    """JSON schema of one model answer: an object with exactly the four fields, in this order."""
    description = {"type": "string", "minLength": 1, "maxLength": limits.max_description_chars}
    tags = {
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": limits.max_tag_chars},
        "minItems": limits.min_tags,
        "maxItems": limits.max_tags,
    }
    return {
        "type": "object",
        "properties": {
            "positive_description": description,
            "negative_description": description,
            "positive_tags": tags,
            "negative_tags": tags,
        },
        "required": list(CAPTION_FIELDS),
        "additionalProperties": False,
    }


def max_answer_tokens(limits: CaptionLimits) -> int:
    """An upper bound on the tokens of any schema-valid answer under constrained decoding, end token included.

    The grammar writes compact JSON and allows no escapes in bounded strings, so the longest answer is the
    skeleton plus every string at its limit in 4-byte UTF-8 characters; byte-level tokens are >= 1 byte each.
    ``max_new_tokens`` at least this large never truncates an answer.
    """
    longest = {
        "positive_description": "x" * limits.max_description_chars,
        "negative_description": "x" * limits.max_description_chars,
        "positive_tags": ["x" * limits.max_tag_chars] * limits.max_tags,
        "negative_tags": ["x" * limits.max_tag_chars] * limits.max_tags,
    }
    skeleton = len(json.dumps(longest, separators=(", ", ": ")).encode())
    string_chars = 2 * limits.max_description_chars + 2 * limits.max_tags * limits.max_tag_chars
    return skeleton + 3 * string_chars + 1


class CaptionError(ValueError):
    """A model answer that is not a valid caption; ``kind`` is the summary's error category."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def parse_caption(text: str, schema: dict, *, truncated: bool = False) -> dict:
    """Parse and validate one model answer; returns the four fields or raises CaptionError.

    ``truncated`` says the backend stopped at its token limit: such an answer is reported as "truncated"
    rather than "invalid_json" when it does not parse, since the remedy differs (raise the limit).
    """
    try:
        # strict=False: the grammar lets raw tabs and other control characters into strings; they are
        # text, not a reason to throw the caption away (json.dumps escapes them again on write).
        value = json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        kind = "truncated" if truncated else "invalid_json"
        raise CaptionError(kind, f"{exc.msg} at char {exc.pos}") from None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "<root>"
        raise CaptionError("schema", f"{path}: {exc.message}") from None
    return {field: value[field] for field in CAPTION_FIELDS}
