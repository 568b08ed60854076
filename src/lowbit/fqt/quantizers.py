"""FQT's gradient quantizers: stochastic rounding on a grid per tensor (PT), per sample
(PSQ), or per sample after the block Householder transform (BHQ). Each is unbiased,
E[Q(∇H)] = ∇H, and each follows the official code (StatQuant) where the book says so
(the differences that remain: the FQT reference page, ``book/fqt/reference.md``).

A quantizer sees the gradient as an (N, D) matrix, one row per sample. A *grid* is a lowest
value ``lo`` and a width ``span`` (per tensor, per row or per column); the codes are
0 … B = 2^b − 1 and the values ``lo + code · span / B``.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from ..checks import check_bits, check_values
from ..quant import dither

__all__ = ["GRAD_BITS", "FORWARD_BITS", "QUANTIZERS", "PT_VARIANTS", "check_grad_bits", "check_quantizer",
           "as_rows", "grid", "zero_code_grid", "code_scales", "sr_codes", "dequantize",
           "rows_on_grid", "quantize_copies", "quantize_pt", "quantize_psq", "quantize_bhq",
           "quantize_gradient", "householder", "householder_max", "BHQPlan", "bhq_plan",
           "bhq_groups", "reflect", "reflect_loop", "bhq_transform"]

#: The gradient bit-widths a quantizer accepts (lowest, highest).
GRAD_BITS = (1, 32)
#: The width of QAT's forward pass (weights and activations) and of the copy of ∇H that
#: makes the weight gradient, as in the paper and the official code.
FORWARD_BITS = 8
#: The three quantizers the book compares. ``"pt"`` is the official per-tensor quantizer,
#: whose grid holds zero exactly (:func:`zero_code_grid`); the FQT paper calls it PTQ, a name
#: this book keeps for post-training quantization.
QUANTIZERS = ("pt", "psq", "bhq")
#: Also accepted: ``"pt_minmax"``, per tensor over [min, max] with no zero code (the
#: book's first version; the FQT quantizers chapter measures what the zero code is worth).
PT_VARIANTS = ("pt_minmax",)
_ALL = QUANTIZERS + PT_VARIANTS
#: The grid each quantizer puts on the rows (BHQ: on the transformed rows).
SCOPE = {"pt": "tensor", "pt_minmax": "tensor_minmax", "psq": "row", "bhq": "row"}


# ----------------------------------------------------------------------------- checks
def check_grad_bits(bits: object) -> int:
    """``bits`` as an int from ``GRAD_BITS``, or a ValueError that names it."""
    return check_bits(bits, *GRAD_BITS, "gradient bits")


def check_quantizer(quantizer: object) -> str:
    """``quantizer`` if it is one of the known names, or a ValueError that names it."""
    if isinstance(quantizer, str) and quantizer.lower().startswith("ptq"):
        raise ValueError(f"quantizer {quantizer!r}: the FQT paper's per-tensor quantizer (PTQ) is "
                         f"called 'pt' here (PTQ means post-training quantization in this book); "
                         f"choose one of {_ALL}")
    if quantizer not in _ALL:
        raise ValueError(f"quantizer must be one of {_ALL}, got {quantizer!r}")
    return quantizer


def as_rows(g: object, name: str = "gradient") -> torch.Tensor:
    """``g`` as an (N, D) matrix, one row per sample, after checking its type and shape
    (finiteness is checked on the ranges, at no extra pass)."""
    check_values(g, name)
    if g.dim() < 1 or g.shape[0] == 0 or g.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(g.shape)}): the batch has no samples")
    return g.detach().reshape(g.shape[0], -1)


def check_finite_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, name: str) -> None:
    """NaN and ±inf reach the minimum or maximum; so does an overflow of hi − lo (±3e38),
    which is reported as a range too wide for the dtype."""
    if not math.isfinite(float((hi - lo).amax())):
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or ±inf); "
                             "training has diverged before the gradient was quantized")
        raise ValueError(f"{name}'s range [{float(lo.amin()):.3g}, {float(hi.amax()):.3g}] "
                         f"overflows {x.dtype}; training has diverged")


# ----------------------------------------------------------------------------- grids
def zero_code_grid(lo: float, hi: float, bits: int) -> tuple[float, float]:
    """The official per-tensor grid (StatQuant's ``ScalarPreconditioner``): the range is
    widened to hold 0, then its top moved up until 0 falls exactly on a code
    z = ⌊−lo·B/(hi − lo)⌋, so the step is −lo/z. Returns (lo, span). Zero is a code, so the
    many near-zero entries of a gradient round between 0 and ±Δ, not between two codes
    that straddle zero. (z = 0, where the official code divides by zero, widens the bottom
    instead: lo = −Δ with Δ = hi/(B − 1). At 1 bit a range with both signs cannot hold 0.)
    Plain floats: one range, computed once per tensor."""
    big_b = 2 ** bits - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    span = hi - lo
    if lo == 0.0 or span == 0.0:
        return lo, span
    z = math.floor(-lo * big_b / span)
    if z >= 1:
        return lo, -lo / z * big_b
    if big_b > 1:  # zero at code 1: the bottom moves down by less than one step
        step = hi / (big_b - 1)
        return -step, step * big_b
    return lo, span


@functools.lru_cache(maxsize=None)
def min_span(bits: int, dtype: torch.dtype) -> float:
    """The narrowest span a grid keeps (:func:`grid`): B times the dtype's smallest normal."""
    return (2 ** bits - 1) * torch.finfo(dtype).tiny


def grid(x: torch.Tensor, scope: str, bits: int, name: str = "gradient"
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, span) of the grid of the rows ``x``: ``scope`` is ``"tensor"`` (zero code,
    :func:`zero_code_grid`), ``"tensor_minmax"`` ([min, max]), ``"row"`` (one per sample)
    or ``"column"`` (one per feature). Shaped to broadcast against ``x``; finiteness
    checked. A span below B times the dtype's smallest normal (an all-zero row, say) is
    raised to it, so rounding and dequantization use the same step."""
    tiny = min_span(bits, x.dtype)
    if scope in ("tensor", "tensor_minmax"):
        lo, hi = torch.aminmax(x)
        check_finite_range(x, lo, hi, name)
        if scope == "tensor":  # one range: plain floats cost less than ten tiny tensors
            low, span = zero_code_grid(float(lo), float(hi), bits)
            return (torch.tensor(low, dtype=x.dtype, device=x.device),
                    torch.tensor(max(span, tiny), dtype=x.dtype, device=x.device))
        return lo, (hi - lo).clamp_(min=tiny)
    if scope in ("row", "column"):  # (amin and amax separately: aminmax along a dim is slow)
        dim = 1 if scope == "row" else 0
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
        check_finite_range(x, lo, hi, name)
        return lo, (hi - lo).clamp_(min=tiny)
    raise ValueError(f"scope must be 'tensor', 'tensor_minmax', 'row' or 'column', "
                     f"got {scope!r}")


def code_scales(span: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes per unit B/span, step span/B) of a grid — one home for both, so the compiled
    loop and the torch operations compute the same numbers."""
    big_b = 2 ** bits - 1
    return span.reciprocal().mul_(big_b), span * (1.0 / big_b)


def sr_codes(d: torch.Tensor, span: torch.Tensor, bits: int, u: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Stochastic rounding of the offsets d = x − lo ∈ [0, span] to the codes 0 … B:
    floor(d·B/span + u). A code is rounded up with probability equal to the fractional
    part of d·B/span, so E[code] = d·B/span. (Clamped: in float32, B + u may round up to
    B + 1.) Written into ``out`` if given (``d`` itself, say: no new memory)."""
    per_code = code_scales(span, bits)[0]
    return torch.mul(d, per_code, out=out).add_(u).floor_().clamp_(0, 2 ** bits - 1)


def dequantize(codes: torch.Tensor, lo: torch.Tensor, span: torch.Tensor, bits: int
               ) -> torch.Tensor:
    """The values lo + code·span/B of the codes, in place."""
    return codes.mul_(code_scales(span, bits)[1]).add_(lo)


# ----------------------------------------------------------------------------- BHQ
def householder(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Householder reflection H = I − 2vvᵀ/‖v‖², v = e₁ − 1/√size: symmetric, orthogonal,
    and H e₁ = (1, …, 1)/√size — it spreads the first row of a group evenly over all rows."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    v = torch.full((size,), -1.0 / math.sqrt(size), dtype=torch.float64)
    v[0] += 1.0
    n2 = float(v @ v)
    h = torch.eye(size, dtype=torch.float64)
    if n2 > 0:
        h -= 2.0 * torch.outer(v, v) / n2
    return h.to(dtype)


@functools.lru_cache(maxsize=None)
def householder_max(size: int) -> float:
    """``max|H|`` of :func:`householder` (``size``): the official code's ``Qmax``, how much a
    small row can grow when the reflection mixes the leader into it.

    H has only four distinct entries, (1, 1), (1, j), (i, i) and (i, j) for i ≠ j > 1; each
    is computed here as :func:`householder` computes it, δ − (2·v_i v_j)/‖v‖² in float64 with
    the same ‖v‖², so the result is the matrix's, bit for bit, without the size² matrix
    (8 GB at 32,768 rows)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    v = torch.full((size,), -1.0 / math.sqrt(size), dtype=torch.float64)
    v[0] += 1.0
    n2 = float(v @ v)
    if n2 <= 0:
        return 1.0  # H = I
    v1, vi = float(v[0]), float(v[-1])
    pairs = [(1.0, v1, v1), (0.0, v1, vi)] + ([(1.0, vi, vi)] if size > 1 else []) \
        + ([(0.0, vi, vi)] if size > 2 else [])
    return max(abs(d - 2.0 * (a * b) / n2) for d, a, b in pairs)


class BHQPlan(NamedTuple):
    """How BHQ transforms the rows of one gradient: per row its group id, scale s and
    reflection-vector entry v; per group ‖v‖²; the number of groups of two or more rows."""
    gid: torch.Tensor
    scale: torch.Tensor
    v: torch.Tensor
    vnorm2: torch.Tensor
    groups: int


def _official_leaders(values: np.ndarray) -> int:
    """The official rule for how many rows lead (StatQuant's ``get_transform``): move the
    smallest rows, one by one, out of the leaders into the pool of small rows until even
    the smallest leader's share of the pool, z·λ/Σ(leaders' λ), reaches one row.
    ``values`` are the row ranges, largest first."""
    n = values.size
    if n == 1 or values[0] <= 0:  # one row, or all rows constant: nothing to spread
        return n
    z = np.arange(1, n)
    leaders_sum = np.cumsum(values)[n - z - 1]
    share = z * values[n - z - 1] / leaders_sum
    return int(n - z[int(np.argmax(share >= 1))])  # z = n − 1 always reaches 1


def bhq_plan(x: torch.Tensor, n_groups: int | None = None) -> BHQPlan:
    """Everything BHQ needs to transform the rows of ``x`` (see :func:`bhq_transform`).
    ``n_groups`` leaders; None: the official rule (``_official_leaders``)."""
    n = x.shape[0]
    lo, hi = x.amin(1), x.amax(1)
    check_finite_range(x, lo, hi, "gradient")
    rng = (hi - lo).double().cpu().numpy()  # (NumPy: one entry per sample; fast on these)
    order = np.argsort(-rng, kind="stable")
    values = rng[order]
    if n_groups is None:
        n_groups = _official_leaders(values)
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or not 1 <= n_groups <= n:
        raise ValueError(f"n_groups must be an int from 1 to {n} (the rows), got {n_groups!r}")
    k, pool = n_groups, n - n_groups
    # Deal the pool out, largest rows first, by the leaders' shares of their total range
    # (rounded cumulative shares, as in the official code).
    lead = values[:k]
    total = lead.sum()
    share = lead / total * pool if total > 0 else np.full(k, pool / k)
    ends = np.round(np.cumsum(share)).astype(np.int64)
    ends[-1] = pool
    counts = np.diff(ends, prepend=0).clip(min=0)
    counts[-1] = pool - counts[:-1].sum()
    gid_sorted = np.concatenate([np.arange(k), np.repeat(np.arange(k), counts)])
    gid = np.empty(n, dtype=np.int64)
    gid[order] = gid_sorted
    leader = np.zeros(n, dtype=bool)
    leader[order[:k]] = True
    size = counts + 1
    first_small = np.minimum(np.cumsum(counts) - counts + k, n - 1)
    lam1, lam2 = lead, np.where(counts > 0, values[first_small], 0.0)
    qmax = np.array([householder_max(int(s)) for s in size])
    ok = (size > 1) & (lam1 > 0) & (lam2 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s1 = np.where(ok, (lam1 / np.sqrt(size)) ** (-1 / 3), 1.0)
        s2 = np.where(ok, (lam2 * qmax / np.maximum(size - 1, 1)) ** (-1 / 3), 1.0)
    scale = np.where(leader, s1[gid], s2[gid])
    v = leader - 1.0 / np.sqrt(size[gid])
    vnorm2 = np.where(size > 1, 2.0 - 2.0 / np.sqrt(size), 0.0)
    dev, dt = x.device, x.dtype
    return BHQPlan(torch.from_numpy(gid).to(dev), torch.from_numpy(scale).to(dev, dt),
                   torch.from_numpy(v).to(dev, dt), torch.from_numpy(vnorm2).to(dev, dt),
                   int((size > 1).sum()))


def bhq_groups(g: torch.Tensor) -> int:
    """How many groups of two or more rows BHQ forms for ``g`` (0: BHQ is PSQ)."""
    return bhq_plan(as_rows(g)).groups


def reflect(z: torch.Tensor, plan: BHQPlan) -> torch.Tensor:
    """Apply each group's Householder reflection H = I − 2vvᵀ/‖v‖² to the rows of ``z``:
    row i becomes z_i − c_i·Σ_{r in i's group} v_r z_r with c_i = v_i·2/‖v‖². On a CPU
    (float32) one compiled loop (:func:`reflect_loop`), otherwise torch operations: the
    same float32 operations in the same order, so the same numbers."""
    gid, v, vnorm2 = plan.gid, plan.v, plan.vnorm2
    if (_reflect_compiled is not None and z.device.type == "cpu" and z.dtype == torch.float32
            and v.dtype == torch.float32 and z.dim() == 2 and z.is_contiguous()):
        out = torch.empty_like(z)
        _reflect_compiled(z.numpy(), gid.numpy(), v.numpy(), vnorm2.numpy(), out.numpy())
        return out
    dots = torch.zeros(vnorm2.numel(), z.shape[1], dtype=z.dtype, device=z.device)
    dots.index_add_(0, gid, v.unsqueeze(1) * z)
    coef = torch.where(vnorm2 > 0, 2.0 / vnorm2.clamp(min=1e-30), torch.zeros_like(vnorm2))
    return z - (v * coef[gid]).unsqueeze(1) * dots[gid]


def reflect_loop(z, gid, v, vnorm2, out):
    """:func:`reflect` in one compiled loop, blocks of 256 columns in parallel: the group
    sums are accumulated row by row, in the order of ``index_add_``."""
    n, d = z.shape
    c = np.empty(n, np.float32)
    for i in range(n):
        g = vnorm2[gid[i]]
        c[i] = v[i] * (np.float32(2.0) / max(g, np.float32(1e-30)) if g > 0 else np.float32(0.0))
    for b in prange((d + 255) // 256):
        j0, j1 = b * 256, min(d, b * 256 + 256)
        dots = np.zeros((vnorm2.size, j1 - j0), np.float32)
        for i in range(n):
            for j in range(j0, j1):
                dots[gid[i], j - j0] += v[i] * z[i, j]
        for i in range(n):
            for j in range(j0, j1):
                out[i, j] = z[i, j] - c[i] * dots[gid[i], j - j0]


try:  # numba compiles the loop; without it, torch operations
    import numba
    prange = numba.prange
    _reflect_compiled = numba.njit(parallel=True, cache=True)(reflect_loop)
except ImportError:  # pragma: no cover
    prange, _reflect_compiled = range, None


def bhq_transform(g: torch.Tensor, n_groups: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The BHQ transform T of a gradient (N rows) and its inverse, as N×N matrices.

    Rows are sorted by range; the largest lead a group each (``n_groups`` of them, or as
    many as the official rule picks) and the other rows are dealt out to them, largest
    first, in proportion to the leaders' ranges. Within a group of ``size`` rows the leader
    (range λ₁) is scaled by s₁ = (λ₁/√size)^(−1/3) and the others (largest range λ₂) by
    s₂ = (λ₂·max|H|/(size − 1))^(−1/3), as in the official code; then the Householder
    reflection (:func:`householder`) spreads the leader over the group:
    T = H·diag(s), T⁻¹ = diag(1/s)·H. (Training applies T group by group, never as a matrix.)
    """
    x = as_rows(g)
    plan = bhq_plan(x, n_groups)
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    t = reflect(eye * plan.scale.unsqueeze(1), plan)
    t_inv = reflect(eye, plan) / plan.scale.unsqueeze(1)
    return t, t_inv


# ----------------------------------------------------------------------------- quantizing
def rows_on_grid(x: torch.Tensor, how: str, bits: int, n_groups: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BHQPlan | None]:
    """What a quantizer rounds, and on which grid: (rows, lo, span, BHQ plan or None). The
    rows are ``x`` itself on the grid of ``how`` (a quantizer or a :func:`grid` scope), or,
    for BHQ, ``x`` transformed (:func:`bhq_transform`) on per-row grids, with the plan
    that undoes the transform."""
    if how == "bhq":
        plan = bhq_plan(x, n_groups)
        y = reflect(x * plan.scale.unsqueeze(1), plan)
        return (y, *grid(y, "row", bits), plan)
    return (x, *grid(x, SCOPE.get(how, how), bits), None)


def quantize_copies(x: torch.Tensor, copies: tuple[tuple[int, str], ...],
                    generator: torch.Generator | None = None, u: torch.Tensor | None = None,
                    out: list[torch.Tensor | None] | None = None,
                    n_groups: int | None = None) -> list[torch.Tensor]:
    """Quantize the rows ``x`` once for each ``(bits, quantizer_or_scope)`` of ``copies``
    (``"pt"``, ``"pt_minmax"``, ``"psq"``, ``"bhq"``, or a :func:`grid` scope such as
    ``"column"``), every copy with the same uniform draw ``u`` (made here when not given:
    each copy stays unbiased, and the random numbers, the largest cost on a CPU, are drawn
    once). ``out`` holds memory for each result (or None). Half-precision rows are
    quantized in float32 and the results cast back (the dither cannot resolve float16's
    small steps)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        q = quantize_copies(x.float(), copies, generator, None if u is None else u.float(),
                            None, n_groups)
        return [r.to(x.dtype) for r in q]
    u = dither(x, generator) if u is None else u
    out = out or [None] * len(copies)
    results = []
    for (bits, how), o in zip(copies, out):
        y, lo, span, plan = rows_on_grid(x, how, bits, n_groups)
        q = dequantize(sr_codes(torch.sub(y, lo, out=o), span, bits, u, out=o), lo, span, bits)
        if plan is not None:
            q = reflect(q, plan).div_(plan.scale.unsqueeze(1))
        results.append(q)
    return results


def quantize_gradient(g: torch.Tensor, bits: int, quantizer: str = "pt",
                      generator: torch.Generator | None = None,
                      n_groups: int | None = None) -> torch.Tensor:
    """Quantize a gradient with ``quantizer`` (``"pt"``, ``"psq"``, ``"bhq"`` or
    ``"pt_minmax"``); ``n_groups`` fixes BHQ's number of leaders."""
    check_quantizer(quantizer)
    x = as_rows(g)
    return quantize_copies(x, ((check_grad_bits(bits), quantizer),), generator,
                           n_groups=n_groups)[0].reshape(g.shape)


def quantize_pt(g: torch.Tensor, bits: int, generator: torch.Generator | None = None,
                 zero_code: bool = True) -> torch.Tensor:
    """Per-tensor quantizer: one grid for the whole gradient, stochastic rounding; the grid
    holds zero exactly (:func:`zero_code_grid`) unless ``zero_code=False`` ([min, max])."""
    return quantize_gradient(g, bits, "pt" if zero_code else "pt_minmax", generator)


def quantize_psq(g: torch.Tensor, bits: int, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Per-sample quantizer: one range per row (sample), stochastic rounding."""
    return quantize_gradient(g, bits, "psq", generator)


def quantize_bhq(g: torch.Tensor, bits: int, generator: torch.Generator | None = None,
                 n_groups: int | None = None) -> torch.Tensor:
    """Block Householder quantizer: T⁻¹ · PSQ(T · ∇H) with T from :func:`bhq_transform`.
    Unbiased, because T does not depend on the random draw."""
    return quantize_gradient(g, bits, "bhq", generator, n_groups)
