"""BERT-family encoders on packed sequences: a batch's tokens end to end, no padding.

A padded batch computes every item at its longest neighbour's length: a 20-token query beside a
250-token passage costs 250 tokens in every projection and feed-forward block. In a BERT layer
everything but attention works token by token, so the batch can run as one [tokens, hidden]
matrix instead, and attention per sequence over its own rows (the native kernel's
`bert_attention_packed`, tkr_embed/native/attention.cpp). The vectors are the padded forward's:
padding tokens were masked out of attention and pooling anyway (tests/models/test_packed_bert.py
holds them to 1e-5). What it changes is the work, which is now the batch's real tokens, so the
engine's CPU streams can be given equal shares of it (engine/shards.py) and the batcher can count
a batch's budget in real tokens (engine/batcher.py).

MLX's CPU backend only (the kernel runs there), float32, with the fast CPU ops installed
(models/fast_ops.py puts the native attention in every layer). GPU backends keep padded batches:
CUDA's compiled graphs want few shapes (engine/shapes.py), and Metal has its own fused attention.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .base import Prepared


def packable(model: Any) -> bool:
    """Whether this mlx-vlm BERT can run packed here: the native packed attention loaded, every
    layer's attention swapped for the native one (set_fast_cpu_ops), float32 weights."""
    import mlx.core as mx
    from mlx_vlm.models.bert.bert import BertEmbeddings

    from ..native import bert_attention_packed
    from .fast_ops import FusedSelfAttention

    embeddings = getattr(model, "embeddings", None)
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    return (bert_attention_packed() is not None
            and type(embeddings) is BertEmbeddings
            and bool(layers)
            and all(type(layer.attention.self) is FusedSelfAttention for layer in layers)
            and embeddings.word_embeddings.weight.dtype == mx.float32)


def rows_step(tokens: int) -> int:
    """What a packed batch's rows are rounded up to a multiple of: 1/16 of the power of two at or
    below its tokens (1 up to 31 tokens, 16 for 256-511, 64 for 1024-2047), so at most 6.25%
    filler and 16 row counts per octave.

    Why round at all: MLX's CPU allocator reuses a cached buffer only within two pages of the
    size asked for, and every distinct row count asks for new sizes. Exact row counts (every
    batch of mixed lengths a new one) kept allocating: fresh 28-36-item batches of short texts
    took ~200 page faults per text (1-2 ms of kernel time, 10-15% of the forward) and the cache
    grew past 1.5 GB in 30 s; rounded, faults fell to ~1 per text after the first seconds and
    the cache stayed at ~330 MB (bench/packed_rows.py, docs/benchmarks.md)."""
    return 1 << max(0, int(tokens).bit_length() - 5)


class PackedBatch:
    """A batch's token ids end to end: item i is rows offsets[i] .. offsets[i + 1]; after the
    items, where rows_multiple asks for it, a filler sequence."""

    def __init__(self, batch: Sequence[Prepared], filler_id: int = 0, rows_multiple: int | None = None):
        """Rows are rounded up to a multiple of rows_multiple (None: rows_step of the batch's
        tokens) with a filler sequence of filler_id tokens, attended only by itself, never pooled."""
        lengths = np.fromiter((p.cost for p in batch), dtype=np.int64, count=len(batch))
        if len(batch) == 0 or (lengths <= 0).any():
            raise ValueError("a packed batch needs at least one item, each with at least one token")
        self.lengths = lengths
        self.items = len(batch)
        total = int(lengths.sum())
        fill = -total % (rows_step(total) if rows_multiple is None else max(1, rows_multiple))
        segments = np.append(lengths, fill) if fill else lengths
        self.offsets = np.zeros(len(segments) + 1, dtype=np.int32)
        np.cumsum(segments, out=self.offsets[1:])
        parts = [p.input_ids for p in batch]
        if fill:
            parts.append(np.full(fill, filler_id, dtype=np.int32))
        self.ids = np.concatenate(parts).astype(np.int32, copy=False)
        # Each sequence's positions restart at 0, as they would in its own padded row.
        starts = np.repeat(self.offsets[:-1], segments)
        self.positions = (np.arange(self.tokens, dtype=np.int32) - starts).astype(np.int32)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    def padded_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(row of the packed matrix for each [item, position], the 0/1 mask), [items, longest]:
        positions past an item's end point at row `tokens` (a row of zeros the caller appends)."""
        longest = int(self.lengths.max())
        pos = np.arange(longest, dtype=np.int32)
        mask = pos[None, :] < self.lengths[:, None]
        index = np.where(mask, self.offsets[:self.items, None] + pos[None, :], self.tokens).astype(np.int32)
        return index, mask.astype(np.int32)


def encode_packed(model: Any, packed: PackedBatch):
    """The encoder's last hidden states for a packed batch, lazy: float32 [tokens, hidden].
    The same steps as mlx-vlm's BertModel._encode and BertLayer, on rows instead of a padded grid."""
    import mlx.core as mx

    from ..native import bert_attention_packed

    attention = bert_attention_packed()
    emb = model.embeddings
    ids = mx.array(packed.ids)
    h = (emb.word_embeddings(ids) + emb.position_embeddings(mx.array(packed.positions))
         + emb.token_type_embeddings(mx.zeros_like(ids)))
    h = emb.LayerNorm(h)
    offsets = mx.array(packed.offsets)
    for layer in model.encoder.layer:
        sa = layer.attention.self
        context = attention(sa.query(h), sa.key(h), sa.value(h), offsets,
                            heads=sa.num_attention_heads, scale=sa.scale)
        attended = layer.attention.output(context, h)
        h = layer.output(layer.intermediate(attended), attended)
    return h


def unpack(hidden, packed: PackedBatch):
    """The packed hidden states back in a padded grid for pooling: ([items, longest, hidden] with
    zeros past each item's end, the [items, longest] mask), as lazy MLX arrays."""
    import mlx.core as mx

    index, mask = packed.padded_index()
    rows = mx.concatenate([hidden, mx.zeros((1, hidden.shape[-1]), dtype=hidden.dtype)])
    return rows[mx.array(index)], mx.array(mask)
