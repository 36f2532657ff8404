"""The annotation record (ARCHITECTURE.md) and its validation.

A record is a JSON object with `key`, `alt_text`, `positive_description`, `negative_description` (str) and
`positive_tags`, `negative_tags` (list of str); other fields are kept and ignored. Validation never raises on
bad data: it returns a reason string that the loader counts.
"""

from __future__ import annotations

import json
from typing import Any

TEXT_FIELDS = ("alt_text", "positive_description", "negative_description")
TAG_FIELDS = ("positive_tags", "negative_tags")
RECORD_FIELDS = ("key", *TEXT_FIELDS, *TAG_FIELDS)


class RecordError(ValueError):
    """A sample's annotation is unusable; `reason` is the short name the loader counts it under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_record(raw: bytes) -> dict[str, Any]:
    """Bytes of a `.json` member -> dict, or RecordError('invalid_utf8' | 'invalid_json' | 'not_an_object')."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError("invalid_utf8", str(e)) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError("invalid_json", str(e)) from None
    if not isinstance(record, dict):
        raise RecordError("not_an_object", type(record).__name__)
    return record


def check_record(record: dict[str, Any], required: tuple[str, ...]) -> None:
    """Type-check every known field that is present; the `required` ones must be present and non-empty.

    Raises RecordError('missing_field' | 'wrong_type' | 'empty_text').
    """
    for name in TEXT_FIELDS:
        if name in record and record[name] is not None and not isinstance(record[name], str):
            raise RecordError("wrong_type", f"{name} is {type(record[name]).__name__}, expected str")
    for name in TAG_FIELDS:
        value = record.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
            raise RecordError("wrong_type", f"{name} must be a list of str")
    for name in required:
        value = record.get(name)
        if value is None:
            raise RecordError("missing_field", name)
        if isinstance(value, str) and not value.strip():
            raise RecordError("empty_text", name)
        if isinstance(value, list) and not any(t.strip() for t in value):
            raise RecordError("empty_text", name)
