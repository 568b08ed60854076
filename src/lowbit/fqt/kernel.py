"""The CPU fast path of FQT's backward: the rounding of PT, PSQ, BHQ's transformed rows
and the per-column copy in one loop compiled with numba, in memory a layer keeps between
steps.

On a CPU, stochastic rounding costs about ten passes over the gradient as torch operations
(subtract, scale, add the dither, floor, clamp, scale, add, for each copy), fresh memory
for each temporary costs about as much as the arithmetic, and a serial generator's random
numbers cost more than all of it. :func:`sr_loop` does the same float32 operations in the
same order in one pass, making each row's random words (SplitMix64,
:func:`lowbit.quant.random_words`) as it goes, so its numbers are bit for bit those of
:func:`~lowbit.fqt.quantize_copies` from the same draw.
"""
from __future__ import annotations

import numpy as np
import torch

from ..quant import DITHER_BITS, DITHER_HALF, dither, random_seed, splitmix64_word
from .quantizers import _SCOPE, _check_finite, _min_span, bhq_plan, grid, reflect

__all__ = ["Workspace", "round_row", "round_columns", "scales_loop", "sr_loop", "compiled",
           "compiled_serial", "SERIAL_BELOW", "quantize_copies_compiled", "can_compile"]


class Workspace:
    """Memory that one layer's FQT backward reuses from step to step, for a gradient shaped
    like ``like``. On a GPU, PyTorch's caching allocator already reuses memory, so layers
    keep none there."""

    def __init__(self, like: torch.Tensor) -> None:
        self.key = (like.shape, like.dtype, like.device)
        self.d, self.q = (torch.empty_like(like) for _ in range(2))
        # the compiled loop's random state, read through a numpy view (no tensor operation)
        self.seed = torch.empty((), dtype=torch.int64, device=like.device)
        self.seed_bits = self.seed.reshape(1).numpy().view(np.uint64) \
            if like.device.type == "cpu" else None
        # the torch operations' dither and its words; the compiled loop needs neither
        self.random: torch.Tensor | None = None
        self.u: torch.Tensor | None = None

    def dither(self, generator: torch.Generator | None) -> torch.Tensor:
        """The stochastic-rounding dither (:func:`lowbit.quant.dither`) in this memory
        (made on first use)."""
        if self.u is None:
            self.random = torch.empty((self.q.numel() + 3) // 4, dtype=torch.int64,
                                      device=self.q.device)
            self.u = torch.empty_like(self.q)
        return dither(self.q, generator, random=self.random, out=self.u)


def scales_loop(lo, hi, tiny, big, scope):
    """Codes per unit and steps of the grids ``lo``, ``hi`` (:func:`sr_loop`), the float32
    operations of :func:`grid`'s clamp and :func:`code_scales`; empty if a range is not
    finite."""
    pc, st = np.empty_like(lo), np.empty_like(lo)
    for r in range(lo.size):
        span = hi[r] if scope == 2 else hi[r] - lo[r]
        if not np.isfinite(span):
            return lo[:0], lo[:0]
        span = max(span, tiny)
        pc[r] = np.float32(1.0) / span * big
        st[r] = span * np.float32(1.0 / np.float64(big) if big > 0 else 0.0)  # 1/B as torch
    return pc, st


def round_row(x, k, out, lo, per_code, step, big):
    """One row ``x`` rounded on one grid, with the dither of the int16 levels ``k``:
    min(floor((x − lo)·per_code + u), B)·step + lo, the float32 operations of
    :func:`sr_codes` and :func:`dequantize` in their order."""
    half, unit = np.float32(DITHER_HALF), np.float32(2.0 ** -DITHER_BITS)
    for j in range(x.size):
        u = half + unit * np.float32(k[j])
        out[j] = min(np.floor((x[j] - lo) * per_code + u), big) * step + lo


def round_columns(x, k, out, lo, per_code, step, big):
    """:func:`round_row` with one grid per column."""
    half, unit = np.float32(DITHER_HALF), np.float32(2.0 ** -DITHER_BITS)
    for j in range(x.size):
        u = half + unit * np.float32(k[j])
        out[j] = min(np.floor((x[j] - lo[j]) * per_code[j] + u), big) * step[j] + lo[j]


def sr_loop(x, seed, big_a, scope_a, lo_a, hi_a, tiny_a, out_a,
            big_b, scope_b, lo_b, hi_b, tiny_b, out_b):
    """Stochastic rounding of the float32 rows ``x`` to one or two grids (b: skipped when
    ``big_b`` is 0), everything after the ranges in one call:

    1. each grid's lowest values ``lo``, codes per unit and steps (as :func:`grid` and
       :func:`code_scales` compute them), one per row (``scope`` 0), per column (1), or
       one for the tensor (2, where ``hi`` already holds the span);
    2. rows in parallel: each row's random words (SplitMix64 from ``seed``, the words of
       :func:`lowbit.quant.random_words` that hold the row's levels), then the rounding
       with the dither of their int16 levels (:func:`round_row`, :func:`round_columns`:
       loops short enough to vectorize).

    Returns False, before drawing anything, if a range is not finite."""
    n, d = x.shape
    pc_a, st_a = _scales(lo_a, hi_a, tiny_a, np.float32(big_a), scope_a)
    pc_b, st_b = _scales(lo_b, hi_b, tiny_b, np.float32(big_b), scope_b)
    if pc_a.size == 0 or pc_b.size == 0:
        return False
    if scope_a == 2:  # one grid for the tensor: the same for every row
        lo_a, pc_a, st_a = np.full(n, lo_a[0]), np.full(n, pc_a[0]), np.full(n, st_a[0])
    if scope_b == 2:
        lo_b, pc_b, st_b = np.full(n, lo_b[0]), np.full(n, pc_b[0]), np.full(n, st_b[0])
    ba, bb = np.float32(big_a), np.float32(big_b)
    for i in prange(n):
        # the words that hold row i's levels (element e = i·d + j is level e mod 4 of
        # word e div 4, as in random_words' flat layout), made here: they stay in cache
        w0, w1 = (i * d) // 4, ((i + 1) * d - 1) // 4 + 1
        words = np.empty(w1 - w0, np.uint64)
        for w in range(w0, w1):
            words[w - w0] = _splitmix64_word(seed, w)
        k = words.view(np.int16)[i * d - 4 * w0:i * d - 4 * w0 + d]
        if scope_a == 1:
            _round_columns(x[i], k, out_a[i], lo_a, pc_a, st_a, ba)
        else:
            _round_row(x[i], k, out_a[i], lo_a[i], pc_a[i], st_a[i], ba)
        if big_b and scope_b == 1:
            _round_columns(x[i], k, out_b[i], lo_b, pc_b, st_b, bb)
        elif big_b:
            _round_row(x[i], k, out_b[i], lo_b[i], pc_b[i], st_b[i], bb)
    return True


try:  # numba compiles the loop; without it, the torch operations do the same work
    import numba
    prange = numba.prange
    _splitmix64_word = numba.njit(inline="always", cache=True)(splitmix64_word)
    _scales = numba.njit(cache=True)(scales_loop)
    _round_row = numba.njit(inline="always", cache=True)(round_row)
    _round_columns = numba.njit(inline="always", cache=True)(round_columns)
    #: The compiled :func:`sr_loop` (None without numba: FQT then uses torch operations);
    #: ``compiled_serial`` is the same loop on one thread, for gradients too small to share.
    compiled = numba.njit(parallel=True, cache=True)(sr_loop)
    compiled_serial = numba.njit(cache=True)(sr_loop)
except ImportError:  # pragma: no cover
    prange, compiled, compiled_serial = range, None, None
    _splitmix64_word, _scales = splitmix64_word, scales_loop
    _round_row, _round_columns = round_row, round_columns

#: Below this many values a gradient is rounded on one thread, where waking the others
#: would cost more than they save.
SERIAL_BELOW = 2 ** 15
#: :func:`sr_loop`'s scope codes.
_SCOPES = {"row": 0, "column": 1, "tensor": 2, "tensor_minmax": 2}


def can_compile(x: torch.Tensor, copies: tuple[tuple[int, str], ...]) -> bool:
    """Whether :func:`quantize_copies_compiled` handles these rows and copies."""
    return (compiled is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and x.is_contiguous() and 1 <= len(copies) <= 2)


def _ranges(x: torch.Tensor, scope: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per row or column, or, per tensor, (lo, span) of :func:`grid` (its ranges
    are checked there: one number each, computed in Python)."""
    if scope == "row":
        return x.amin(1), x.amax(1)
    if scope == "column":
        return x.amin(0), x.amax(0)
    lo, span = grid(x, scope, bits)
    return lo.reshape(1), span.reshape(1)


def _round(x: torch.Tensor, copies: tuple[tuple[int, str], ...], seed: np.uint64,
           work: Workspace, outs: list[torch.Tensor]) -> None:
    """One call of :func:`sr_loop`: ``x`` rounded to one or two grids into ``outs``."""
    args, ranges = [], []
    for bits, how in copies:
        scope = _SCOPE.get(how, how)
        lo, hi = _ranges(x, scope, bits)
        ranges.append((scope, lo, hi))
        args.append((2 ** bits - 1, _SCOPES[scope], lo.numpy(), hi.numpy(),
                     np.float32(_min_span(bits, x.dtype))))
    if len(copies) == 1:
        args.append((0,) + args[0][1:])
    loop = compiled_serial if x.numel() < SERIAL_BELOW else compiled
    ok = loop(x.numpy(), seed, *args[0], outs[0].numpy(), *args[1], outs[-1].numpy())
    if not ok:  # a NaN, an inf or an overflowing range: grid() names it
        for scope, lo, hi in ranges:
            if scope in ("row", "column"):
                _check_finite(x, lo, hi, "gradient")
        raise AssertionError("sr_loop found a range that is not finite")  # pragma: no cover


def quantize_copies_compiled(x: torch.Tensor, copies: tuple[tuple[int, str], ...],
                             generator: torch.Generator | None, work: Workspace
                             ) -> list[torch.Tensor]:
    """What :func:`~lowbit.fqt.quantize_copies` computes for one or two copies, the same
    numbers from the same draw, in the workspace's memory (valid until its next use): one
    call of :func:`sr_loop` for both copies; with BHQ, one for the transformed rows (the
    reflections stay torch operations) and one for the other copy, from the same state,
    so that both see the same dither, as in :func:`~lowbit.fqt.quantize_copies`."""
    random_seed(generator, out=work.seed)
    seed = work.seed_bits[0]
    outs = [work.q, work.d][:len(copies)]
    if all(how != "bhq" for _, how in copies):
        _round(x, copies, seed, work, outs)
        return outs
    results = []
    for (bits, how), out in zip(copies, outs):
        if how != "bhq":
            _round(x, ((bits, how),), seed, work, [out])
            results.append(out)
            continue
        plan = bhq_plan(x)
        scale = plan.scale.unsqueeze(1)
        _round(reflect(x * scale, plan), ((bits, "row"),), seed, work, [out])
        results.append(reflect(out, plan).div_(scale))
    return results
