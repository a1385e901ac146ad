"""sentence-transformers text encoders of the BERT family (all-MiniLM-L6-v2, bge-*, ...).

The network is mlx-vlm's BERT; pooling and the max sequence length come from the checkpoint's
sentence-transformers files (1_Pooling/config.json, sentence_bert_config.json, modules.json), so
the vectors are the ones sentence-transformers would produce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from .base import EvaluatingForward, TEXT, EmbedItem, Prepared, UnsupportedInput, load_tokenizer, token_ids


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


class TextEncoderEmbedder(EvaluatingForward):
    family = "text_encoder"
    modalities = frozenset({TEXT})

    def __init__(self, model_dir: Path, model_id: str, config: dict, model: Any, quantization: str,
                 max_tokens: int | None = None):
        """max_tokens: a lower limit than the checkpoint's (model.max_tokens), or None."""
        self.model_dir = model_dir
        self.model_id = model_id
        self.model = model
        self.quantization = quantization
        self.dimension = int(config["hidden_size"])
        st_cfg = _read_json(model_dir / "sentence_bert_config.json") or {}
        self.max_tokens = int(st_cfg.get("max_seq_length") or config.get("max_position_embeddings", 512))
        self.max_tokens = min(self.max_tokens, int(config.get("max_position_embeddings", 512)), max_tokens or 1 << 30)
        self.pooling_config = _read_json(model_dir / "1_Pooling" / "config.json") or {"pooling_mode": "mean"}
        modules = _read_json(model_dir / "modules.json") or []
        self.checkpoint_normalizes = any("Normalize" in m.get("type", "") for m in modules)
        self.tokenizer = load_tokenizer(model_dir)
        self.pad_id = int(config.get("pad_token_id", 0) or 0)
        self.fast_ops: list[str] = []  # ops swapped for multiply-add polynomials (CPU backend)
        self.packed = False  # batches run as packed sequences, no padding (use_packed_sequences)

    @classmethod
    def load(cls, model_dir: Path, model_id: str, config: dict, quantization: str,
             max_tokens: int | None = None) -> "TextEncoderEmbedder":
        """Worker thread only: builds MLX arrays."""
        from mlx_vlm.utils import load_model

        from .quantize import apply_quantization, on_cpu_backend

        model = load_model(model_dir)
        apply_quantization(model, quantization)
        emb = cls(model_dir, model_id, config, model, quantization, max_tokens)
        if on_cpu_backend():  # scalar erf and exp are the CPU backend's biggest costs in BERT layers
            from .fast_ops import set_fast_cpu_ops

            emb.fast_ops = set_fast_cpu_ops(model)
        return emb

    def prepare(self, item: EmbedItem) -> Prepared:
        if item.images:
            raise UnsupportedInput("images")
        if item.text is None:
            raise UnsupportedInput("empty item")
        text = item.text if not item.instruction else f"{item.instruction}{item.text}"
        ids = token_ids(self.tokenizer, text)
        full = len(ids)
        if full > self.max_tokens:
            # Keep the closing special token ([SEP]), as sentence-transformers' truncation does.
            ids = ids[: self.max_tokens - 1] + ids[-1:]
        return Prepared(input_ids=np.asarray(ids, dtype=np.int32), num_tokens=len(ids), full_tokens=full)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def use_packed_sequences(self) -> bool:
        """Run batches as packed sequences (models/packed_bert.py) where this model and backend
        can; returns whether it does. Worker thread only (it checks the weights)."""
        from .packed_bert import packable

        self.packed = packable(self.model)
        return self.packed

    def encode(self, batch: Sequence[Prepared], length: int | None = None):
        """The pooled vectors as a lazy MLX array (float32 [len(batch), dimension]); padding
        tokens are masked, so `length` changes the shape, not the vectors. Packed (no padding at
        all) where use_packed_sequences turned it on and no length is asked for."""
        import mlx.core as mx
        from mlx_vlm.models.pooling import pool_by_config

        if self.packed and length is None:
            from .packed_bert import PackedBatch, encode_packed, unpack

            packed = PackedBatch(batch, filler_id=self.pad_id)
            hidden, mask = unpack(encode_packed(self.model, packed), packed)
            return pool_by_config(hidden, mask, self.pooling_config).astype(mx.float32)
        length = max(length or 0, max(p.cost for p in batch))
        ids = np.full((len(batch), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(batch), length), dtype=np.int32)
        for i, p in enumerate(batch):
            ids[i, : p.cost] = p.input_ids
            mask[i, : p.cost] = 1
        mask_mx = mx.array(mask)
        hidden, _ = self.model._encode(mx.array(ids), mask_mx)
        return pool_by_config(hidden, mask_mx, self.pooling_config).astype(mx.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling_config,
            "checkpoint_normalizes": self.checkpoint_normalizes,
            "cpu_fast_ops": self.fast_ops,
            "packed_sequences": self.packed,
        }
