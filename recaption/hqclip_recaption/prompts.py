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
    user_without_alt_text: str  # for a sample whose alt-text is empty: the image is the main input

    def render_user(self, alt_text: str) -> str:
        return self.user.format(alt_text=alt_text) if alt_text else self.user_without_alt_text

    def messages(self, alt_text: str) -> list[dict]:
        """Chat messages in the Hugging Face multimodal form; the image goes before the text."""
        return self._messages(self.render_user(alt_text))

    def template_messages(self) -> list[dict]:
        """The messages around an alt-text of no tokens: the longer form of the prompt, what the budget counts."""
        return self._messages(self.user.format(alt_text=""))

    def _messages(self, user_text: str) -> list[dict]:
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]},
        ]


_V1_SYSTEM = (
    "You are an expert image annotator. You look carefully at the image and write precise, factual English."
)

_V1_TASK = """Write one JSON object with exactly these fields:
- "positive_description": a detailed, faithful description of the image (objects, attributes, counts, colors, \
spatial relations, text in the image, style). Use the alt-text only where the image confirms it.
- "negative_description": the positive description with two or three facts changed (e.g. a color, a count, an \
object, a relation) so that it no longer matches the image; keep everything else word for word.
- "positive_tags": short tags (1-3 words each) that are true for the image.
- "negative_tags": short tags that are plausible for similar images but false for this one.
Answer with the JSON object only."""

_V1_USER = """The image was published on the web with this alt-text (it may be noisy, incomplete or wrong):
"{alt_text}"

""" + _V1_TASK

_V1_USER_WITHOUT_ALT_TEXT = "The image was published on the web without alt-text.\n\n" + _V1_TASK

PROMPTS: dict[str, PromptTemplate] = {
    "v1": PromptTemplate(
        version="v1", system=_V1_SYSTEM, user=_V1_USER, user_without_alt_text=_V1_USER_WITHOUT_ALT_TEXT
    ),
}
DEFAULT_PROMPT_VERSION = "v1"


def get_prompt(version: str = DEFAULT_PROMPT_VERSION) -> PromptTemplate:
    try:
        return PROMPTS[version]
    except KeyError:
        raise ValueError(f"prompt_version {version!r} is unknown; known: {sorted(PROMPTS)}") from None
