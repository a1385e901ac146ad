"""Qwen2-VL multimodal embedders: Ops-MM-embedding-v1, GME-Qwen2-VL (2B/7B).

Built on mlx-vlm's qwen2_vl vision tower and Qwen2Model (final RMSNorm applied), not its
generation path. Every item is rendered with the embedders' chat template, images become
<|image_pad|> runs of their token count, and the vector is the final-normed hidden state of the
last token (the template ends in <|endoftext|>). Text, images and text+image share one space.

Batches are right-padded: with a causal mask the real tokens never see the padding, so no
padding mask is needed and each item's vector is the same alone or batched.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .base import EvaluatingForward, IMAGE, TEXT, EmbedItem, Prepared, UnsupportedInput, load_tokenizer, token_ids
from .qwen2_vl_image import Qwen2VLImageConfig, image_patches, normalize_patches, num_image_tokens

DEFAULT_INSTRUCTION = "You are a helpful assistant."
DEFAULT_MAX_TOKENS = 8192

# Family defaults for the image budget (in pixels), from the models' own inference code.
OPS_MM_MIN_PIXELS = 256 * 28 * 28
GME_MIN_PIXELS = 4 * 28 * 28
DEFAULT_MAX_PIXELS = 1280 * 28 * 28


class InputTooLong(ValueError):
    def __init__(self, tokens: int, limit: int):
        super().__init__(f"input needs {tokens} tokens (images included) but the model accepts at most {limit}")
        self.tokens = tokens
        self.limit = limit


def family_min_pixels(model_id: str) -> int | None:
    name = model_id.lower()
    if "gme" in name:
        return GME_MIN_PIXELS
    if "ops-mm" in name or "opensearch" in name:
        return OPS_MM_MIN_PIXELS
    return None


class Qwen2VLEmbedder(EvaluatingForward):
    family = "qwen2_vl"
    modalities = frozenset({TEXT, IMAGE})

    def __init__(
        self,
        model_dir: Path,
        model_id: str,
        config: dict,
        model: Any,
        quantization: str,
        max_tokens: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        self.model_dir = model_dir
        self.model_id = model_id
        self.model = model
        self.quantization = quantization
        text_cfg = config.get("text_config") or config
        self.dimension = int(text_cfg.get("hidden_size") or config["hidden_size"])
        limit = int(text_cfg.get("max_position_embeddings") or config.get("max_position_embeddings") or 32768)
        self.max_tokens = min(max_tokens or DEFAULT_MAX_TOKENS, limit)

        self.tokenizer = load_tokenizer(model_dir)
        # The prompt around each input (DESIGN.md): its closing part is the same for every item,
        # its opening part depends only on the instruction, so neither is tokenised per item
        # (the cache is bounded: instructions come from callers).
        self._prompt_suffix = tuple(self._tokenize("<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"))
        self._prompt_prefix = functools.lru_cache(maxsize=64)(self._tokenize_prefix)
        self.image_token_id = int(config.get("image_token_id", 151655))
        self.vision_start_id = int(config.get("vision_start_token_id", 151652))
        self.vision_end_id = int(config.get("vision_end_token_id", 151653))
        self.pad_id = self.tokenizer.token_to_id("<|endoftext|>") or 151643
        self._decode = self._decoder  # mx.compile'd by use_compiled_graphs
        self.compiled = False

        pre_path = model_dir / "preprocessor_config.json"
        pre_cfg = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
        vision = config.get("vision_config") or {}
        pre_cfg.setdefault("patch_size", vision.get("patch_size", 14))
        pre_cfg.setdefault("merge_size", vision.get("spatial_merge_size", 2))
        pre_cfg.setdefault("temporal_patch_size", vision.get("temporal_patch_size", 2))
        self.image_config = Qwen2VLImageConfig.from_preprocessor_config(
            pre_cfg,
            min_pixels=min_pixels or family_min_pixels(model_id),
            max_pixels=max_pixels or (None if pre_cfg.get("max_pixels") else DEFAULT_MAX_PIXELS),
        )

    @classmethod
    def load(cls, model_dir: Path, model_id: str, config: dict, quantization: str, fuse_qkv: bool = True,
             **kw) -> "Qwen2VLEmbedder":
        """Worker thread only: builds MLX arrays. fuse_qkv=False keeps q, k and v as three
        matmuls per layer (bench/fused_projections.py compares the two)."""
        from .qwen2_vl_checkpoint import load_qwen2_vl
        from .qwen2_vl_fused import fuse_qkv_projections
        from .qwen2_vl_vision import use_batched_vision
        from .quantize import apply_quantization

        model = load_qwen2_vl(model_dir, config)
        use_batched_vision(model)
        if fuse_qkv:  # before quantising, so the fused rows quantise as the separate ones would
            fuse_qkv_projections(model.language_model)
        # The vision tower stays in full precision: it is small and sensitive to quantisation.
        apply_quantization(model.language_model, quantization)
        return cls(model_dir, model_id, config, model, quantization, **kw)

    # ---- CPU side -------------------------------------------------------------------------
    def _tokenize(self, text: str) -> list[int]:
        return token_ids(self.tokenizer, text, add_special_tokens=False)

    def _tokenize_prefix(self, instruction: str) -> tuple[int, ...]:
        """The template's ids before an input, for this instruction (DESIGN.md)."""
        return tuple(self._tokenize(f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n"))

    def prepare(self, item: EmbedItem) -> Prepared:
        if item.text is None and not item.images:
            raise UnsupportedInput("empty item")
        prefix, suffix = self._prompt_prefix(item.instruction or DEFAULT_INSTRUCTION), self._prompt_suffix
        text_ids = self._tokenize(item.text) if item.text else []

        patches, grids, image_runs = [], [], []
        for img in item.images:
            flat, grid = image_patches(img.image, self.image_config)
            patches.append(flat)
            grids.append(grid)
            image_runs.append(
                [self.vision_start_id]
                + [self.image_token_id] * num_image_tokens(grid, self.image_config.merge_size)
                + [self.vision_end_id]
            )
        fixed = len(prefix) + len(suffix) + sum(len(r) for r in image_runs)
        full = fixed + len(text_ids)
        if full > self.max_tokens:
            room = self.max_tokens - fixed
            if room < 0 or (room == 0 and text_ids and not item.images):
                raise InputTooLong(full, self.max_tokens)
            text_ids = text_ids[:room]
        ids = list(prefix)
        for run in image_runs:
            ids.extend(run)
        ids.extend(text_ids)
        ids.extend(suffix)
        input_ids = np.asarray(ids, dtype=np.int32)
        extras: dict[str, Any] = {"positions": self._mrope_positions(input_ids, grids)}
        if patches:  # uint8, one frame: normalised on the device (qwen2_vl_image.image_patches)
            extras["image_patches"] = np.concatenate(patches, axis=0)
            extras["grid_thw"] = np.asarray(grids, dtype=np.int32)
        return Prepared(input_ids=input_ids, num_tokens=len(ids), extras=extras, full_tokens=full)

    def _mrope_positions(self, ids: np.ndarray, grids: list[tuple[int, int, int]]) -> np.ndarray:
        """M-RoPE position ids [3, seq] for one unpadded item, as mlx-vlm's get_rope_index.

        Text tokens advance all three axes together; an image's tokens take (t, h, w) grid
        coordinates offset by the position where the image starts; text after an image resumes
        one past the largest position used so far.
        """
        m = self.image_config.merge_size
        chunks: list[np.ndarray] = []
        next_pos = 0
        start = 0
        image_positions = np.flatnonzero(ids == self.image_token_id)
        cursor = 0
        for t, h, w in grids:
            first = int(image_positions[cursor])
            text_len = first - start
            chunks.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
            next_pos += text_len
            gh, gw = h // m, w // m
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            grid_pos = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + next_pos
            chunks.append(grid_pos)
            next_pos = int(grid_pos.max()) + 1
            n = t * gh * gw
            start = first + n
            cursor += n
        tail = len(ids) - start
        chunks.append(np.broadcast_to(np.arange(tail) + next_pos, (3, tail)))
        return np.concatenate(chunks, axis=1).astype(np.int32)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # ---- worker side ----------------------------------------------------------------------
    def encode(self, batch: Sequence[Prepared], length: int | None = None):
        """The pooled vectors as a lazy MLX array (float32 [len(batch), dimension]). Rows are
        right-padded to `length`: the model is causal and pools each row's last real token, so
        padding after it changes the shape, not the vectors."""
        import mlx.core as mx

        b = len(batch)
        length = max(length or 0, max(p.cost for p in batch))
        ids = np.full((b, length), self.pad_id, dtype=np.int32)
        positions = np.ones((3, b, length), dtype=np.int32)
        for i, p in enumerate(batch):
            ids[i, : p.cost] = p.input_ids
            positions[:, i, : p.cost] = p.extras["positions"]

        lm = self.model.language_model.model
        embeds = lm.embed_tokens(mx.array(ids))
        with_images = [p for p in batch if "image_patches" in p.extras]
        if with_images:
            tower = self.model.vision_tower
            dtype = tower.patch_embed.proj.weight.dtype
            # One host-to-MLX copy of each item's uint8 patches, then concatenation, rescaling,
            # normalising and the frame copies on the device (a numpy concatenate of float32
            # pixels once copied every 4.8 MB image twice on the worker thread).
            raw = mx.concatenate([mx.array(p.extras["image_patches"]) for p in with_images])
            pixels = normalize_patches(raw, self.image_config, xp=mx).astype(dtype)
            grid = np.concatenate([p.extras["grid_thw"] for p in with_images])  # host data (qwen2_vl_vision.py)
            features = tower(pixels, grid, output_hidden_states=False)
            # Image features fill the <|image_pad|> slots in row-major order: item by item,
            # image by image, the same order the features were concatenated in.
            flat = embeds.reshape(b * length, -1)
            slots = np.flatnonzero(ids.reshape(-1) == self.image_token_id)
            flat[mx.array(slots)] = features.astype(flat.dtype)
            embeds = flat.reshape(b, length, -1)
        last = mx.array(np.asarray([p.cost - 1 for p in batch], dtype=np.int32))
        return self._decode(embeds, mx.array(positions), last)

    def _decoder(self, embeds, positions, last):
        """The language model over the embedded sequence, pooled at each row's last token."""
        import mlx.core as mx

        hidden = self.model.language_model.model(None, inputs_embeds=embeds, position_ids=positions)
        return hidden[mx.arange(embeds.shape[0]), last].astype(mx.float32)

    def use_compiled_graphs(self) -> None:
        """Run the decoder and the vision tower's blocks through mx.compile: traced once per input
        shape, then replayed with their element-wise ops fused (RMSNorm, rotary, SwiGLU; in the
        tower rotary, residuals, the MLP's activation). On an H100 a Qwen2-VL-2B-sized forward
        ran 1.06-1.11x faster on texts (bench/compile_check.py; its graph built in 1.9-2.6
        instead of 2.7-3.8 ms) and 1.19x on images (qwen2_vl_vision.py). Each new shape costs a
        trace (~0.5 s), so the engine turns this on where batch shapes are bucketed
        (engine.compile). Worker thread only (the first call traces)."""
        import mlx.core as mx

        from .qwen2_vl_vision import use_compiled_blocks

        self._decode = mx.compile(self._decoder)
        use_compiled_blocks(self.model)
        self.compiled = True

    def describe(self) -> dict[str, Any]:
        c = self.image_config
        return {
            "pooling": "last_token",
            "image_min_pixels": c.min_pixels,
            "image_max_pixels": c.max_pixels,
            "default_instruction": DEFAULT_INSTRUCTION,
        }
