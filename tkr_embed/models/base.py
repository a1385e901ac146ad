"""The types every model family shares: what goes in (EmbedItem), what the CPU side prepares
(Prepared), and the Embedder protocol the engine drives.

`prepare` is pure CPU (tokenising, image resize) and runs in a thread pool; `forward` runs MLX and
is only ever called on the engine's worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

TEXT = "text"
IMAGE = "image"


@dataclass(frozen=True)
class DecodedImage:
    """An image that passed validation: RGB, EXIF-transposed, and a digest of its pixels."""

    image: Image.Image
    digest: str  # sha256 over mode, size and decoded pixel bytes

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


@dataclass(frozen=True)
class EmbedItem:
    """One input that becomes one vector: text, images, or both (fused)."""

    text: str | None = None
    images: tuple[DecodedImage, ...] = ()
    instruction: str | None = None

    @property
    def modalities(self) -> set[str]:
        m = set()
        if self.text is not None:
            m.add(TEXT)
        if self.images:
            m.add(IMAGE)
        return m


@dataclass
class Prepared:
    """Model-ready arrays for one item (numpy only; MLX arrays are made on the worker)."""

    input_ids: np.ndarray  # int32 [seq]
    num_tokens: int  # tokens the model attends to, image tokens included (no padding)
    extras: dict[str, Any] = field(default_factory=dict)  # family-specific arrays
    full_tokens: int = 0  # what the input would need untruncated (== num_tokens unless truncated)

    def __post_init__(self) -> None:
        self.full_tokens = max(self.full_tokens, self.num_tokens)

    @property
    def truncated(self) -> bool:
        return self.full_tokens > self.num_tokens

    @property
    def cost(self) -> int:
        """Sequence length the batch must pad to for this item."""
        return int(self.input_ids.shape[0])


class UnsupportedInput(ValueError):
    """The model cannot embed this kind of input (e.g. an image on a text-only model)."""


class Embedder(Protocol):
    model_id: str
    family: str
    dimension: int
    modalities: frozenset[str]
    max_tokens: int

    def prepare(self, item: EmbedItem) -> Prepared: ...

    def forward(self, batch: Sequence[Prepared], length: int | None = None) -> np.ndarray:
        """Raw pooled vectors, float32 [len(batch), dimension]. Every row is padded to `length`
        tokens (None: the longest item's; engine/shapes.py pads further). Worker thread only."""
        ...

    def encode(self, batch: Sequence[Prepared], length: int | None = None) -> Any:
        """forward's vectors as a lazy mx.array, built on the current stream and not evaluated
        (the engine evaluates several shards at once). Worker thread only."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def decode(self, ids: list[int]) -> str:
        """Token ids (as clients send them to /v1/embeddings) back to text."""
        ...

    @property
    def vocab_size(self) -> int: ...


class EvaluatingForward:
    """forward() for embedders that define encode(): evaluate the lazy vectors, hand back numpy."""

    def forward(self, batch: Sequence[Prepared], length: int | None = None) -> np.ndarray:
        import mlx.core as mx

        pooled = self.encode(batch, length)
        mx.eval(pooled)
        return np.array(pooled, copy=True)


# ---- tokenizers ---------------------------------------------------------------------------
def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The checkpoint's tokenizer.json, as the embedders use it: no padding, no truncation (they
    pad batches and cut inputs themselves)."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def token_ids(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """tokenizer.encode(text).ids without holding the GIL.

    Tokenizer.encode keeps the GIL for the whole call (a 180-word text: ~0.7 ms), so a prepare
    running in the CPU pool stalled the event loop and the MLX worker's Python meanwhile;
    encode_batch releases it, and for one text costs the same (bench/tokenizer_gil.py;
    docs/benchmarks.md, "Request path")."""
    return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
