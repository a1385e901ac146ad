"""The Qwen2 tokenizer rebuilt from tiktoken ranks must segment exactly like tiktoken."""

import pytest
from tokenizers import Tokenizer

from tkr_embed.models.qwen_vocab import (
    FIRST_SPECIAL_ID, QWEN2_SPLIT_PATTERN, QWEN2_VL_SPECIAL_TOKENS, find_qwen_tiktoken,
)

TEXTS = [
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog 1234567890",
    "你好，世界 🚀 emoji 👩‍👩‍👧 family",
    "Ünïcödé façade — naïve café",
    "def f(x):\n    return x**2  # comment\n\n\n",
    "Привет мир, как дела? मशीन लर्निंग",
    "مرحبا بالعالم",
    "   multiple   spaces\t\ttabs\r\nCRLF",
    "I'm sure they'll've DONE it's 'quoted'",
    "https://example.com/a?b=c&d=e#frag",
]


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


def test_matches_tiktoken(tok):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(find_qwen_tiktoken()))
    enc = tiktoken.Encoding("qwen2", pat_str=QWEN2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False).ids == enc.encode(text), text


def test_known_qwen2_ids_and_round_trip(tok):
    # Ids from the published Qwen2 vocabulary.
    assert tok.encode("Hello world", add_special_tokens=False).ids == [9707, 1879]
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_special_tokens_are_single_ids(tok):
    for i, t in enumerate(QWEN2_VL_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == FIRST_SPECIAL_ID + i
    ids = tok.encode("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False).ids
    assert ids == [151652, 151655, 151653]
