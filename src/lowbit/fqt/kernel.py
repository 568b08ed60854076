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

import types

import numpy as np
import torch

from ..quant import DITHER_BITS, DITHER_HALF, dither, random_seed, splitmix64_word
from .quantizers import SCOPE, check_finite_range, min_span, bhq_plan, grid, reflect

__all__ = ["Workspace", "round_row", "round_columns", "order_key", "row_ranges",
           "column_ranges", "column_block", "scales_loop", "sr_loop", "compiled",
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
        self._arrays: dict = {}  # numpy views of d and q, and the compiled loop's ranges
        #: the compiled loop and its arguments by copies and outputs, for grids per row or
        #: column (made on the first call: right after a backward pass, making them again
        #: costs more than the loop's arithmetic on small gradients)
        self.calls: dict = {}
        # the torch operations' dither and its words; the compiled loop needs neither
        self.random: torch.Tensor | None = None
        self.u: torch.Tensor | None = None

    def array(self, t: torch.Tensor) -> np.ndarray:
        """The numpy view of ``t``, ``d`` or ``q`` (made once)."""
        if id(t) not in self._arrays:
            self._arrays[id(t)] = t.numpy()
        return self._arrays[id(t)]

    def ranges(self, scope: str, copy: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory for the lo and hi of copy ``copy``'s grids, per row or per column."""
        key = (scope, copy)
        if key not in self._arrays:
            n = self.q.shape[0] if scope == "row" else self.q.shape[1]
            self._arrays[key] = np.empty(n, np.float32), np.empty(n, np.float32)
        return self._arrays[key]

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


def order_key(b):
    """A float32's bits ``b`` (as an integer) mapped so that the integers' order is the
    floats' (NaNs beyond ±inf, so that a NaN reaches the minimum or the maximum): the sign
    bit kept, the other bits flipped where it is set. Its own inverse."""
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def row_ranges(xi, lo, hi):
    """Each row's minimum and maximum of the float32 rows whose bits are ``xi``, into
    ``lo`` and ``hi``: ``amin(1)`` and ``amax(1)``, NaN included (up to the sign of a zero,
    which changes no rounded value), compared as :func:`order_key` integers, whose minima
    vectorize. Rows in parallel."""
    n, d = xi.shape
    for i in prange(n):
        a, b = 2 ** 31 - 1, -2 ** 31
        for j in range(d):
            k = _order_key(xi[i, j])
            a, b = min(a, k), max(b, k)
        # (the bits written as floats, not through an int32 view of lo and hi: numba's
        # parallel passes do not see writes through a view, and may move a read of lo and
        # hi before them)
        lo[i] = np.int32(_order_key(a)).view(np.float32)
        hi[i] = np.int32(_order_key(b)).view(np.float32)


def column_ranges(x, lo, hi):
    """Each column's minimum and maximum of the float32 rows ``x``, into ``lo`` and ``hi``:
    ``amin(0)`` and ``amax(0)`` (a column that holds a NaN or ±inf gets NaN for its
    minimum: x·0 is NaN there). Blocks of 1024 columns in parallel (:func:`column_block`)."""
    d = x.shape[1]
    zero = np.empty(d, np.float32)
    for c in prange((d + 1023) // 1024):
        _column_block(x, lo, hi, zero, c * 1024, min(d, c * 1024 + 1024))


def column_block(x, lo, hi, zero, j0, j1):
    """:func:`column_ranges` for columns j0 … j1 − 1: one select per entry, over slices
    (which numba knows to be contiguous: the loop vectorizes across the columns)."""
    l, h, z = lo[j0:j1], hi[j0:j1], zero[j0:j1]
    first = x[0, j0:j1]
    for j in range(j1 - j0):
        l[j] = h[j] = first[j]
        z[j] = 0
    for i in range(x.shape[0]):
        r = x[i, j0:j1]
        for j in range(j1 - j0):
            v = r[j]
            l[j] = v if v < l[j] else l[j]
            h[j] = v if v > h[j] else h[j]
            z[j] += v * np.float32(0)
    for j in range(j1 - j0):
        if z[j] != 0:
            l[j] = np.nan


def sr_loop(x, xi, seed, big_a, scope_a, lo_a, hi_a, tiny_a, out_a,
            big_b, scope_b, lo_b, hi_b, tiny_b, out_b):
    """Stochastic rounding of the float32 rows ``x`` (``xi``: their bits as int32) to one
    or two grids (b: skipped when ``big_b`` is 0) in one call:

    1. each grid's range, one per row (``scope`` 0: :func:`row_ranges`) or per column (1:
       :func:`column_ranges`), found here into ``lo`` and ``hi``; for the tensor (2),
       ``lo`` and ``hi`` hold :func:`grid`'s lo and span;
    2. each grid's codes per unit and steps (as :func:`grid` and :func:`code_scales`
       compute them);
    3. rows in parallel: each row's random words (SplitMix64 from ``seed``, the words of
       :func:`lowbit.quant.random_words` that hold the row's levels), then the rounding
       with the dither of their int16 levels (:func:`round_row`, :func:`round_columns`:
       loops short enough to vectorize).

    Returns False, before drawing anything, if a range is not finite."""
    n, d = x.shape
    if scope_a == 0:
        _row_ranges(xi, lo_a, hi_a)
    elif scope_a == 1:
        _column_ranges(x, lo_a, hi_a)
    if big_b and scope_b == 0:
        _row_ranges(xi, lo_b, hi_b)
    elif big_b and scope_b == 1:
        _column_ranges(x, lo_b, hi_b)
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


def _renamed(f, name: str):
    """A copy of the function ``f`` under the name ``name``."""
    g = types.FunctionType(f.__code__, f.__globals__, name, f.__defaults__, f.__closure__)
    g.__qualname__ = name
    return g


try:  # numba compiles the loop; without it, the torch operations do the same work
    import numba
    prange = numba.prange
    _splitmix64_word = numba.njit(inline="always", cache=True)(splitmix64_word)
    _order_key = numba.njit(inline="always", cache=True)(order_key)
    _row_ranges = numba.njit(inline="always", cache=True)(row_ranges)
    _column_block = numba.njit(cache=True)(column_block)
    _column_ranges = numba.njit(inline="always", cache=True)(column_ranges)
    _scales = numba.njit(cache=True)(scales_loop)
    _round_row = numba.njit(inline="always", cache=True)(round_row)
    _round_columns = numba.njit(inline="always", cache=True)(round_columns)
    #: The compiled :func:`sr_loop` (None without numba: FQT then uses torch operations);
    #: ``compiled_serial`` is the same loop on one thread, for gradients too small to share.
    #: (Two names for one loop: numba's disk cache tells functions apart by name and code,
    #: not by compile options, and under one name both would load whichever was saved
    #: first, the parallel loop or the serial one.)
    compiled = numba.njit(parallel=True, cache=True)(_renamed(sr_loop, "sr_loop_parallel"))
    compiled_serial = numba.njit(cache=True)(sr_loop)
except ImportError:  # pragma: no cover
    prange, compiled, compiled_serial = range, None, None
    _splitmix64_word, _scales = splitmix64_word, scales_loop
    _order_key, _row_ranges, _column_ranges = order_key, row_ranges, column_ranges
    _column_block = column_block
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


def _loop_args(x: torch.Tensor, copies: tuple[tuple[int, str], ...], work: Workspace,
               outs: list[torch.Tensor]) -> tuple:
    """:func:`sr_loop` (serial or parallel, by size) and its arguments after the seed, for
    rounding ``x`` to ``copies`` into ``outs``: per row or column, the ranges go to memory
    the workspace keeps; per tensor, :func:`grid` finds the range now."""
    args = []
    for bits, how in copies:
        scope = SCOPE.get(how, how)
        if scope in ("row", "column"):
            lo, hi = work.ranges(scope, len(args))
        else:
            lo, hi = (t.reshape(1).numpy() for t in grid(x, scope, bits))
        args.append((2 ** bits - 1, _SCOPES[scope], lo, hi,
                     np.float32(min_span(bits, x.dtype))))
    if len(copies) == 1:
        args.append((0,) + args[0][1:])
    loop = compiled_serial if x.numel() < SERIAL_BELOW else compiled
    return loop, (*args[0], work.array(outs[0]), *args[1], work.array(outs[-1]))


def _round(x: torch.Tensor, copies: tuple[tuple[int, str], ...], seed: np.uint64,
           work: Workspace, outs: list[torch.Tensor]) -> None:
    """One call of :func:`sr_loop`: ``x`` rounded to one or two grids into ``outs`` (ranges
    per row or column are found in the call, into memory the workspace keeps, with the
    call's arguments; per tensor, :func:`grid` finds them)."""
    key = (copies, tuple(map(id, outs)))
    call = work.calls.get(key)
    if call is None:
        call = _loop_args(x, copies, work, outs)
        if all(SCOPE.get(how, how) in ("row", "column") for _, how in copies):
            work.calls[key] = call  # no per-tensor range: the same arguments every call
    loop, args = call
    xn = x.numpy()
    if not loop(xn, xn.view(np.int32), seed, *args):
        _name_bad_range(x, copies)


def _name_bad_range(x: torch.Tensor, copies: tuple[tuple[int, str], ...]) -> None:
    """Raise the ValueError that :func:`grid` raises for a NaN, an inf or an overflowing
    range in ``x`` (:func:`sr_loop` found one)."""
    for bits, how in copies:
        scope = SCOPE.get(how, how)
        if scope in ("row", "column"):
            dim = 1 if scope == "row" else 0
            check_finite_range(x, x.amin(dim), x.amax(dim), "gradient")
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
