"""ClipTokenizer must give exactly open_clip's ids (cleaning, BPE, truncation with eot last, zero padding)."""

import random

import pytest
import torch

from hqclip_fast.data import ClipTokenizer

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed (the reference tokenizer)")

EDGE_CASES = [
    "", " ", "a photo", "A Photo Of A CAT.", "Hello,   World!!  ", "tab\tnew\nline\r\nend",
    "café naïve façade — “quotes” ‘x’ …", "日本語のテキスト 123 4567", "emoji 🚀🔥👍🏽 done", "&amp; &lt;b&gt; &#39;html&#39;",
    "it's we're I'll they'd you've I'm don't", "a" * 300, " ".join(["word"] * 100), "<start_of_text> inside",
    "x<end_of_text>y", "<<start_of_text>>", "<START_OF_TEXT>", "\x1b[31mred\x1b[0m", "\u200bzero width",
    "MiXeD CaSe ÄÖÜ ß", "ﬁ ligature ｆｕｌｌ ｗｉｄｔｈ", "a\x0bb\x1cc\x85d", "mojibake: Ã©tÃ©", "1,234.56%", "$$$ ### @@@",
    "Ελληνικά Русский العربية עברית हिन्दी", "a/b\\c|d", "'s 'S 'T", "...---...", "x" * 80 + " y",
]


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = ("abcdefghijklmnopqrstuvwxyz ABCDEFXYZ 0123456789 .,;:!?'\"-()[]&<>/\\\t\n"
                "éèàüöçñßøåæ中文字日本한국어🙂🚀—–…“”‘’\u00a0\u3000")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(n)]


@pytest.mark.parametrize("context_length", [77, 16, 5])
def test_ids_equal_open_clip(context_length):
    texts = EDGE_CASES + _random_strings(300, seed=context_length)
    ours = ClipTokenizer(context_length=context_length)(texts)
    reference = open_clip.tokenize(texts, context_length=context_length)
    assert ours.dtype == torch.long and ours.shape == (len(texts), context_length)
    mismatched = [t for t, a, b in zip(texts, ours, reference) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} mismatches, first: {mismatched[:3]!r}"


def test_truncation_keeps_eot_last_and_pads_with_zeros():
    tok = ClipTokenizer(context_length=8)
    long, short = tok(["one two three four five six seven eight nine ten", "hi"])
    assert long[-1] == tok.eot_token_id and long[0] == tok.sot_token_id and (long != 0).all()
    assert short.tolist()[:3] == [tok.sot_token_id, tok(["hi"])[0, 1].item(), tok.eot_token_id]
    assert (short[3:] == 0).all()


def test_single_string_decode_and_bad_context_length():
    tok = ClipTokenizer()
    ids = tok("A red Cube, on the left!")
    assert ids.shape == (1, 77)
    assert tok.decode(ids[0]) == "a red cube , on the left !"
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(context_length=1)
