"""Versioned prompt templates: every template the recaptioner has used lives here, keyed by version.

A record stores the version it was made with; change a prompt by adding a new version, never by editing an
old one, so that annotations stay attributable to the exact words that produced them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    version: str
    system: str
    user: str  # formatted with alt_text=...

    def render_user(self, alt_text: str) -> str:
        return self.user.format(alt_text=alt_text)

    def messages(self, alt_text: str) -> list[dict]:
        """Chat messages in the Hugging Face multimodal form; the image goes before the text."""
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system}]},
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.render_user(alt_text)}],
            },
        ]


_V1_SYSTEM = (
    "You are an expert image annotator. You look carefully at the image and write precise, factual English."
)

_V1_USER = """The image was published on the web with this alt-text (it may be noisy, incomplete or wrong):
"{alt_text}"

Write one JSON object with exactly these fields:
- "positive_description": a detailed, faithful description of the image (objects, attributes, counts, colors, \
spatial relations, text in the image, style). Use the alt-text only where the image confirms it.
- "negative_description": the positive description with two or three facts changed (e.g. a color, a count, an \
object, a relation) so that it no longer matches the image; keep everything else word for word.
- "positive_tags": short tags (1-3 words each) that are true for the image.
- "negative_tags": short tags that are plausible for similar images but false for this one.
Answer with the JSON object only."""

PROMPTS: dict[str, PromptTemplate] = {
    "v1": PromptTemplate(version="v1", system=_V1_SYSTEM, user=_V1_USER),
}
DEFAULT_PROMPT_VERSION = "v1"


def get_prompt(version: str = DEFAULT_PROMPT_VERSION) -> PromptTemplate:
    try:
        return PROMPTS[version]
    except KeyError:
        raise ValueError(f"prompt_version {version!r} is unknown; known: {sorted(PROMPTS)}") from None
