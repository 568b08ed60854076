"""AdaptivFloat (Tambe et al., DAC 2020): a b-bit floating-point format whose exponent
range is set per layer, the non-uniform grid a PSGD reviewer cites.

A value is ±2^e·(1 + k/2^m) with m mantissa bits (k = 0 … 2^m − 1) and e one of the 2^E
exponents e_min … e_max (E exponent bits; b = 1 + E + m). The per-layer exponent bias puts
e_max = floor(log2 max|w|), so the largest value, 2^e_max·(2 − 2^−m), reaches the layer's
range. There are no subnormals: the smallest magnitude, 2^e_min, is taken for zero
(Algorithm 1 of the paper). Nearest rounding to that set of values, with |w| above the
largest value clipped to it.
"""
from __future__ import annotations

import torch

from ..checks import check_bits, finite_range

__all__ = ["adaptivfloat_values", "quantize_adaptivfloat"]


def adaptivfloat_values(max_abs: float, bits: int, exp_bits: int) -> torch.Tensor:
    """The non-negative values of the b-bit AdaptivFloat format for a layer whose largest
    ``|w|`` is ``max_abs``, sorted (0 first; 2^(b−1) values in all)."""
    bits = check_bits(bits, 2, 16)
    exp_bits = check_bits(exp_bits, 1, bits - 1, "exp_bits")
    m = bits - 1 - exp_bits
    if not max_abs > 0:
        return torch.zeros(1)
    e_max = int(torch.floor(torch.log2(torch.tensor(float(max_abs)))).item())
    exps = torch.arange(e_max - 2 ** exp_bits + 1, e_max + 1, dtype=torch.float64)
    mant = 1 + torch.arange(2 ** m, dtype=torch.float64) / 2 ** m
    values = (2.0 ** exps[:, None] * mant[None, :]).flatten()
    values[0] = 0.0  # the smallest code is zero: no subnormals
    return values.float()


def quantize_adaptivfloat(w: torch.Tensor, bits: int, exp_bits: int | None = None
                          ) -> torch.Tensor:
    """Round ``w`` to the nearest value of the b-bit AdaptivFloat format whose exponent bias
    fits ``w``'s range (one per tensor: per layer, as in the paper). Dequantized.

    ``exp_bits=None`` picks, for this tensor, the exponent width (1 … b − 1) with the least
    squared error — data-free, like the exponent bias (the paper sweeps it per model)."""
    if exp_bits is None:
        bits = check_bits(bits, 2, 16)
        candidates = [quantize_adaptivfloat(w, bits, e) for e in range(1, bits)]
        return min(candidates, key=lambda q: float((q - w.detach()).pow(2).sum()))
    lo, hi = finite_range(w, "w")
    values = adaptivfloat_values(float(torch.maximum(-lo, hi)), bits, exp_bits).to(w.device)
    a = w.detach().abs()
    i = torch.bucketize(a, values).clamp(1, len(values) - 1) if len(values) > 1 else \
        torch.zeros_like(a, dtype=torch.long)
    below, above = values[i - 1] if len(values) > 1 else values[i], values[i]
    nearest = torch.where(a - below <= above - a, below, above)
    nearest = torch.where(a >= values[-1], values[-1], nearest)
    return torch.sign(w.detach()) * nearest.to(w.dtype)
