"""Reference embeddings computed with transformers + torch, the way the models' own code does.

Used by the correctness tests (parity) and by the benchmark (the raw torch peer): `inputs()` does the
preprocessing, `forward()` the model alone, so the benchmark can time the forward pass by itself."""

from __future__ import annotations

import numpy as np

DEFAULT_SYSTEM = "You are a helpful assistant."


def qwen2_vl_prompt(text: str, n_images: int, instruction: str | None = None) -> str:
    """GME / Ops-MM's chat template for one item (an image = one <|image_pad|> before the text)."""
    return (f"<|im_start|>system\n{instruction or DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            + "<|vision_start|><|image_pad|><|vision_end|>" * n_images
            + text + "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")


class Qwen2VLReference:
    """transformers' Qwen2VLModel (final-normed last hidden state), last-token pooling, L2 norm.
    Batches are LEFT-padded here (tkr-embed right-pads), so batching is checked too."""

    def __init__(self, model_dir, min_pixels=None, max_pixels=None, device="cpu", dtype="float32"):
        import torch
        from transformers import AutoTokenizer, Qwen2VLModel
        try:
            from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
        except ImportError:  # transformers < 5.2x: the PIL processor had the plain name
            from transformers.models.qwen2_vl import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil

        self.torch = torch
        self.device = device
        kw = {"attn_implementation": "sdpa"} if device != "cpu" else {}
        self.model = Qwen2VLModel.from_pretrained(model_dir, dtype=getattr(torch, dtype), **kw).to(device).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        self.images = Qwen2VLImageProcessorPil.from_pretrained(model_dir, **kw)
        self.image_token_id = self.model.config.image_token_id

    def embed(self, items: list[tuple[str, list, str | None]]) -> np.ndarray:
        """items: (text, [PIL images], instruction)."""
        return self.forward(self.inputs(items))

    def inputs(self, items: list[tuple[str, list, str | None]]) -> dict:
        prompts = [qwen2_vl_prompt(t, len(imgs), ins) for t, imgs, ins in items]
        images = [im for _, imgs, _ in items for im in imgs]
        inputs = {}
        if images:
            pix = self.images(images=images, return_tensors="pt")
            grids = iter(pix["image_grid_thw"].tolist())
            merge = self.images.merge_size ** 2
            expanded = []
            for p in prompts:  # what Qwen2VLProcessor does: one pad per merged patch
                while "<|image_pad|>" in p:
                    t, h, w = next(grids)
                    p = p.replace("<|image_pad|>", "<|placeholder|>" * (t * h * w // merge), 1)
                expanded.append(p.replace("<|placeholder|>", "<|image_pad|>"))
            prompts = expanded
            inputs.update(pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"])
        enc = self.tok(prompts, padding=True, return_tensors="pt")
        inputs.update(enc, mm_token_type_ids=(enc["input_ids"] == self.image_token_id).long())
        return {k: v.to(self.device) for k, v in inputs.items()}

    def forward(self, inputs: dict) -> np.ndarray:
        with self.torch.no_grad():
            hidden = self.model(**inputs).last_hidden_state
        last = hidden[:, -1].float().cpu().numpy()  # left padding: the last position is every item's last token
        return last / np.linalg.norm(last, axis=1, keepdims=True)


class SentenceTransformerReference:
    """sentence-transformers' math on transformers' BertModel: tokenise with truncation at the
    checkpoint's max_seq_length, pool as 1_Pooling/config.json says (mean here), normalise."""

    def __init__(self, model_dir):
        import json
        from pathlib import Path

        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        st = json.loads((Path(model_dir) / "sentence_bert_config.json").read_text())
        self.max_len = st["max_seq_length"]
        pooling = json.loads((Path(model_dir) / "1_Pooling" / "config.json").read_text())
        assert pooling["pooling_mode_mean_tokens"], "this reference implements mean pooling"

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.forward(self.inputs(texts))

    def inputs(self, texts: list[str]) -> dict:
        return dict(self.tok(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt"))

    def forward(self, enc: dict) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            h = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)
