"""C++ kernels for MLX's CPU backend, built on the user's machine by scripts/setup.sh
(`python -m tkr_embed.native.build`, see build.py).

They are optional: without them the same work runs as MLX ops (tkr_embed/models/fast_ops.py),
about twice as slow in attention. Today there is one library, attention.cpp, with BERT
self-attention fused per block of query rows, which MLX's CPU backend lacks: `bert_attention` on
padded [batch, L, hidden] projections, `bert_attention_packed` on sequences packed end to end
([tokens, hidden], no padding: models/packed_bert.py).

A kernel built against one MLX version is not loaded under another (C++ ABI): the build writes the
MLX version beside the library, and a mismatch means MLX ops until setup.sh runs again.
TKR_EMBED_NATIVE=0 turns the kernels off (for A/B benchmarks, or to rule them out).
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Callable

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
ATTENTION_MODULE = "_attention"


def version_stamp(module: str) -> Path:
    return PACKAGE_DIR / f"{module}.mlx-version"


@cache
def attention_module() -> ModuleType | None:
    """The built attention library, or None (not built, built for another MLX, or turned off)."""
    if os.environ.get("TKR_EMBED_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        log.info("native CPU kernels off (TKR_EMBED_NATIVE)")
        return None
    import mlx.core as mx

    stamp = version_stamp(ATTENTION_MODULE)
    built_for = stamp.read_text().strip() if stamp.exists() else None
    if built_for is None:
        log.info("native CPU attention not built (python -m tkr_embed.native.build); using MLX ops")
        return None
    if built_for != mx.__version__:
        log.warning("native CPU attention was built for MLX %s, this is %s: using MLX ops "
                    "(rebuild: python -m tkr_embed.native.build)", built_for, mx.__version__)
        return None
    try:
        from . import _attention
    except ImportError as exc:
        log.warning("native CPU attention did not load (%s); using MLX ops", exc)
        return None
    return _attention


def bert_attention() -> Callable | None:
    """The fused attention op on padded batches, or None (attention_module says why)."""
    module = attention_module()
    return None if module is None else module.bert_attention


def bert_attention_packed() -> Callable | None:
    """The fused attention op on packed sequences, or None."""
    module = attention_module()
    return None if module is None else module.bert_attention_packed
