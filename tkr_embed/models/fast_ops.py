"""Element-wise kernels for MLX's CPU backend, where transcendental ops run as scalar code.

On 3.1M float32 elements mx.erf took 95 ms, nn.gelu 97 ms and mx.exp 45 ms on this project's
2-core machines, while multiply/add/divide vectorise. So, with only multiplies and adds, fused by
mx.compile:
- GELU's erf is Abramowitz & Stegun 7.1.28 (|error| <= 3e-7): erf(z) = 1 - 1 / (1 + a1 z + ...
  + a6 z^6)^16 for z >= 0, odd-symmetric.
- attention's softmax exponential is exp(x) = (e^(x/64))^64 for x <= 0: a degree-6 Taylor
  polynomial in Estrin's form squared six times, fused with the subtraction of the row's maximum
  (absolute error <= 4e-6). Its attention also divides after the value product ([.., L, head_dim])
  instead of dividing the [.., L, L] weights, and takes the weights' row sums from that product.
  Attention on a 4 x 248-token MiniLM shard (12 heads, one core, median of 5 rounds in one run):
  stock 52.6 ms, eight squarings of a Horner polynomial (five fused kernels) 43.9, this form (two
  kernels) 19.7.
Where the native kernels are built (Linux: scripts/setup.sh), attention runs instead as one fused
C++ kernel (FusedSelfAttention, tkr_embed/native), about twice as fast again.
Used only on the CPU backend; Metal and CUDA keep nn.GELU and mx.fast.scaled_dot_product_attention.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_vlm.models.bert.bert import BertSelfAttention

from ..native import bert_attention as native_bert_attention

_A = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)
_INV_SQRT2 = 0.7071067811865476


def _gelu_erf_poly(x: mx.array) -> mx.array:
    z = mx.abs(x) * _INV_SQRT2
    a1, a2, a3, a4, a5, a6 = _A
    p = 1.0 + z * (a1 + z * (a2 + z * (a3 + z * (a4 + z * (a5 + z * a6)))))
    p2 = p * p
    p4 = p2 * p2
    p8 = p4 * p4
    erf_abs = 1.0 - 1.0 / (p8 * p8)
    # 0.5 * x * (1 + erf(x / sqrt 2)), with erf odd: sign(x) * erf(|x| / sqrt 2)
    return 0.5 * x * (1.0 + mx.where(x >= 0, erf_abs, -erf_abs))


gelu_erf_poly = mx.compile(_gelu_erf_poly, shapeless=True)


class PolyGELU(nn.Module):
    """Drop-in for nn.GELU() (the exact, erf-based one) on the CPU backend."""

    def __call__(self, x: mx.array) -> mx.array:
        return gelu_erf_poly(x)


# exp(x) = q(x)^64, q the degree-6 Taylor polynomial of e^(x/64) (the 1/64^k folded into its
# coefficients). Estrin's scheme keeps the graph shallow: mx.compile fuses element-wise ops only up
# to a fixed depth (max_compile_depth, 11 in MLX's source; a shapeless trace adds a broadcast per
# binary op), and a Horner polynomial with eight squarings fell apart into five kernels, each a
# pass over the [batch, heads, L, L] scores in memory; this form runs as two.
_EXP_COEFFS = tuple(1.0 / (64.0 ** k * math.factorial(k)) for k in range(7))


def _softmax_numerator(scores: mx.array, row_max: mx.array) -> mx.array:
    """exp(scores - row_max), for scores <= row_max. Absolute error <= 4e-6, relative <= 1e-5
    where exp >= 1e-6; the additive padding mask (the dtype's minimum) gives ~0 (2.4e-38), not inf
    or NaN."""
    # Below -87 float32's exp is denormal or 0; clamping also keeps the mask's -3e38 finite.
    x = mx.maximum(scores - row_max, -87.0)
    c0, c1, c2, c3, c4, c5, c6 = _EXP_COEFFS
    x2 = x * x
    x4 = x2 * x2
    q = (c0 + c1 * x) + x2 * (c2 + c3 * x) + x4 * ((c4 + c5 * x) + c6 * x2)
    for _ in range(6):
        q = q * q
    return q


# shapeless: serving sees every batch shape; a shape-specialised compile would retrace for each.
softmax_numerator = mx.compile(_softmax_numerator, shapeless=True)


def poly_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None, heads: int,
                   scale: float) -> mx.array:
    """softmax(scale q k^T + mask) v per head with the polynomial softmax, from the projections
    ([B, L, heads * head_dim]) to the merged-heads output; mask additive (0 for tokens, the dtype's
    minimum for padding), broadcastable to [B, heads, L, L]."""
    B, L, HD = q.shape
    D = HD // heads

    def split(x: mx.array) -> mx.array:  # [B, heads, L, head_dim]
        return x.reshape(B, L, heads, D).transpose(0, 2, 1, 3)

    q, k, v = split(q) * scale, split(k), split(v)
    scores = q @ k.transpose(0, 1, 3, 2)
    if mask is not None:
        scores = scores + mask
    # float32 whatever the model's dtype: six squarings would multiply a half-precision
    # rounding error by 64.
    scores = scores.astype(mx.float32)
    weights = softmax_numerator(scores, mx.max(scores, axis=-1, keepdims=True))
    # The rows' sums come out of the value product: v with a column of ones appended (the
    # matmul would copy the head-split v anyway) saves a reduction pass over the weights.
    ones = mx.ones((B, heads, L, 1), dtype=v.dtype)
    out = (weights.astype(v.dtype) @ mx.concatenate([v, ones], axis=-1)).transpose(0, 2, 1, 3)
    # Dividing the [B, L, heads, head_dim] views writes the merged-heads layout directly.
    return (out[..., :D] / out[..., D:]).reshape(B, L, HD)


class PolyExpSelfAttention(BertSelfAttention):
    """mlx-vlm's BertSelfAttention with the polynomial softmax. Installed by switching an existing
    module's class, so the parameter names (and a converted model's saved weights) stay the same."""

    def __call__(self, hidden_states: mx.array, mask: mx.array | None = None) -> mx.array:
        return poly_attention(self.query(hidden_states), self.key(hidden_states), self.value(hidden_states),
                              mask, self.num_attention_heads, self.scale)


class FusedSelfAttention(BertSelfAttention):
    """BERT self-attention as one native CPU kernel (tkr_embed/native/attention.cpp): per block of
    query rows, scores, softmax and the value product stay in the cache, where poly_attention
    makes a pass over the whole [batch, heads, L, L] scores in memory for each step. A 4 x 252-token
    MiniLM shard, one core: 9.0 ms against 18.2-19.9 for poly_attention. float32 with a
    key-padding mask (BERT's); anything else takes poly_attention. Installed only where the
    kernel loaded (set_fast_cpu_ops)."""

    def __call__(self, hidden_states: mx.array, mask: mx.array | None = None) -> mx.array:
        B, L, _ = hidden_states.shape
        q, k, v = self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)
        if hidden_states.dtype != mx.float32 or (mask is not None and mask.shape != (B, 1, 1, L)):
            return poly_attention(q, k, v, mask, self.num_attention_heads, self.scale)
        return native_bert_attention()(q, k, v, None if mask is None else mask.reshape(B, L),
                                       heads=self.num_attention_heads, scale=self.scale)


def set_fast_cpu_ops(bert_model, on: bool = True, native: bool = True) -> list[str]:
    """Swap a BERT encoder's exact GELU and its attention for the polynomial versions, attention
    for the native fused kernel where it is built and native=True (or all back, on=False); returns
    which ops are now the fast ones."""
    attention_class = FusedSelfAttention if native and native_bert_attention() is not None else PolyExpSelfAttention
    swapped: set[str] = set()
    for layer in bert_model.encoder.layer:
        act = layer.intermediate.intermediate_act_fn
        if on and isinstance(act, nn.GELU) and getattr(act, "_approx", "none") == "none":
            layer.intermediate.intermediate_act_fn = act = PolyGELU()
        elif not on and isinstance(act, PolyGELU):
            layer.intermediate.intermediate_act_fn = act = nn.GELU()
        if isinstance(act, PolyGELU):
            swapped.add("gelu")
        attn = layer.attention.self
        if on and type(attn) in (BertSelfAttention, PolyExpSelfAttention, FusedSelfAttention):
            attn.__class__ = attention_class
        elif not on and type(attn) in (PolyExpSelfAttention, FusedSelfAttention):
            attn.__class__ = BertSelfAttention
        if type(attn) is FusedSelfAttention:
            swapped.add("fused_attention")
        elif type(attn) is PolyExpSelfAttention:
            swapped.add("softmax")
    return sorted(swapped)
