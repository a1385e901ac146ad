"""The native fused BERT attention (tkr_embed/native/attention.cpp) against MLX's own attention:
real MLX arrays through the real built extension, on the worker thread."""

import platform

import numpy as np
import pytest

from tkr_embed import native


def _reference(q, k, v, key_mask, heads, scale):
    """softmax(scale q k^T + mask) v per head with MLX's stock ops, in [B, L, heads * head_dim]."""
    import mlx.core as mx

    B, L, HD = q.shape
    split = lambda x: x.reshape(B, L, heads, HD // heads).transpose(0, 2, 1, 3)  # noqa: E731
    scores = (split(q) * scale) @ split(k).transpose(0, 1, 3, 2)
    if key_mask is not None:
        scores = scores + key_mask[:, None, None, :]
    return (mx.softmax(scores, axis=-1) @ split(v)).transpose(0, 2, 1, 3).reshape(B, L, HD)


def test_native_attention_is_built_on_linux(worker):
    # scripts/setup.sh builds it on Linux; a broken build would silently cost the CPU path 2x.
    if platform.system() != "Linux":
        assert worker.call(native.bert_attention) is None
        return
    assert worker.call(native.bert_attention) is not None


# (batch, tokens, heads, head_dim, real tokens per item): a shape like MiniLM's; one whose rows
# span two query blocks (256 KB of scores: 218 rows at 300 tokens) and are not a multiple of the
# 8-lane loop; one item with a single token; no mask.
CASES = [
    (4, 64, 12, 32, [64, 40, 9, 1]),
    (2, 300, 4, 16, [300, 123]),
    (3, 13, 2, 8, None),
]


@pytest.mark.parametrize("B,L,H,D,lengths", CASES)
def test_fused_attention_matches_mlx(worker, B, L, H, D, lengths):
    def run():
        import mlx.core as mx

        fused = native.bert_attention()
        rng = np.random.default_rng(B * L)
        q, k, v = (mx.array(rng.standard_normal((B, L, H * D)).astype(np.float32) * 2) for _ in range(3))
        mask = None
        if lengths is not None:
            m = np.zeros((B, L), np.float32)
            for i, n in enumerate(lengths):
                m[i, n:] = np.finfo(np.float32).min  # BERT's additive key-padding mask
            mask = mx.array(m)
        scale = D ** -0.5
        ref = _reference(q, k, v, mask, H, scale)
        # On a second CPU stream, as the engine's shards run it.
        with mx.stream(mx.new_stream(mx.cpu)):
            ours = fused(q, k, v, mask, heads=H, scale=scale)
        return np.array(ours), np.array(ref)

    ours, ref = worker.call(run)
    assert ours.shape == ref.shape == (B, L, H * D)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def test_fused_attention_rejects_what_it_cannot_run(worker):
    def run():
        import mlx.core as mx

        fused = native.bert_attention()
        x = mx.zeros((2, 5, 8))
        errors = []
        for args, kw in [((x.astype(mx.float16),) * 3 + (None,), {"heads": 2, "scale": 1.0}),
                         ((x, x, mx.zeros((2, 6, 8)), None), {"heads": 2, "scale": 1.0}),
                         ((x, x, x, None), {"heads": 3, "scale": 1.0}),
                         ((x, x, x, mx.zeros((2, 4))), {"heads": 2, "scale": 1.0})]:
            with pytest.raises(ValueError) as info:
                fused(*args, **kw)
            errors.append(str(info.value))
        return errors

    errors = worker.call(run)
    assert "float32" in errors[0]
    assert "[batch, L, heads * head_dim]" in errors[1]
    assert "heads must divide" in errors[2]
    assert "one value per key" in errors[3]


def test_native_kernels_stay_off_when_asked_or_built_for_another_mlx(worker, monkeypatch, tmp_path):
    load = native.attention_module.__wrapped__  # the uncached loader
    monkeypatch.setenv("TKR_EMBED_NATIVE", "0")
    assert worker.call(load) is None
    monkeypatch.delenv("TKR_EMBED_NATIVE")
    stamp = tmp_path / "stamp"
    stamp.write_text("0.0.1\n")  # an MLX this library was not built for: its C++ ABI may differ
    monkeypatch.setattr(native, "version_stamp", lambda module: stamp)
    assert worker.call(load) is None
    stamp.unlink()  # never built
    assert worker.call(load) is None


def test_setup_rebuilds_only_for_another_mlx(worker, monkeypatch, tmp_path):
    # setup.sh runs on every serve and test command; the build it made for this MLX stays.
    from tkr_embed.native import build

    if platform.system() != "Linux":
        return
    assert worker.call(build.up_to_date) is not None
    stamp = tmp_path / "stamp"
    stamp.write_text("0.0.1\n")
    monkeypatch.setattr(build, "version_stamp", lambda module: stamp)
    assert worker.call(build.up_to_date) is None


# Packed sequences (rows end to end, no padding): lengths with one token, one spanning two query
# blocks (300 tokens at 4 heads x 16: 218 rows per block), none a multiple of the 8-lane loop.
PACKED_CASES = [
    (12, 32, [1, 64, 9, 40]),
    (4, 16, [300, 123, 7]),
    (2, 8, [13]),
]


@pytest.mark.parametrize("H,D,lengths", PACKED_CASES)
def test_packed_attention_matches_each_sequence_alone(worker, H, D, lengths):
    def run():
        import mlx.core as mx

        rng = np.random.default_rng(sum(lengths))
        T = sum(lengths)
        q, k, v = (mx.array(rng.standard_normal((T, H * D)).astype(np.float32) * 2) for _ in range(3))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        scale = D ** -0.5
        with mx.stream(mx.new_stream(mx.cpu)):
            ours = native.bert_attention_packed()(q, k, v, mx.array(offsets), heads=H, scale=scale)
        refs = [_reference(q[None, a:b], k[None, a:b], v[None, a:b], None, H, scale)[0]
                for a, b in zip(offsets, offsets[1:])]
        return np.array(ours), np.array(mx.concatenate(refs))

    ours, ref = worker.call(run)
    assert np.isfinite(ours).all()
    # Each sequence attends to its own rows only: a leak across a boundary would move these.
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def test_packed_attention_rejects_what_it_cannot_run_and_clamps_offsets(worker):
    def run():
        import mlx.core as mx

        packed = native.bert_attention_packed()
        x = mx.zeros((5, 8))
        ok = mx.array(np.array([0, 2, 5], np.int32))
        errors = []
        for args, kw in [((x.astype(mx.float16),) * 3 + (ok,), {"heads": 2, "scale": 1.0}),
                         ((x[None], x[None], x[None], ok), {"heads": 2, "scale": 1.0}),
                         ((x, x, x, ok), {"heads": 3, "scale": 1.0}),
                         ((x, x, x, ok.astype(mx.float32)), {"heads": 2, "scale": 1.0})]:
            with pytest.raises(ValueError) as info:
                packed(*args, **kw)
            errors.append(str(info.value))
        # Offsets past the rows are data the kernel reads on a stream's thread, where an exception
        # would end the process: they are clamped to the rows instead.
        rng = np.random.default_rng(1)
        y = mx.array(rng.standard_normal((5, 8)).astype(np.float32))
        wild = packed(y, y, y, mx.array(np.array([0, 2, 99], np.int32)), heads=2, scale=1.0)
        good = packed(y, y, y, ok, heads=2, scale=1.0)
        return errors, np.array(wild), np.array(good)

    errors, wild, good = worker.call(run)
    assert "float32" in errors[0]
    assert "[tokens, heads * head_dim]" in errors[1]
    assert "heads must divide" in errors[2]
    assert "int32 [sequences + 1]" in errors[3]
    np.testing.assert_array_equal(wild, good)
