"""Element-wise kernels for MLX's CPU backend, where transcendental ops run as scalar code.

On 3.1M float32 elements mx.erf took 95 ms and nn.gelu 97 ms on this project's 2-core machines,
while multiply/add/divide vectorise. GELU's erf is replaced by Abramowitz & Stegun 7.1.28
(|error| <= 3e-7): erf(z) = 1 - 1 / (1 + a1 z + ... + a6 z^6)^16 for z >= 0, odd-symmetric,
fused by mx.compile into one pass. Used only on the CPU backend; Metal and CUDA keep nn.GELU.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

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


def use_fast_cpu_ops(bert_model) -> int:
    """Swap exact-GELU activations in a BERT encoder; returns how many were swapped."""
    swapped = 0
    for layer in bert_model.encoder.layer:
        act = layer.intermediate.intermediate_act_fn
        if isinstance(act, nn.GELU) and getattr(act, "_approx", "none") == "none":
            layer.intermediate.intermediate_act_fn = PolyGELU()
            swapped += 1
    return swapped
