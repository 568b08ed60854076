"""The CPU fast path of FQT's backward: PT, PSQ and the per-column copy in one loop
compiled with numba, in memory a layer keeps between steps.

On a CPU, stochastic rounding costs about ten passes over the gradient as torch operations
(subtract, scale, add the dither, floor, clamp, scale, add, for each copy) and fresh
memory for each temporary costs about as much as the arithmetic. :func:`sr_loop` does the
same float32 operations in the same order in one pass, so its numbers are bit for bit
those of :func:`~lowbit.fqt.quantize_copies` from the same draw.
"""
from __future__ import annotations

import numpy as np
import torch

from ..quant import DITHER_BITS, DITHER_HALF, dither, dither_levels
from .quantizers import _SCOPE, code_scales, grid

__all__ = ["Workspace", "sr_loop", "compiled", "quantize_copies_compiled", "can_compile"]


class Workspace:
    """Memory that one layer's FQT backward reuses from step to step, for a gradient shaped
    like ``like``. On a GPU, PyTorch's caching allocator already reuses memory, so layers
    keep none there."""

    def __init__(self, like: torch.Tensor) -> None:
        self.key = (like.shape, like.dtype, like.device)
        self.random = torch.empty((like.numel() + 3) // 4, dtype=torch.int64,
                                  device=like.device)
        self.u, self.d, self.q = (torch.empty_like(like) for _ in range(3))

    def dither(self, generator: torch.Generator | None) -> torch.Tensor:
        """The stochastic-rounding dither (:func:`lowbit.quant.dither`) in this memory."""
        return dither(self.q, generator, random=self.random, out=self.u)


def sr_loop(x, k, lo_a, pc_a, st_a, big_a, col_a, out_a, lo_b, pc_b, st_b, big_b, col_b, out_b):
    """Stochastic rounding of the float32 rows ``x`` to one or two grids (b: skipped when
    ``big_b`` is 0) with the dither of the int16 levels ``k``. Each grid is its lowest
    values ``lo``, codes per unit ``pc`` and steps ``st`` (:func:`code_scales`), one per
    row, or one per column when ``col`` is set. Rows in parallel."""
    n, d = x.shape
    half, unit = np.float32(DITHER_HALF), np.float32(2.0 ** -DITHER_BITS)
    ba, bb = np.float32(big_a), np.float32(big_b)
    for i in prange(n):
        for j in range(d):
            u = half + unit * np.float32(k[i, j])
            xv = x[i, j]
            a = np.int64(j) if col_a else np.int64(i)
            out_a[i, j] = min(np.floor((xv - lo_a[a]) * pc_a[a] + u), ba) * st_a[a] + lo_a[a]
            if big_b:
                b = np.int64(j) if col_b else np.int64(i)
                out_b[i, j] = min(np.floor((xv - lo_b[b]) * pc_b[b] + u), bb) * st_b[b] \
                    + lo_b[b]


try:  # numba compiles the loop; without it, the torch operations do the same work
    import numba
    prange = numba.prange
    #: The compiled :func:`sr_loop` (None without numba: FQT then uses torch operations).
    compiled = numba.njit(parallel=True, cache=True)(sr_loop)
except ImportError:  # pragma: no cover
    prange, compiled = range, None


def can_compile(x: torch.Tensor, copies: tuple[tuple[int, str], ...]) -> bool:
    """Whether :func:`quantize_copies_compiled` handles these rows and copies."""
    return (compiled is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and 1 <= len(copies) <= 2 and all(h != "bhq" for _, h in copies))


def quantize_copies_compiled(x: torch.Tensor, copies: tuple[tuple[int, str], ...],
                             generator: torch.Generator | None, work: Workspace
                             ) -> list[torch.Tensor]:
    """What :func:`~lowbit.fqt.quantize_copies` computes for one or two copies
    (not BHQ), the same numbers from the same draw, in one pass and the workspace's memory
    (valid until its next use)."""
    n, d = x.shape
    args = []
    for bits, how in copies:
        scope = _SCOPE.get(how, how)
        lo, span = grid(x, scope, bits)
        per_code, step = code_scales(span, bits)
        col = scope == "column"
        size = d if col else n
        args += [a.reshape(-1).expand(size).contiguous().numpy() for a in (lo, per_code, step)]
        args += [2 ** bits - 1, col]
    outs = [work.q, work.d][:len(copies)]
    if len(copies) == 1:
        args += [args[0], args[1], args[2], 0, False]
    k = dither_levels(x, generator, work.random)
    compiled(x.numpy(), k.numpy(), *args[:5], outs[0].numpy(), *args[5:], outs[-1].numpy())
    return outs
