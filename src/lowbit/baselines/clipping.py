"""ACIQ: analytical clipping for post-training quantization (Banner, Nahshan & Soudry,
NeurIPS 2019), the calibrated-clipping baseline the PSGD rebuttal discusses.

A uniform quantizer over [−α, α] trades clipping error against rounding error. For
weights with a Laplace(μ, b) distribution the expected squared error is (Sec. 3)::

    E[(w − Q(w))²] ≈ 2·b²·exp(−α/b) + Δ(α)²/12

with Δ(α) the grid's step. The paper's grid has 2^M bins over [−α, α] (Δ = 2α/2^M), and
the α that minimizes this is 2.83·b, 3.89·b and 5.03·b at 2, 3 and 4 bits.
:func:`laplace_clip` solves the same equation for either grid. Here the grid is the book's
symmetric one, which holds zero (Δ = α/(2^(b−1) − 1)). ACIQ needs no data for the
weights: b is each output channel's mean |w − mean(w)|.

After clipping and rounding, **bias correction** (Sec. 5) shifts each channel by its
mean error and rescales it by the ratio of deviation norms, as the paper writes it:
Q̃(w_c) = ξ_c·(Q(w_c) + μ_c), with μ_c = mean(w_c) − mean(Q(w_c)) and
ξ_c = ‖w_c − mean(w_c)‖ / ‖Q(w_c) − mean(Q(w_c))‖. The deviations' norm is then w_c's
exactly; the mean is ξ_c·mean(w_c), w_c's up to the factor ξ_c (close to 1).
"""
from __future__ import annotations

import math

import torch

from ..checks import check_bits, finite_range
from ..quant import signed_levels

__all__ = ["laplace_clip", "GRIDS", "aciq_quantize", "bias_correct"]

#: ``"symmetric"``: the book's grid, 2^b − 1 levels, zero included (step α/(2^(b−1) − 1));
#: ``"paper"``: 2^b bins over [−α, α] (step 2α/2^b), the grid of the paper's analysis.
GRIDS = ("symmetric", "paper")


def _step_per_alpha(bits: int, grid: str) -> float:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    return 1.0 / signed_levels(bits) if grid == "symmetric" else 2.0 / 2 ** bits


def laplace_clip(bits: int, grid: str = "symmetric") -> float:
    """α*/b: the clip, in units of the Laplace scale b, that minimizes
    2b²·exp(−α/b) + Δ(α)²/12 (the paper's Eq. for the Laplace prior), found by bisection on
    its derivative −2b·exp(−α/b) + c²α/6, with Δ = c·α."""
    bits = check_bits(bits, 2, 16)
    c = _step_per_alpha(bits, grid)
    lo, hi = 0.0, 100.0  # in units of b: the derivative is < 0 at 0 and > 0 at 100
    for _ in range(200):
        mid = (lo + hi) / 2
        if -2 * math.exp(-mid) + c * c * mid / 6 < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def bias_correct(w: torch.Tensor, q: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Banner et al.'s bias correction of quantized weights ``q`` of ``w``, per slice along
    ``axis``: ξ_c·(q_c + μ_c) (Sec. 5; the module docstring). A slice whose ``q`` is
    constant keeps ξ = 1."""
    w2 = w.detach().movedim(axis, 0).reshape(w.shape[axis], -1)
    q2 = q.detach().movedim(axis, 0).reshape(q.shape[axis], -1)
    mu = w2.mean(1, keepdim=True) - q2.mean(1, keepdim=True)
    dq = (q2 - q2.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
    dw = (w2 - w2.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
    xi = torch.where(dq > 0, dw / dq.clamp_min(1e-30), torch.ones_like(dq))
    out = xi * (q2 + mu)
    return out.reshape(w.movedim(axis, 0).shape).movedim(0, axis)


def aciq_quantize(w: torch.Tensor, bits: int, per_channel: bool = True,
                  correct_bias: bool = True, axis: int = 0) -> torch.Tensor:
    """ACIQ for weights, data-free: per output channel (or per tensor) fit b = mean|w − w̄|,
    clip at α = :func:`laplace_clip`·b (never beyond max|w|), round to the symmetric grid
    over [−α, α], then (``correct_bias``) :func:`bias_correct`. Dequantized."""
    bits = check_bits(bits, 2, 16)
    lo, hi = finite_range(w, "w", axis if per_channel else None)
    w_ = w.detach()
    if per_channel:
        dims = [d for d in range(w.dim()) if d != axis % w.dim()]
        mean = w_.mean(dim=dims, keepdim=True) if dims else w_
        b = (w_ - mean).abs().mean(dim=dims, keepdim=True) if dims else torch.zeros_like(w_)
    else:
        b = (w_ - w_.mean()).abs().mean()
    alpha = torch.minimum(laplace_clip(bits) * b, torch.maximum(-lo, hi))
    qmax = signed_levels(bits)
    delta = torch.where(alpha > 0, alpha / qmax, torch.ones_like(alpha))
    q = (w_ / delta).round().clamp(-qmax, qmax) * delta
    if not correct_bias:
        return q
    return bias_correct(w_, q, axis) if per_channel else bias_correct(
        w_.reshape(1, -1), q.reshape(1, -1)).reshape(w.shape)
