"""MiniLM on packed sequences (models/packed_bert.py) against its padded batches: the same vectors
for every pooling mode, whatever the mix of lengths; and where packing must stay off."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from tkr_embed.models.base import EmbedItem, Prepared
from tkr_embed.models.packed_bert import PackedBatch, packable, rows_step
from tkr_embed.models.registry import load_embedder, resolve_model_dir
from tests.conftest import MINILM_SPEC

linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="the native kernels are built on Linux")

# A single character, a query, a passage past MiniLM's 256-token window (truncated), CJK and emoji.
TEXTS = ["x", "optimize API response time", "a recipe for banana bread " * 60, "机器学习 🚀",
         "local embedding server " * 12, "retrieval of passages"]


def _prepared(ids_per_item):
    return [Prepared(input_ids=np.asarray(ids, np.int32), num_tokens=len(ids)) for ids in ids_per_item]


def test_packed_batch_layout():
    packed = PackedBatch(_prepared([[5, 6, 7], [8], [9, 10]]))
    assert packed.tokens == 6
    assert packed.offsets.tolist() == [0, 3, 4, 6]
    assert packed.ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert packed.positions.tolist() == [0, 1, 2, 0, 0, 1]  # each item's positions restart at 0
    index, mask = packed.padded_index()
    assert index.tolist() == [[0, 1, 2], [3, 6, 6], [4, 5, 6]]  # 6: the appended row of zeros
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    with pytest.raises(ValueError):
        PackedBatch([])


def test_rows_round_up_with_a_filler_sequence_that_no_item_sees():
    packed = PackedBatch(_prepared([[5, 6, 7], [8], [9, 10]]), rows_multiple=4, filler_id=0)
    assert packed.tokens == 8 and packed.items == 3
    assert packed.offsets.tolist() == [0, 3, 4, 6, 8]  # the filler is a sequence of its own
    assert packed.ids.tolist() == [5, 6, 7, 8, 9, 10, 0, 0]
    assert packed.positions.tolist() == [0, 1, 2, 0, 0, 1, 0, 1]
    index, mask = packed.padded_index()  # items only: the filler is never pooled
    assert index.tolist() == [[0, 1, 2], [3, 8, 8], [4, 5, 8]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert PackedBatch(_prepared([[1, 2], [3, 4]]), rows_multiple=4).offsets.tolist() == [0, 2, 4]  # fits


def test_rows_step_is_a_sixteenth_of_the_octave():
    assert [rows_step(t) for t in (1, 31, 32, 255, 256, 511, 512, 2047, 2048)] == [1, 1, 2, 8, 16, 16, 32, 64, 128]
    for tokens in range(1, 5000):  # filler at most 1/16 of the rows
        step = rows_step(tokens)
        assert (-tokens % step) <= tokens / 16


@linux_only
@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken"])
def test_packed_minilm_gives_the_padded_vectors(worker, minilm, pooling):
    prepared = [minilm.prepare(EmbedItem(text=t)) for t in TEXTS]
    assert len({p.cost for p in prepared}) == len(TEXTS)  # every length differs: padding everywhere
    total = sum(p.cost for p in prepared)
    assert total % rows_step(total), "the packed batch should need a filler sequence"

    def both():
        saved = minilm.pooling_config
        minilm.pooling_config = {"pooling_mode": pooling}
        try:
            assert minilm.use_packed_sequences()
            packed = minilm.forward(prepared)
            minilm.packed = False
            padded = minilm.forward(prepared)
            bucketed = minilm.forward(prepared, 300)  # a length asked for: padded, packing or not
            return packed, padded, bucketed
        finally:
            minilm.pooling_config, minilm.packed = saved, False

    packed, padded, bucketed = worker.call(both)
    assert packed.shape == (len(TEXTS), 384) and np.isfinite(packed).all()
    np.testing.assert_allclose(packed, padded, atol=1e-5)
    np.testing.assert_allclose(bucketed, padded, atol=1e-5)


@linux_only
def test_packing_stays_off_where_it_cannot_run(worker, monkeypatch, tiny):
    from tkr_embed import native

    def check():
        import mlx.core as mx

        emb = load_embedder(resolve_model_dir(MINILM_SPEC), "none").embedder
        can = packable(emb.model)
        emb.model.set_dtype(mx.float16)  # the native kernels are float32 only
        half = packable(emb.model)
        return can, half, packable(tiny.model), hasattr(tiny, "use_packed_sequences")

    can, half, qwen, qwen_can_ask = worker.call(check)
    assert can and not half and not qwen and not qwen_can_ask
    # Without the native kernels (TKR_EMBED_NATIVE=0) the layers keep MLX-op attention: no packing.
    monkeypatch.setenv("TKR_EMBED_NATIVE", "0")
    native.attention_module.cache_clear()
    try:
        emb = worker.call(lambda: load_embedder(resolve_model_dir(MINILM_SPEC), "none").embedder)
        assert emb.fast_ops == ["gelu", "softmax"]
        assert worker.call(emb.use_packed_sequences) is False
    finally:
        monkeypatch.delenv("TKR_EMBED_NATIVE")
        native.attention_module.cache_clear()
