"""Special-token strings in alt-text, removed before the alt-text enters a prompt.

A tokenizer turns the text of each of its special tokens into that token wherever it appears, user text
included. Web alt-text holds such strings (scraped chat logs: ``<|im_start|>``, ``<|im_end|>``, ...), and in a
prompt they are an injection: ``<|im_end|>`` ends the user's turn early and ``<|image_pad|>`` adds image
placeholders the image does not fill (the HF processor then rejects the batch; vLLM accepts stray ones).

The strings come from the model's own tokenizer, not from a fixed list, and are removed rather than altered:
removal leaves nothing any tokenizer or text normaliser could join back into a special token, and the chat or
vision markup of a scraped page says nothing about its image. Removing one string can join the halves of
another (``<|im_<|im_end|>end|>``), so removal repeats until none is left.
"""

from __future__ import annotations

import re


def special_token_strings(tokenizer) -> list[str]:
    """The strings ``tokenizer`` (a Hugging Face tokenizer) turns into special tokens: its named special tokens
    (bos, eos, pad, ...) and every added token marked special (Qwen2-VL's chat and vision markers), longest
    first."""
    strings = set(tokenizer.all_special_tokens)
    strings.update(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    strings.discard("")
    return sorted(strings, key=lambda s: (-len(s), s))


class SpecialTokenRemover:
    """Removes a tokenizer's special-token strings from text; stateless, so safe to share between threads."""

    def __init__(self, strings: list[str]):
        if not strings:
            raise ValueError("strings must name at least one special token")
        # Longest first: at a position where two strings match, the longer goes, as in the tokenizer's own match.
        self.pattern = re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokenRemover:
        return cls(special_token_strings(tokenizer))

    def __call__(self, text: str) -> tuple[str, int]:
        """``text`` without special-token strings, and how many were removed."""
        removed = 0
        while True:  # ends: every pass that finds a string shortens the text
            text, found = self.pattern.subn("", text)
            if not found:
                return text, removed
            removed += found
