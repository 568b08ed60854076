"""Uniform quantizers: the common ground of the three methods (the book's Foundations,
``book/basics/grid.ipynb``).

Symmetric b-bit weight quantizer (per tensor or per output channel)::

    Δ = max|w| / (2^(b-1) - 1)
    Q(w) = Δ · round(clip(w / Δ, -(2^(b-1) - 1), 2^(b-1) - 1))

It has 2^b - 1 levels and represents zero exactly. Also here: the unsigned
activation quantizer after ReLU, the asymmetric range quantizer, nearest and
stochastic rounding, a straight-through estimator for quantization-aware
training (QAT), data-free layer-wise post-training quantization (PTQ) of a copy
of a model, and a model's size in bits.

Every function returns the *dequantized* tensor (values on the grid, in the
tensor's own units), which is what training and accuracy measurements need.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
from typing import Callable, Iterable, Literal

import numpy as np
import torch
from torch import nn

from .checks import (check_bits, check_extra_state, check_finite, check_rounding, check_step,
                     check_tensor, check_values, finite_range)

Rounding = Literal["nearest", "stochastic"]

__all__ = [
    "signed_levels", "symmetric_scale", "symmetric_grid",
    "DITHER_BITS", "DITHER_HALF", "SPLITMIX64", "splitmix64_word", "random_seed", "random_words", "dither_levels", "dither", "round_stochastic",
    "quantize_symmetric", "binarize", "quantize_even",
    "quantize_activations", "quantize_unsigned", "quantize_asymmetric",
    "FakeQuantSTE", "fake_quantize_ste", "QuantConv2d", "QuantLinear", "ActQuant",
    "prepare_qat", "quantize_model", "quantizable_layers", "layer_bits", "model_size_bits", "average_weight_bits", "quantization_mse",
    "replace_layers", "clone_layer",
]


# ----------------------------------------------------------------------------- grids
def signed_levels(bits: int) -> int:
    """Largest integer code of the symmetric b-bit grid: 2^(b-1) - 1."""
    return 2 ** (check_bits(bits) - 1) - 1


def symmetric_scale(w: torch.Tensor, bits: int, per_channel: bool = False,
                    axis: int = 0) -> torch.Tensor:
    """Step Δ = max|w| / (2^(b-1) - 1), one per tensor or one per slice along ``axis``.

    The result broadcasts against ``w``. An all-zero tensor (or channel) gets Δ = 1,
    so that it quantizes to zero instead of dividing by zero.
    """
    qmax = signed_levels(bits)
    lo, hi = finite_range(w, "w", axis if per_channel else None)
    wmax = torch.maximum(-lo, hi)
    return torch.where(wmax > 0, wmax / qmax, torch.ones_like(wmax))


#: The most bits for which :func:`symmetric_grid` lists every value (2^16 − 1 of them).
MAX_LISTED_BITS = 16


def symmetric_grid(delta: float | torch.Tensor, bits: int) -> torch.Tensor:
    """All 2^b - 1 values of the symmetric grid with step ``delta`` (a 1-D tensor; at most
    ``MAX_LISTED_BITS`` bits, a list of 65,535 values)."""
    qmax = 2 ** (check_bits(bits, 2, MAX_LISTED_BITS, "bits of a listed grid") - 1) - 1
    return torch.arange(-qmax, qmax + 1, dtype=torch.float32) * torch.as_tensor(delta).float()


# ----------------------------------------------------------------------------- rounding
#: Resolution of the dither u in stochastic rounding — 2^16 levels, four to a 64-bit word.
DITHER_BITS = 16
#: u = DITHER_HALF + k·2^-16 for the int16 level k (:func:`dither_levels`): (k + 2^15 + ½)/2^16.
DITHER_HALF = 0.5 + 2.0 ** -(DITHER_BITS + 1)
#: The constants of SplitMix64, the generator of Java's SplittableRandom (Steele, Lea and
#: Flood, OOPSLA 2014), in order the state's increment (the golden ratio in 64 bits) and
#: the two multipliers of its mixer.
SPLITMIX64 = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return c - 2 ** 64 if c >= 2 ** 63 else c


def _splitmix64_torch(words: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Fill the int64 tensor ``words`` with :func:`splitmix64_word` 0, 1, … of the state
    ``seed`` (a 0-d int64 tensor), as torch operations.
    int64 arithmetic wraps as uint64 does; the right shifts are made logical by a mask."""
    gamma, m1, m2 = (_signed(c) for c in SPLITMIX64)
    z = torch.arange(1, words.numel() + 1, dtype=torch.int64, device=words.device)
    z = z.mul_(gamma).add_(seed)
    for shift, mult in ((30, m1), (27, m2), (31, None)):
        z.bitwise_xor_(z.bitwise_right_shift(shift).bitwise_and_(2 ** (64 - shift) - 1))
        if mult is not None:
            z.mul_(mult)
    return words.copy_(z.view(words.shape))


def splitmix64_word(seed, i):
    """Word i of SplitMix64 from the state ``seed`` (uint64s): mix(seed + (i+1)·γ). Compiled
    with numba, for the loops that fill words in parallel (here and in FQT's kernel)."""
    z = seed + np.uint64(i + 1) * np.uint64(SPLITMIX64[0])
    z = (z ^ (z >> np.uint64(30))) * np.uint64(SPLITMIX64[1])
    z = (z ^ (z >> np.uint64(27))) * np.uint64(SPLITMIX64[2])
    return z ^ (z >> np.uint64(31))


def _splitmix64_loop(words, seed):
    for c in prange((words.size + 4095) // 4096):  # chunks of 4096 words in parallel
        for i in range(c * 4096, min(words.size, c * 4096 + 4096)):
            words[i] = _splitmix64_word(seed, i)


prange, _splitmix64_word = range, splitmix64_word  # numba's, once _fill_loop has run


@functools.cache
def _fill_loop():
    """:func:`random_words`' compiled loop (None without numba), made on first use:
    importing numba takes a few tenths of a second, which a program that never rounds
    stochastically on a CPU need not pay when it imports this module."""
    global prange, _splitmix64_word
    try:
        import numba
    except ImportError:  # pragma: no cover
        return None
    prange = numba.prange
    _splitmix64_word = numba.njit(inline="always", cache=True)(splitmix64_word)
    return numba.njit(parallel=True, cache=True)(_splitmix64_loop)


def random_words(n: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``n`` uniformly random 64-bit words (int64): SplitMix64's first n outputs from a
    state drawn from ``generator`` (one 64-bit draw per call). A counter-based generator:
    word i depends on the state and i alone, so the words are filled in parallel, and the
    same on any number of threads. On a CPU the loop is compiled (numba) and costs about
    a tenth of ``torch.Tensor.random_``'s serial Mersenne Twister; the torch operations
    (on a GPU, or without numba) give the same words. ``out``: an int64 tensor of at least
    n entries to fill (no new memory)."""
    if out is None:
        out = torch.empty(n, dtype=torch.int64, device=device)
    elif out.dtype != torch.int64 or out.numel() < n:
        raise ValueError(f"random must be an int64 tensor of at least {n} entries, got "
                         f"{out.dtype} with {out.numel()}")
    words = out.reshape(-1)[:n]
    seed = random_seed(generator, words.device)
    loop = _fill_loop() if words.device.type == "cpu" and words.is_contiguous() else None
    if loop is not None:
        loop(words.numpy().view(np.uint64), np.uint64(int(seed) % 2 ** 64))
        return words
    return _splitmix64_torch(words, seed)


def random_seed(generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One uniformly random 64-bit state for :func:`random_words` (a 0-d int64 tensor; in
    ``out``, one made beforehand, when given)."""
    seed = torch.empty((), dtype=torch.int64, device=device) if out is None else out
    return seed.random_(-2 ** 63, None, generator=generator)  # all 64 bits uniform


def dither_levels(like: torch.Tensor, generator: torch.Generator | None = None,
                  random: torch.Tensor | None = None) -> torch.Tensor:
    """The random part of :func:`dither`: int16 levels k − 2^15, uniform on −2^15 … 2^15 − 1,
    shaped like ``like``, cut four to a 64-bit word of :func:`random_words` (in ``random``,
    an int64 tensor of at least numel/4 entries, when given: no new memory)."""
    if not isinstance(like, torch.Tensor) or not like.is_floating_point():
        raise ValueError("the dither is shaped like a floating-point tensor, got "
                         + (f"dtype {like.dtype}" if isinstance(like, torch.Tensor)
                            else type(like).__name__))
    n = like.numel()
    words = random_words((n + 3) // 4, generator, like.device, random)
    return words.view(torch.int16)[:n].view(like.shape)


def dither(like: torch.Tensor, generator: torch.Generator | None = None, *,
           random: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The uniform dither u of stochastic rounding, shaped like ``like``: u = (k + ½)/2^16
    with k uniform on 0 … 2^16 − 1, cut four to a 64-bit random word (:func:`random_words`).

    floor(t + u) rounds t up with probability within 2^-17 of its fractional part (the
    midpoints keep the error symmetric; for t ≥ 128, where float32 rounds t + u to steps
    of 2^-16, within 2^-16): unbiased to float32 precision. On a CPU the random numbers
    are the largest cost of stochastic rounding; four levels to a word of a counter-based
    generator filled in parallel cost a small fraction of ``torch.rand`` (one 32-bit draw
    of a serial generator and a float conversion per value). ``random`` (see
    :func:`dither_levels`) and ``out`` let a caller reuse memory."""
    k = dither_levels(like, generator, random)
    half = torch.full((), DITHER_HALF, dtype=like.dtype, device=like.device)
    return torch.add(half, k, alpha=2.0 ** -DITHER_BITS, out=out)


def round_stochastic(y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic rounding ``floor(y + u)``, u uniform on [0, 1) (:func:`dither`):
    unbiased, E[SR(y)] = y."""
    return torch.floor(y + dither(y, generator))


def _check_codes_fit(w: object, qmax: int, bits: int) -> None:
    """Raise a ValueError when ``w``'s dtype cannot hold the grid's largest code ``qmax``
    (float16 holds codes up to 65,504: at most 16 bits)."""
    if isinstance(w, torch.Tensor) and w.is_floating_point() and qmax > torch.finfo(w.dtype).max:
        most = int(math.log2(torch.finfo(w.dtype).max + 1)) + 1
        raise ValueError(f"{bits}-bit codes reach {qmax:,}, more than {w.dtype} holds "
                         f"({torch.finfo(w.dtype).max:,.0f}); quantize w.float(), or use at "
                         f"most {most} bits")


def _round(y: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    return torch.round(y) if rounding == "nearest" else round_stochastic(y, generator)


# ----------------------------------------------------------------------------- quantizers
def quantize_symmetric(w: torch.Tensor, bits: int, per_channel: bool = False, axis: int = 0,
                       rounding: Rounding = "nearest", generator: torch.Generator | None = None,
                       delta: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric b-bit quantizer Q(w) (the PSGD reference page, ``book/psgd/reference``),
    dequantized.

    ``delta`` overrides the step (it must broadcast against ``w``); by default it is
    :func:`symmetric_scale`. The steps after the division work in place on one
    buffer, so the quantizer costs little more than a copy of ``w``.
    """
    check_rounding(rounding)
    qmax = signed_levels(bits)
    _check_codes_fit(w, qmax, bits)
    if delta is None:
        delta = symmetric_scale(w, bits, per_channel, axis)
    else:
        check_tensor(w, "w")
        delta = check_step(delta, w, "delta")
    y = torch.div(w.detach(), delta)
    if rounding == "nearest":
        y.round_()
    else:
        y.add_(dither(y, generator)).floor_()
    return y.clamp_(-qmax, qmax).mul_(delta)


def quantize_unsigned(x: torch.Tensor, bits: int, x_max: float | torch.Tensor,
                      rounding: Rounding = "nearest",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Unsigned activation quantizer after ReLU: Δa = x_max / (2^b - 1), range [0, x_max]."""
    check_tensor(x, "x")
    check_rounding(rounding)
    levels = 2 ** check_bits(bits, 1, 32) - 1
    x_max = torch.as_tensor(x_max, dtype=x.dtype, device=x.device)
    if not torch.isfinite(x_max).all() or (x_max <= 0).any():
        raise ValueError(f"x_max must be finite and positive, got {x_max.tolist()}")
    if rounding == "nearest":
        return _unsigned_nearest(x, levels, x_max)
    delta = x_max / levels
    return torch.clamp(_round(x / delta, rounding, generator), 0, levels) * delta


def _unsigned_nearest(x: torch.Tensor, levels: int, x_max: torch.Tensor) -> torch.Tensor:
    """The unsigned quantizer without checks, in place on one buffer (inputs checked by the
    caller): the activation path of every QAT step runs through here."""
    delta = x_max / levels
    return torch.div(x.detach(), delta).round_().clamp_(0, levels).mul_(delta)


def quantize_asymmetric(x: torch.Tensor, bits: int, dim: int | None = None,
                        rounding: Rounding = "nearest",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Asymmetric range quantizer: map [lo, hi] to the codes 0..B, B = 2^b - 1.

    ``dim=None`` takes one range for the whole tensor; ``dim=d`` one range per
    index along dimension ``d`` (per sample for ``d=0``). The range is widened to
    include 0 and the zero point is an integer, so zero is exactly representable.
    """
    check_rounding(rounding)
    big_b = 2 ** check_bits(bits, 1, 32) - 1
    lo, hi = finite_range(x, "x", dim)
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    delta = (hi - lo) / big_b
    delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    zero_point = torch.round(-lo / delta)
    codes = torch.clamp(_round(x / delta + zero_point, rounding, generator), 0, big_b)
    return (codes - zero_point) * delta


# ----------------------------------------------------------------------------- STE / QAT
def binarize(w: torch.Tensor, per_channel: bool = False, axis: int = 0) -> torch.Tensor:
    """1-bit weights: Δ · sign(w) with Δ = mean|w| per tensor or per slice along ``axis``
    (XNOR-Net's scale; sign(0) := +1). The symmetric grid has no 1-bit form (2^1 − 1 = 1
    level), so 1-bit QAT baselines use this."""
    check_finite(w, "w")
    delta = _mean_abs(w.detach().abs(), per_channel, axis)
    if not bool(torch.isfinite(delta).all()):  # a sum of large values overflowed: in float64
        delta = _mean_abs(w.detach().abs().double(), per_channel, axis).to(w.dtype)
    return torch.where(w.detach() >= 0, delta, -delta)


def _mean_abs(a: torch.Tensor, per_channel: bool, axis: int) -> torch.Tensor:
    """mean|w| of ``a`` = |w|, per tensor or per slice along ``axis`` (shaped to broadcast)."""
    if not per_channel:
        return a.mean()
    return a.movedim(axis, 0).reshape(a.shape[axis], -1).mean(1).reshape(
        [-1 if d == axis % a.dim() else 1 for d in range(a.dim())])


def quantize_even(w: torch.Tensor, bits: int, per_channel: bool = False,
                  axis: int = 0) -> torch.Tensor:
    """The 2^b evenly spaced levels of SLB's value set, α·{-1, …, +1} with α = max|w|
    (no zero level; 1 bit: ±max|w|). Nearest rounding, dequantized."""
    m = 2 ** check_bits(bits, 1, 16) - 1  # number of gaps between the 2^b levels
    lo, hi = finite_range(w, "w", axis if per_channel else None)
    alpha = torch.maximum(-lo, hi)  # 0 for an all-zero tensor (or channel): every level is 0
    safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    k = torch.round((w.detach() / safe + 1) * (m / 2)).clamp_(0, m)
    return (k * (2 / m) - 1) * alpha


GRIDS = ("symmetric", "even")


class FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with a straight-through backward, dQ/dw := 1. ``grid="symmetric"``:
    :func:`quantize_symmetric` (1 bit: :func:`binarize`); ``grid="even"``:
    :func:`quantize_even`, the value set of SLB."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int, per_channel: bool,
                grid: str = "symmetric") -> torch.Tensor:
        if grid == "even":
            return quantize_even(w, bits, per_channel)
        if bits == 1:
            return binarize(w, per_channel)
        return quantize_symmetric(w, bits, per_channel)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, None, None, None


def fake_quantize_ste(w: torch.Tensor, bits: int, per_channel: bool = False,
                      grid: str = "symmetric") -> torch.Tensor:
    """Q(w) in the forward pass, identity in the backward pass (STE)."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    bits = check_bits(bits, 1, 16 if grid == "even" else 32)
    return FakeQuantSTE.apply(w, bits, bool(per_channel), grid)


class _UnsignedSTE(torch.autograd.Function):
    """Unsigned quantizer with STE; the gradient is zero where the input was clipped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int, x_max: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward((x >= 0) & (x <= x_max))
        return _unsigned_nearest(x, 2 ** bits - 1, x_max)  # ActQuant checked x and x_max

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None


def _check_momentum(momentum: object) -> float:
    """ActQuant's momentum, a number in (0, 1] (1: the range is the last batch's maximum)."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0 < momentum <= 1:
        raise ValueError(f"momentum must be a number in (0, 1], got {momentum!r}")
    return float(momentum)


class ActQuant(nn.Module):
    """Unsigned b-bit activation quantizer placed after a ReLU.

    ``x_max`` is a buffer: set from the preceding BatchNorm (data-free), tracked as a
    running maximum of the batches seen in training mode (``momentum``), or, while
    ``calibrating`` is true, the largest value seen (inputs then pass unquantized, so
    later layers calibrate on full-precision activations).
    """

    def __init__(self, bits: int, x_max: float | None = None, momentum: float = 0.1) -> None:
        super().__init__()
        self.bits = check_bits(bits, 1, 32)
        self.momentum = _check_momentum(momentum)
        self.calibrating = False
        if isinstance(x_max, torch.Tensor) and x_max.numel() == 1:
            x_max = float(x_max)
        if x_max is not None and (isinstance(x_max, bool) or not isinstance(x_max, numbers.Real)
                                  or not math.isfinite(x_max) or x_max < 0):
            raise ValueError(f"x_max must be a finite number ≥ 0 (the largest activation), "
                             f"or None to learn it, got {x_max!r}")
        self.register_buffer("x_max", torch.tensor(float("nan") if x_max is None else float(x_max)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_values(x, "ActQuant's input")
        if x.numel() == 0:
            raise ValueError(f"ActQuant got an empty tensor (shape {tuple(x.shape)})")
        lo, batch_max = torch.aminmax(x.detach())
        if not bool(torch.isfinite(lo) & torch.isfinite(batch_max)):  # NaN and ±inf reach them
            raise ValueError(f"ActQuant got {int((~torch.isfinite(x)).sum())} non-finite "
                             "activation(s) (NaN or ±inf); quantization needs finite values")
        if self.calibrating:
            self.x_max.copy_(torch.fmax(self.x_max, batch_max))
            return x
        if self.training:
            if torch.isnan(self.x_max):
                self.x_max.copy_(batch_max)
            else:
                self.x_max.lerp_(batch_max, self.momentum)
        if torch.isnan(self.x_max):
            raise RuntimeError("ActQuant has no range yet: run a batch in training mode, "
                               "calibrate it, or set x_max (quantize_model does this)")
        if self.x_max <= 0:
            return torch.zeros_like(x)
        if not (torch.is_grad_enabled() and x.requires_grad):  # no gradient, no STE mask
            return _unsigned_nearest(x, 2 ** self.bits - 1, self.x_max)
        return _UnsignedSTE.apply(x, self.bits, self.x_max)

    def get_extra_state(self) -> dict:  # settings that change the output: in the state dict
        return {"bits": self.bits, "momentum": self.momentum, "calibrating": self.calibrating}

    def set_extra_state(self, extra: dict) -> None:
        check_extra_state(self, extra, ("bits", "momentum", "calibrating"))
        self.bits = check_bits(extra["bits"], 1, 32)
        self.momentum, self.calibrating = _check_momentum(extra["momentum"]), bool(extra["calibrating"])

    def extra_repr(self) -> str:
        return f"bits={self.bits}, x_max={self.x_max.item():.4g}"


class _FakeQuantWeight:
    """Mixin for layers whose weight is fake-quantized with the STE in every forward pass."""

    def _set_quant(self, weight_bits: int, per_channel: bool, grid: str = "symmetric") -> None:
        self.weight_bits = check_bits(weight_bits, 1, name="weight_bits")
        self.per_channel = per_channel
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
        self.grid = grid

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize_ste(self.weight, self.weight_bits, self.per_channel, self.grid)

    def get_extra_state(self) -> dict:  # settings that change the output: in the state dict
        return {"weight_bits": self.weight_bits, "per_channel": self.per_channel,
                "grid": self.grid}

    def set_extra_state(self, extra: dict) -> None:
        check_extra_state(self, extra, ("weight_bits", "per_channel", "grid"))
        self._set_quant(extra["weight_bits"], bool(extra["per_channel"]), extra["grid"])


class QuantConv2d(_FakeQuantWeight, nn.Conv2d):
    """Conv2d whose weight is fake-quantized with the STE in every forward pass (QAT)."""

    def __init__(self, *args, weight_bits: int = 4, per_channel: bool = False,
                 grid: str = "symmetric", **kw) -> None:
        super().__init__(*args, **kw)
        self._set_quant(weight_bits, per_channel, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_FakeQuantWeight, nn.Linear):
    """Linear layer whose weight is fake-quantized with the STE in every forward pass (QAT)."""

    def __init__(self, *args, weight_bits: int = 4, per_channel: bool = False,
                 grid: str = "symmetric", **kw) -> None:
        super().__init__(*args, **kw)
        self._set_quant(weight_bits, per_channel, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.bias)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers of ``model`` in forward order: the layers we quantize."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def replace_layers(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None],
                   layers: Iterable[tuple[str, nn.Module]] | None = None,
                   copy_model: bool = True, load_state: bool = True) -> nn.Module:
    """Swap layers of ``model`` (a deep copy unless ``copy_model=False``): for each
    ``(name, layer)`` of ``layers`` (default: :func:`quantizable_layers`), ``make(name,
    layer)`` returns the new module (or None to keep the layer). With ``load_state`` the
    new module is given the old one's state dict; either way it moves to the old one's
    device. The one way the package swaps layers (QAT, SLB, FQT)."""
    names = [n for n, _ in (quantizable_layers(model) if layers is None else layers)]
    model = copy.deepcopy(model) if copy_model else model
    for name in names:
        m = model.get_submodule(name)  # the copy's layer, never the original's
        new = make(name, m)
        if new is None:
            continue
        if load_state:  # the old layer's tensors; the new one's own settings stay
            missing, unexpected = new.load_state_dict(m.state_dict(), strict=False)
            if unexpected or [k for k in missing if not k.endswith("_extra_state")]:
                raise ValueError(f"{type(new).__name__} cannot take the state of {name!r} "
                                 f"({type(m).__name__}): missing {missing}, "
                                 f"unexpected {unexpected}")
        ref = next(iter(m.parameters()), None)
        if ref is not None:
            new = new.to(ref.device)
        set_module(model, name, new)
    return model


def clone_layer(m: nn.Module, conv: Callable[..., nn.Module] = nn.Conv2d,
                linear: Callable[..., nn.Module] = nn.Linear, **kw) -> nn.Module:
    """A new layer shaped as ``m``: ``conv(...)`` with a conv layer's channels, kernel,
    stride, padding, dilation, groups and bias (and its padding mode where it is not
    zeros), or ``linear(...)`` with a linear layer's features and bias, ``kw`` passed on.
    ``m`` is an ``nn.Conv2d``/``nn.Linear`` or a layer that keeps the same attributes (SLB's);
    the new layer has its own new parameters (the caller, or :func:`replace_layers`, copies
    what it keeps). The one way the package rebuilds a layer in another form."""
    if hasattr(m, "in_channels"):
        if getattr(m, "padding_mode", "zeros") != "zeros":
            kw = {"padding_mode": m.padding_mode, **kw}
        return conv(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                    m.dilation, m.groups, m.bias is not None, **kw)
    if hasattr(m, "in_features"):
        return linear(m.in_features, m.out_features, m.bias is not None, **kw)
    raise TypeError(f"clone_layer takes a conv or a linear layer, got {type(m).__name__}")


def layer_bits(index: int, count: int, bits: int, first_last_bits: int | None) -> int:
    """Bits of layer ``index`` of ``count``: ``first_last_bits`` for the first and last
    layer when given, ``bits`` otherwise."""
    if first_last_bits is not None and index in (0, count - 1):
        return first_last_bits
    return bits


def _replace_relus(model: nn.Module, act_bits: int, from_bn: bool, n_sigma: float) -> None:
    """Put an ActQuant after each ReLU; with ``from_bn`` set x_max = max_c(β_c + n·|γ_c|)
    of the BatchNorm that precedes it in registration order."""
    last_bn = None
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            last_bn = m
        elif isinstance(m, nn.ReLU):
            x_max = None
            if from_bn:
                if last_bn is None:
                    raise ValueError(f"ReLU {name!r} has no BatchNorm before it; use "
                                     "act_range='calibrate' with calibration data")
                x_max = (last_bn.bias + n_sigma * last_bn.weight.abs()).max().clamp(min=0).item()
            set_module(model, name, nn.Sequential(nn.ReLU(), ActQuant(act_bits, x_max)))


# ----------------------------------------------------------------------------- model level
def prepare_qat(model: nn.Module, weight_bits: int, act_bits: int | None = None,
                per_channel: bool = False, first_last_bits: int | None = None,
                grid: str = "symmetric") -> nn.Module:
    """A copy of ``model`` for STE quantization-aware training.

    Conv/linear layers become :class:`QuantConv2d`/:class:`QuantLinear` (weights at
    ``weight_bits`` on ``grid``; ``first_last_bits`` for the first and last layer if given) and,
    with ``act_bits``, every ReLU is followed by an :class:`ActQuant` with a running max.
    """
    check_bits(weight_bits, 1, name="weight_bits")
    index = {name: i for i, (name, _) in enumerate(quantizable_layers(model))}
    count = len(index)

    def qat_layer(name: str, m: nn.Module) -> nn.Module:
        b = layer_bits(index[name], count, weight_bits, first_last_bits)
        return clone_layer(m, QuantConv2d, QuantLinear, weight_bits=b,
                           per_channel=per_channel, grid=grid)

    model = replace_layers(model, qat_layer)
    if act_bits is not None:
        quantize_activations(model, act_bits)
    return model


def quantize_activations(model: nn.Module, act_bits: int) -> nn.Module:
    """Put an :class:`ActQuant` with a running-max range after every ReLU of ``model``
    (in place) and return it."""
    _replace_relus(model, check_bits(act_bits, 1, 32, "act_bits"), from_bn=False, n_sigma=6)
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, per_channel: bool = False,
                   act_bits: int | None = None, act_range: str = "bn", n_sigma: float = 6.0,
                   calib_data: Iterable | None = None,
                   first_last_bits: int | None = None,
                   last_bias_bits: int | None = None,
                   weight_quantizer: Callable[[torch.Tensor, int], torch.Tensor] | None = None
                   ) -> nn.Module:
    """Data-free layer-wise post-training quantization of a copy of ``model``.

    Every conv/linear weight is replaced by Q(w) at ``bits`` (per tensor, or per
    output channel; at 1 bit, :func:`binarize`'s ±mean|w|); biases and BatchNorm stay in full precision. With
    ``act_bits``, activations after each ReLU are quantized too, their range taken
    from the preceding BatchNorm (``act_range='bn'``, no data needed) or from a
    few ``calib_data`` batches (``act_range='calibrate'``). With ``last_bias_bits`` the
    last layer's bias is quantized too, on a symmetric grid of its own (as the official
    PSGD code does). ``weight_quantizer(w, bits)`` replaces the symmetric grid for every
    layer (ACIQ's clipping, a float format: :mod:`lowbit.baselines`). The original model is
    never modified.
    """
    bits = check_bits(bits, 1)
    if last_bias_bits is not None:
        last_bias_bits = check_bits(last_bias_bits, name="last_bias_bits")
    if act_range not in ("bn", "calibrate"):
        raise ValueError(f"act_range must be 'bn' or 'calibrate', got {act_range!r}")
    q = copy.deepcopy(model).eval()
    layers = quantizable_layers(q)
    for i, (name, m) in enumerate(layers):
        b = layer_bits(i, len(layers), bits, first_last_bits)
        if weight_quantizer is not None:
            qw = weight_quantizer(m.weight, b)
            if not (isinstance(qw, torch.Tensor) and qw.shape == m.weight.shape):
                raise ValueError(f"weight_quantizer must return a tensor of the weight's shape "
                                 f"{tuple(m.weight.shape)} (layer {name!r}), got "
                                 f"{getattr(qw, 'shape', type(qw).__name__)}")
            m.weight.copy_(qw)
        else:
            m.weight.copy_(binarize(m.weight, per_channel) if b == 1
                           else quantize_symmetric(m.weight, b, per_channel))
        m.weight_bits = b
    if last_bias_bits is not None and layers and layers[-1][1].bias is not None:
        last = layers[-1][1]
        last.bias.copy_(quantize_symmetric(last.bias, last_bias_bits))
    if act_bits is not None:
        _replace_relus(q, check_bits(act_bits, 1, 32, "act_bits"),
                       from_bn=act_range == "bn", n_sigma=n_sigma)
        if act_range == "calibrate":
            if calib_data is None:
                raise ValueError("act_range='calibrate' needs calib_data (batches of inputs)")
            acts = [m for m in q.modules() if isinstance(m, ActQuant)]
            for a in acts:
                a.calibrating = True
            device = next(q.parameters()).device
            for batch in calib_data:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                q(x.to(device))
            for a in acts:
                a.calibrating = False
    return q.eval()  # the new ActQuants too: a training-mode one moves its range


def model_size_bits(model: nn.Module, default_bits: int = 32, count_zeros: bool = True) -> int:
    """Storage of the model's parameters in bits.

    A conv/linear weight counts ``module.weight_bits`` bits per element (set by
    :func:`quantize_model` or a quantized layer), every other parameter
    ``default_bits``. With ``count_zeros=False`` zero weights are free (an ideal
    sparse format, for pruning).
    """
    check_bits(default_bits, 1, 64, "default_bits")
    total = 0
    seen: set[int] = set()
    for _, m in quantizable_layers(model):
        w = m.weight
        seen.add(id(w))
        n = w.numel() if count_zeros else int((w != 0).sum())
        total += n * int(getattr(m, "weight_bits", default_bits))
    for p in model.parameters():
        if id(p) not in seen:
            total += p.numel() * default_bits
    return total


def average_weight_bits(model: nn.Module, default_bits: int = 32) -> float:
    """A model's bit-width as the book states it: the average bits per conv/linear weight
    (each layer's ``weight_bits``, ``default_bits`` where it has none). A CNN with its
    first and last layers at 8 bits and the rest at 2 is not a 2-bit model: its average
    says how many bits its weights take."""
    check_bits(default_bits, 1, 32, "default_bits")
    layers = quantizable_layers(model)
    n = sum(m.weight.numel() for _, m in layers)
    if n == 0:
        raise ValueError("the model has no conv or linear weights to count")
    return sum(m.weight.numel() * int(getattr(m, "weight_bits", default_bits))
               for _, m in layers) / n


def quantization_mse(w: torch.Tensor, bits: int, per_channel: bool = False) -> float:
    """Mean squared error between ``w`` and Q(w)."""
    return float(((w - quantize_symmetric(w, bits, per_channel)) ** 2).mean())

