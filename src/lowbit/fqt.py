"""FQT: fully quantized training (Chen et al., NeurIPS 2020).

Quantization-aware training (QAT) quantizes the forward pass (activations and weights at 8
bits, deterministic) and keeps the backward pass in full precision. Fully quantized training
(FQT) also quantizes the output gradient ``∇H`` (N samples × D features) of every layer, with
**stochastic** rounding, before it is used (METHODS.md, FQT)::

    activation gradient:  ∇X = Q_b(∇H) · W         (b bits: the quantizer under study)
    weight gradient:      ∇W = Q_8(∇H)ᵀ · X        (8 bits, as in the official code; per
                                                   tensor with PTQ, per sample otherwise)

Stochastic rounding makes ``E[Q(∇H)] = ∇H``, so the FQT gradient is an unbiased estimate of
the QAT gradient; only its variance grows. Three gradient quantizers, each a function of a
tensor, a bit-width and an optional ``torch.Generator``, returning the dequantized tensor:

- :func:`quantize_ptq` — per tensor: one range ``[min, max]`` for all of ``∇H``.
- :func:`quantize_psq` — per sample: one range per row.
- :func:`quantize_bhq` — block Householder: rows sorted by magnitude, each large row grouped
  with small rows, scaled and reflected so that its energy is spread over its group, then
  quantized per row and transformed back (:func:`bhq_transform`).

Speed on a CPU: the random numbers are a 16-bit dither (:func:`lowbit.quant.dither`); in a
layer's backward, PTQ and PSQ run as one loop compiled with numba (:func:`_sr_rows_loop`),
bit for bit the numbers of the torch operations, in memory the layer keeps between steps.
"""
from __future__ import annotations

import copy
import math
import warnings
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .quant import DITHER_BITS, DITHER_HALF, check_bits, dither, dither_levels, \
    quantizable_layers, quantize_asymmetric, quantize_symmetric, _set_module
from .train import loss_and_correct

__all__ = ["QUANTIZERS", "quantize_gradient", "quantize_ptq", "quantize_psq", "quantize_bhq",
           "householder", "bhq_transform", "bhq_groups", "codes", "bins_used", "output_gradients", "variance_bound", "FQTLinear",
           "FQTConv2d", "convert", "configure", "layer_gradients", "gradient_statistics"]

QUANTIZERS = ("ptq", "psq", "bhq")


# ----------------------------------------------------------------------------- checks
def _rows(g: object, name: str = "gradient") -> torch.Tensor:
    """``g`` as an (N, D) matrix, one row per sample, after checking its type and shape
    (finiteness is checked on the ranges, :func:`_check_span`, at no extra pass)."""
    if not isinstance(g, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(g).__name__}")
    if not g.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {g.dtype}")
    if g.dim() < 1 or g.shape[0] == 0 or g.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(g.shape)}): the batch has no samples")
    return g.detach().reshape(g.shape[0], -1)


def _check_span(x: torch.Tensor, span: torch.Tensor, name: str = "gradient") -> None:
    """NaN and ±inf reach the minimum or maximum, and then the widest range, so a finite
    widest range means a finite tensor (one reduction over the ranges, one sync)."""
    if not math.isfinite(float(span.amax())):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or ±inf); "
                         "training has diverged before the gradient was quantized")


def _ranges(x: torch.Tensor, per_row: bool, name: str = "gradient"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi − lo) of each row of ``x`` (shaped (N, 1)), or of the whole tensor, checked."""
    # (amin and amax separately: aminmax along a dimension is 8x slower on the CPU)
    lo, hi = (x.amin(1, keepdim=True), x.amax(1, keepdim=True)) if per_row else torch.aminmax(x)
    span = hi - lo
    _check_span(x, span, name)
    return lo, span


def _bits(bits: object) -> int:
    return check_bits(bits, 1, 32, "gradient bits")


# ----------------------------------------------------------------------------- quantizers
class _Workspace:
    """Memory that one layer's FQT backward reuses from step to step, for a gradient shaped
    like ``like``. On a CPU, fresh memory for each temporary costs about as much as the
    arithmetic on it (the system hands it out page by page); on a GPU, PyTorch's caching
    allocator already reuses memory, so layers keep none there (:meth:`_FQTLayer._work`)."""

    def __init__(self, like: torch.Tensor) -> None:
        self.key = (like.shape, like.dtype, like.device)
        self.random = torch.empty((like.numel() + 3) // 4, dtype=torch.int64,
                                  device=like.device)
        self.u, self.d, self.q = (torch.empty_like(like) for _ in range(3))


def _uniform(x: torch.Tensor, generator: torch.Generator | None,
             work: _Workspace | None = None) -> torch.Tensor:
    """The stochastic-rounding dither for ``x`` (:func:`lowbit.quant.dither`), in the
    workspace's memory if given."""
    if work is None:
        return dither(x, generator)
    return dither(x, generator, random=work.random, out=work.u)


def _sr_codes(d: torch.Tensor, span: torch.Tensor, bits: int, u: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Stochastic rounding of the offsets d = x − lo ∈ [0, span] to the codes 0 … B,
    B = 2^b − 1: floor(d·B/span + u). A code is rounded up with probability equal to the
    fractional part of d·B/span, so E[code] = d·B/span — no zero point, no clipping.
    (Clamped: in float32, B + u may round up to B + 1. Ranges below B times the smallest
    normal float, empty ones included, are rounded as if they were that wide.) Written
    into ``out`` if given (``d`` itself, say: no new memory)."""
    big_b = 2 ** bits - 1
    per_code = span.clamp(min=big_b * torch.finfo(d.dtype).tiny).reciprocal_().mul_(big_b)
    return torch.mul(d, per_code, out=out).add_(u).floor_().clamp_(0, big_b)


def _dequantize(codes: torch.Tensor, lo: torch.Tensor, span: torch.Tensor, bits: int
                ) -> torch.Tensor:
    """The values lo + code·span/B of the codes, in place."""
    return codes.mul_(span * (1.0 / (2 ** bits - 1))).add_(lo)


def _sr_rows_loop(x, k, lo, span, big_a, big_b, out_a, out_b):
    """:func:`_sr_codes` and :func:`_dequantize` for every row of the float32 matrix ``x``
    at one or two bit-widths (B = ``big_a``, and ``big_b`` unless it is 0), with the dither
    of the int16 levels ``k`` (:func:`lowbit.quant.dither`) — the same float32 operations in
    the same order, in one pass over the gradient instead of about ten. Compiled by numba,
    rows in parallel (:data:`_fused`)."""
    n, d = x.shape
    half, unit = np.float32(DITHER_HALF), np.float32(2.0 ** -DITHER_BITS)
    tiny = np.float32(np.finfo(np.float32).tiny)
    one = np.float32(1.0)
    ba, bb = np.float32(big_a), np.float32(big_b)
    for i in prange(n):
        lo_i, s = lo[i], span[i]
        pa, sa = (one / max(s, np.float32(ba * tiny))) * ba, s * np.float32(1.0 / big_a)
        pb = (one / max(s, np.float32(bb * tiny))) * bb if big_b else np.float32(0.0)
        sb = s * np.float32(1.0 / big_b) if big_b else np.float32(0.0)
        for j in range(d):
            u = half + unit * np.float32(k[i, j])
            dj = x[i, j] - lo_i
            ca = min(np.floor(dj * pa + u), ba)
            out_a[i, j] = ca * sa + lo_i
            if big_b:
                cb = min(np.floor(dj * pb + u), bb)
                out_b[i, j] = cb * sb + lo_i


try:  # numba compiles the loop; without it, the torch operations do the same work
    import numba
    prange = numba.prange
    #: The compiled :func:`_sr_rows_loop` (None without numba: FQT then uses torch operations).
    _fused = numba.njit(parallel=True, cache=True)(_sr_rows_loop)
except ImportError:  # pragma: no cover
    prange, _fused = range, None


def _quantize_fused(x: torch.Tensor, bits: tuple[int, ...], quantizer: str,
                    generator: torch.Generator | None, work: _Workspace) -> list[torch.Tensor]:
    """PTQ or PSQ of the float32 rows ``x`` at one or two bit-widths with the compiled
    loop: what :func:`_quantize_many` computes, the same numbers from the same draw, in the
    workspace's memory."""
    lo, span = _ranges(x, per_row=quantizer == "psq")
    n = x.shape[0]
    lo, span = lo.reshape(-1).expand(n).contiguous(), span.reshape(-1).expand(n).contiguous()
    k = dither_levels(x, generator, work.random)
    outs = [work.q, work.d][:len(bits)]
    big = [2 ** b - 1 for b in bits] + [0]
    _fused(x.numpy(), k.numpy(), lo.numpy(), span.numpy(), big[0], big[1],
           outs[0].numpy(), outs[-1].numpy())
    return outs


def _quantize_many(x: torch.Tensor, bits: tuple[int, ...], quantizer: str,
                   generator: torch.Generator | None, n_groups: int | None = None,
                   u: torch.Tensor | None = None, work: _Workspace | None = None
                   ) -> list[torch.Tensor]:
    """Quantize the rows ``x`` at each of ``bits`` (checked by the caller) with one range
    computation, one BHQ transform and one uniform draw ``u`` (made here when not given;
    shared, each result is still unbiased, and the random numbers — the largest cost on a
    CPU — are drawn once). With a workspace (PTQ and PSQ), the results live in it and are
    valid until its next use."""
    if quantizer == "bhq":
        gid, scale, v, vnorm2, _ = _bhq_plan(x, n_groups)
        y = _reflect(x * scale.unsqueeze(1), gid, v, vnorm2)
        lo = y.amin(1, keepdim=True)
        span = y.amax(1, keepdim=True) - lo
        work = None
    elif quantizer in ("ptq", "psq"):
        y = x
        lo, span = _ranges(x, per_row=quantizer == "psq")
    else:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    d = torch.sub(y, lo, out=None if work is None else work.d)
    u = _uniform(y, generator, work) if u is None else u
    # Each result in new memory (or the workspace's), the last one in d's.
    outs = [work.q if work is not None and i == 0 else None for i in range(len(bits) - 1)]
    outs.append(d)
    q = [_dequantize(_sr_codes(d, span, b, u, out=o), lo, span, b) for b, o in zip(bits, outs)]
    if quantizer == "bhq":
        q = [_reflect(qb, gid, v, vnorm2).div_(scale.unsqueeze(1)) for qb in q]
    return q


def quantize_ptq(g: torch.Tensor, bits: int, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Per-tensor quantizer: one range for the whole gradient, stochastic rounding."""
    return _quantize_many(_rows(g), (_bits(bits),), "ptq", generator)[0].reshape(g.shape)


def quantize_psq(g: torch.Tensor, bits: int, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Per-sample quantizer: one range per row (sample), stochastic rounding."""
    return _quantize_many(_rows(g), (_bits(bits),), "psq", generator)[0].reshape(g.shape)


def householder(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Householder reflection H = I − 2vvᵀ/‖v‖², v = e₁ − 1/√size: symmetric, orthogonal,
    and H e₁ = (1, …, 1)/√size — it spreads the first row of a group evenly over all rows."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    v = torch.full((size,), -1.0 / math.sqrt(size), dtype=torch.float64)
    v[0] += 1.0
    n2 = float(v @ v)
    h = torch.eye(size, dtype=torch.float64)
    if n2 > 0:
        h -= 2.0 * torch.outer(v, v) / n2
    return h.to(dtype)


def _plan_for(rng: np.ndarray, order: np.ndarray, k: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Groups for ``k`` leaders: the k largest rows lead; the other rows, largest first, are
    dealt out in order, each leader getting a share proportional to its range. Returns
    (group id per row, leader flag per row, group sizes, largest small-row range per group),
    rows in their original order. (NumPy: these arrays have one entry per sample, and
    NumPy is much faster than torch on such small arrays.)"""
    n = rng.size
    lead_r = rng[order[:k]]
    share = lead_r / max(lead_r.sum(), 1e-300) * (n - k)
    counts = np.floor(share).astype(np.int64)
    short = (n - k) - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(share - counts), kind="stable")[:short]] += 1
    gid = np.empty(n, dtype=np.int64)
    gid[order] = np.concatenate([np.arange(k), np.repeat(np.arange(k), counts)])
    leader = np.zeros(n, dtype=bool)
    leader[order[:k]] = True
    first_small = np.minimum(np.cumsum(counts) - counts + k, n - 1)
    r2 = np.where(counts > 0, rng[order][first_small], 0.0)
    return gid, leader, counts + 1, r2


def _bhq_plan(x: torch.Tensor, n_groups: int | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Everything BHQ needs to transform the rows of ``x``: per row its group id, scale s,
    reflection vector entry v, and per group ‖v‖² (see :func:`bhq_transform`)."""
    n = x.shape[0]
    rng = _ranges(x, per_row=True)[1].flatten().double().cpu().numpy()
    order = np.argsort(-rng, kind="stable")
    if n_groups is None:  # the count among 1, 2, 4, … whose variance proxy is smallest
        best = None
        k = 1
        while k <= n:
            _, _, size, r2 = _plan_for(rng, order, k)
            r1 = rng[order[:k]]
            a, c = r1 / np.sqrt(size), size - 1.0
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.cbrt(a * c / np.maximum(r2, 1e-300))
                grouped = (a + t * r2) ** 2 * (1 + c / t ** 2)
            cost = float(np.where((size > 1) & (r2 > 0), grouped, r1 ** 2).sum())
            if best is None or cost < best[0]:
                best = (cost, k)
            k *= 2
        n_groups = best[1]
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or not 1 <= n_groups <= n:
        raise ValueError(f"n_groups must be an int from 1 to {n} (the rows), got {n_groups!r}")
    gid, leader, size, r2 = _plan_for(rng, order, n_groups)
    r1 = rng[order[:n_groups]]
    sz = size.astype(np.float64)
    ok = (size > 1) & (r1 > 0) & (r2 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s1 = np.where(ok, np.cbrt(np.sqrt(sz) / np.maximum(r1, 1e-300)), 1.0)
        s2 = np.where(ok, np.cbrt(np.maximum(sz - 1, 1) / np.maximum(r2, 1e-300)), 1.0)
    scale = np.where(leader, s1[gid], s2[gid])
    v = leader - 1.0 / np.sqrt(sz[gid])
    vnorm2 = np.where(size > 1, 2.0 - 2.0 / np.sqrt(sz), 0.0)
    dev, dt = x.device, x.dtype
    return (torch.from_numpy(gid).to(dev), torch.from_numpy(scale).to(dev, dt),
            torch.from_numpy(v).to(dev, dt), torch.from_numpy(vnorm2).to(dev, dt), n_groups)


def bhq_groups(g: torch.Tensor) -> int:
    """How many groups BHQ forms for this gradient (as many as rows: BHQ is PSQ)."""
    return _bhq_plan(_rows(g), None)[4]


def _reflect(z: torch.Tensor, gid: torch.Tensor, v: torch.Tensor, vnorm2: torch.Tensor
             ) -> torch.Tensor:
    """Apply each group's Householder reflection H = I − 2vvᵀ/‖v‖² to the rows of ``z``."""
    k = vnorm2.numel()
    dots = torch.zeros(k, z.shape[1], dtype=z.dtype, device=z.device)
    dots.index_add_(0, gid, v.unsqueeze(1) * z)
    coef = torch.where(vnorm2 > 0, 2.0 / vnorm2.clamp(min=1e-30), torch.zeros_like(vnorm2))
    return z - (v * coef[gid]).unsqueeze(1) * dots[gid]


def bhq_transform(g: torch.Tensor, n_groups: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The BHQ transform T of a gradient (N rows) and its inverse, as N×N matrices.

    Rows are sorted by range; the ``n_groups`` largest lead a group each and the other rows
    are dealt out to them in proportion to the leaders' ranges. Within a group of ``size``
    rows the leader (range λ₁) is scaled by s₁ = (λ₁/√size)^(−1/3) and the others (largest
    range λ₂) by s₂ = (λ₂/(size−1))^(−1/3) — the ratio s₂/s₁ that minimises the group's
    quantization variance, and the official code's form — then the Householder reflection
    (:func:`householder`) spreads the leader over the group: T = H·diag(s), T⁻¹ = diag(1/s)·H.
    ``n_groups=None`` picks, among 1, 2, 4, …, the count with the smallest variance proxy.
    (Training applies T row-group by row-group, never as a matrix.)
    """
    x = _rows(g)
    gid, scale, v, vnorm2, _ = _bhq_plan(x, n_groups)
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    t = _reflect(eye * scale.unsqueeze(1), gid, v, vnorm2)
    t_inv = _reflect(eye, gid, v, vnorm2) / scale.unsqueeze(1)
    return t, t_inv


def quantize_bhq(g: torch.Tensor, bits: int, generator: torch.Generator | None = None,
                 n_groups: int | None = None) -> torch.Tensor:
    """Block Householder quantizer: T⁻¹ · PSQ(T · ∇H) with T from :func:`bhq_transform`.
    Unbiased, because T does not depend on the random draw."""
    return _quantize_many(_rows(g), (_bits(bits),), "bhq", generator, n_groups
                          )[0].reshape(g.shape)


def quantize_gradient(g: torch.Tensor, bits: int, quantizer: str = "ptq",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Quantize a gradient with ``quantizer`` (``"ptq"``, ``"psq"`` or ``"bhq"``)."""
    return _quantize_many(_rows(g), (_bits(bits),), quantizer, generator)[0].reshape(g.shape)


@torch.no_grad()
def codes(g: torch.Tensor, bits: int, quantizer: str = "ptq",
          generator: torch.Generator | None = None) -> torch.Tensor:
    """The integer codes (0 … 2^b − 1, as floats, shaped (N, D)) that ``quantizer`` gives
    the rows of ``g`` — in the transformed domain for BHQ."""
    x = _rows(g)
    b = _bits(bits)
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    if quantizer == "bhq":
        gid, scale, v, vnorm2, _ = _bhq_plan(x, None)
        x = _reflect(x * scale.unsqueeze(1), gid, v, vnorm2)
    lo, span = _ranges(x, per_row=quantizer != "ptq")
    return _sr_codes(x - lo, span, b, _uniform(x, generator))


@torch.no_grad()
def bins_used(g: torch.Tensor, bits: int, quantizer: str = "ptq",
              generator: torch.Generator | None = None) -> float:
    """Mean over rows of the fraction of the 2^b codes a row's quantized values use (in the
    transformed domain for BHQ): how much of the grid the quantizer puts to work."""
    c = codes(g, bits, quantizer, generator)
    used = [torch.unique(row).numel() for row in c]
    return sum(used) / (len(used) * 2 ** _bits(bits))


def variance_bound(g: torch.Tensor, bits: int, quantizer: str = "ptq") -> float:
    """The variance bound of METHODS.md for the quantized gradient (summed over entries):
    per tensor N·D·R²/(4B²), per sample Σᵢ D·Rᵢ²/(4B²) — each entry's stochastic rounding
    has variance at most Δ²/4."""
    x = _rows(g)
    big_b = 2 ** _bits(bits) - 1
    n, d = x.shape
    if quantizer == "ptq":
        return n * d * float(_ranges(x, per_row=False)[1]) ** 2 / (4 * big_b ** 2)
    if quantizer == "psq":
        return float((d * _ranges(x, per_row=True)[1] ** 2).sum()) / (4 * big_b ** 2)
    raise ValueError(f"the bound is for 'ptq' or 'psq', got {quantizer!r}")


# ----------------------------------------------------------------------------- layers
def _forward_quant(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QAT's forward quantization: 8-bit activations (per tensor, asymmetric) and 8-bit
    weights (symmetric), both deterministic."""
    return quantize_asymmetric(x, 8), quantize_symmetric(w, 8)


class _FQTFunction(torch.autograd.Function):
    """y = op(Q8(x), Q8(w)) + b; the backward quantizes ∇H (see the module docstring) and
    passes the result straight through the forward quantizers."""

    @staticmethod
    def forward(ctx, x, w, bias, layer):
        xq, wq = _forward_quant(x, w)
        ctx.save_for_backward(xq, wq)
        ctx.layer = layer
        return layer._op(xq, wq, bias)

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq = ctx.saved_tensors
        layer = ctx.layer
        if layer.mode == "fqt":
            # One uniform draw serves both copies (each stays unbiased). The b-bit copy is
            # skipped when no input gradient is needed (the first layer); BHQ's 8-bit copy
            # for ∇W is per sample: at 8 bits the transform is not worth its cost.
            rows = _rows(grad_out, "output gradient")
            work = layer._work(rows)
            b, q = _bits(layer.grad_bits), layer.quantizer
            if q != "bhq" and work is not None and _fused is not None \
                    and rows.dtype == torch.float32:  # the same numbers, one pass (CPU)
                quantized = _quantize_fused(rows, (b, 8) if ctx.needs_input_grad[0] else (8,),
                                            q, layer.generator, work)
                q_act, q_wt = quantized[0] if len(quantized) == 2 else None, quantized[-1]
            elif not ctx.needs_input_grad[0]:
                q_act = None
                q_wt = _quantize_many(rows, (8,), "psq" if q == "bhq" else q,
                                      layer.generator, work=work)[0]
            elif q == "bhq":
                u = _uniform(rows, layer.generator, work)
                q_act = _quantize_many(rows, (b,), "bhq", None, u=u)[0]
                q_wt = _quantize_many(rows, (8,), "psq", None, u=u, work=work)[0]
            else:
                q_act, q_wt = _quantize_many(rows, (b, 8), q, layer.generator, work=work)
            g_wt = q_wt.reshape(grad_out.shape)
            g_act = q_act.reshape(grad_out.shape) if q_act is not None else None
        else:
            g_act = g_wt = grad_out
        gx = layer._grad_input(xq.shape, wq, g_act) if ctx.needs_input_grad[0] else None
        gw = layer._grad_weight(xq, wq.shape, g_wt)
        gb = layer._grad_bias(g_wt) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class _FQTLayer:
    """Shared settings of the QAT/FQT layers."""

    def _set_fqt(self, mode: str, quantizer: str, grad_bits: int) -> None:
        configure(self, mode, quantizer, grad_bits)
        self.generator: torch.Generator | None = None
        self._workspace: _Workspace | None = None

    def _work(self, rows: torch.Tensor) -> _Workspace | None:
        """The backward's reusable memory for output gradients shaped like ``rows`` (CPU)."""
        if rows.device.type != "cpu":
            return None
        if self._workspace is None or self._workspace.key != (rows.shape, rows.dtype,
                                                              rows.device):
            self._workspace = _Workspace(rows)
        return self._workspace

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", mode={self.mode}, quantizer={self.quantizer}, "
                                       f"grad_bits={self.grad_bits}")


class FQTLinear(_FQTLayer, nn.Linear):
    """Linear layer with 8-bit forward and a QAT or FQT backward."""

    def __init__(self, *args, mode: str = "fqt", quantizer: str = "psq", grad_bits: int = 8,
                 **kw) -> None:
        super().__init__(*args, **kw)
        self._set_fqt(mode, quantizer, grad_bits)

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def _grad_input(self, shape, w, g):
        return g @ w

    def _grad_weight(self, x, shape, g):
        return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    def _grad_bias(self, g):
        return g.reshape(-1, g.shape[-1]).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FQTFunction.apply(x, self.weight, self.bias, self)


class FQTConv2d(_FQTLayer, nn.Conv2d):
    """Conv2d with 8-bit forward and a QAT or FQT backward."""

    def __init__(self, *args, mode: str = "fqt", quantizer: str = "psq", grad_bits: int = 8,
                 **kw) -> None:
        super().__init__(*args, **kw)
        self._set_fqt(mode, quantizer, grad_bits)

    def _op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _grad_input(self, shape, w, g):
        return torch.nn.grad.conv2d_input(shape, w, g, self.stride, self.padding,
                                          self.dilation, self.groups)

    def _grad_weight(self, x, shape, g):
        return torch.nn.grad.conv2d_weight(x, shape, g, self.stride, self.padding,
                                           self.dilation, self.groups)

    def _grad_bias(self, g):
        return g.sum(dim=(0, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FQTFunction.apply(x, self.weight, self.bias, self)


def configure(module: nn.Module, mode: str | None = None, quantizer: str | None = None,
              grad_bits: int | None = None, generator: torch.Generator | None = None) -> None:
    """Set the mode (``"qat"`` or ``"fqt"``), gradient quantizer and bits of every FQT layer
    in ``module`` (or of the layer itself); arguments left as None are kept."""
    layers = [module] if isinstance(module, _FQTLayer) else \
        [m for m in module.modules() if isinstance(m, _FQTLayer)]
    if mode is not None and mode not in ("qat", "fqt"):
        raise ValueError(f"mode must be 'qat' or 'fqt', got {mode!r}")
    if quantizer is not None and quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    if grad_bits is not None:
        grad_bits = _bits(grad_bits)
    for m in layers:
        if mode is not None:
            m.mode = mode
        if quantizer is not None:
            m.quantizer = quantizer
        if grad_bits is not None:
            m.grad_bits = grad_bits
        if generator is not None:
            m.generator = generator


def convert(model: nn.Module, mode: str = "fqt", quantizer: str = "psq",
            grad_bits: int = 8) -> nn.Module:
    """A copy of ``model`` whose conv and linear layers are :class:`FQTConv2d` /
    :class:`FQTLinear` in ``mode`` (QAT: full-precision backward; FQT: quantized)."""
    model = copy.deepcopy(model)
    for name, m in quantizable_layers(model):
        kw = dict(mode=mode, quantizer=quantizer, grad_bits=grad_bits)
        if isinstance(m, nn.Conv2d):
            new = FQTConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            m.dilation, m.groups, m.bias is not None, m.padding_mode, **kw)
        else:
            new = FQTLinear(m.in_features, m.out_features, m.bias is not None, **kw)
        new.load_state_dict(m.state_dict())
        _set_module(model, name, new.to(m.weight.device))
    return model


# ----------------------------------------------------------------------------- measurement
def output_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """The output gradient ∇H of every FQT layer for the cross-entropy on (x, y), in QAT
    mode (full precision) with BatchNorm in evaluation mode: the tensors FQT quantizes."""
    grads: dict[str, torch.Tensor] = {}
    hooks = [m.register_full_backward_hook(
        lambda mod, gin, gout, name=n: grads.__setitem__(name, gout[0].detach().clone()))
        for n, m in model.named_modules() if isinstance(m, _FQTLayer)]
    layers = [m for m in model.modules() if isinstance(m, _FQTLayer)]
    modes = [m.mode for m in layers]
    was = model.training
    try:
        configure(model, mode="qat")
        model.eval()
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the first layer's input needs no gradient: fine
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            loss_and_correct(model(x), y)[0].backward()
    finally:
        for h in hooks:
            h.remove()
        for m, mode in zip(layers, modes):
            m.mode = mode
        model.train(was)
    return {n: grads[n] for n, m in model.named_modules() if n in grads}


def layer_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of the cross-entropy on (x, y) for each FQT layer's weight (BatchNorm in
    evaluation mode, so that repeated draws see the same forward pass)."""
    was = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    loss_and_correct(model(x), y)[0].backward()
    model.train(was)
    return {n: m.weight.grad.detach().clone() for n, m in model.named_modules()
            if isinstance(m, _FQTLayer)}


def gradient_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, quantizer: str,
                        grad_bits: int, draws: int = 50, seed: int = 0) -> dict[str, dict]:
    """Bias and variance of the FQT weight gradient around the QAT gradient, per layer, over
    ``draws`` stochastic-rounding draws for one batch. Returns, per layer: ``bias`` (‖mean
    of the draws − QAT‖ / ‖QAT‖), ``variance`` (Σ over entries of the sample variance),
    ``qat_norm2`` (‖QAT gradient‖²) and ``bias_se`` (the bias expected from noise alone,
    √(variance/draws)/‖QAT‖). The model's settings are restored afterwards."""
    if not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws must be an int ≥ 2, got {draws!r}")
    layers = [m for m in model.modules() if isinstance(m, _FQTLayer)]
    saved = [(m.mode, m.quantizer, m.grad_bits, m.generator) for m in layers]
    try:
        configure(model, mode="qat")
        ref = layer_gradients(model, x, y)
        configure(model, mode="fqt", quantizer=quantizer, grad_bits=grad_bits,
                  generator=torch.Generator(device=x.device).manual_seed(seed))
        s1 = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in ref.items()}
        s2 = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in ref.items()}
        for _ in range(draws):
            for n, g in layer_gradients(model, x, y).items():
                s1[n] += g
                s2[n] += g.double() ** 2
    finally:
        for m, (mode, q, b, gen) in zip(layers, saved):
            m.mode, m.quantizer, m.grad_bits, m.generator = mode, q, b, gen
    out = {}
    for n, g in ref.items():
        mean = s1[n] / draws
        var = float(((s2[n] - draws * mean ** 2) / (draws - 1)).clamp(min=0).sum())
        norm = float(g.double().norm())
        out[n] = dict(bias=float((mean - g).norm()) / norm, variance=var,
                      qat_norm2=norm ** 2, bias_se=math.sqrt(var / draws) / norm)
    return out
