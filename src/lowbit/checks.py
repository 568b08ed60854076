"""The checks every module shares: bit-widths, tensors that can be quantized, a quantizer's
step and rounding mode, the extra state a layer saves. Each raises a ValueError that names
the value it got and what is allowed, before anything is computed."""
from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["check_bits", "check_values", "check_finite", "check_tensor", "finite_range",
           "check_rounding", "check_step", "check_extra_state"]


def check_bits(bits: object, low: int = 2, high: int = 32, name: str = "bits") -> int:
    """Return ``bits`` as an int, or raise a ValueError that names it and the allowed range."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        if (not isinstance(bits, bool) and isinstance(bits, numbers.Real)
                and float(bits).is_integer()):
            bits = int(bits)
        else:
            raise ValueError(f"{name} must be a whole number from {low} to {high}, got {bits!r}")
    if not low <= bits <= high:
        raise ValueError(f"{name} must be from {low} to {high}, got {bits}")
    return int(bits)


def check_values(x: object, name: str = "tensor") -> torch.Tensor:
    """Raise a ValueError unless ``x`` is a dense floating-point tensor that holds values
    (not a meta or sparse tensor); return it."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.is_meta:
        raise ValueError(f"{name} is a meta tensor (shape {tuple(x.shape)}, no values); "
                         "quantize a tensor that holds data")
    if x.layout != torch.strided:
        raise ValueError(f"{name} is a {x.layout} tensor; quantize x.to_dense()")
    return x


def finite_range(x: object, name: str = "tensor", dim: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``x`` and return its (min, max): over the whole tensor, or per index
    along ``dim`` (shaped to broadcast against ``x``).

    One ``aminmax`` pass does both jobs: NaN and ±inf propagate into the extremes,
    so the finiteness check costs nothing beyond the range we need anyway.
    """
    _check_not_empty(check_values(x, name), name)
    x = x.detach()
    if dim is None:
        lo, hi = torch.aminmax(x)
    else:
        if x.dim() < 1 or not -x.dim() <= dim < x.dim():
            raise ValueError(f"{name} has no dimension {dim} to take ranges along; "
                             f"got shape {tuple(x.shape)}")
        dim %= x.dim()
        lo, hi = torch.aminmax(x.movedim(dim, 0).reshape(x.shape[dim], -1), dim=1)
        shape = [1] * x.dim()
        shape[dim] = -1
        lo, hi = lo.reshape(shape), hi.reshape(shape)
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or ±inf); "
                         "quantization needs finite values")
    if not bool(torch.isfinite(hi - lo).all()):
        raise ValueError(f"{name}'s range [{float(lo.min()):.3g}, {float(hi.max()):.3g}] "
                         f"overflows {x.dtype} (its width is not a finite number); "
                         "quantization needs a range the dtype can hold")
    return lo, hi


def _check_not_empty(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); nothing to quantize")


def check_finite(x: object, name: str = "tensor") -> torch.Tensor:
    """Raise a ValueError unless ``x`` is a non-empty floating-point tensor of finite values
    (its range may exceed what the dtype holds, unlike :func:`check_tensor`); return it."""
    _check_not_empty(check_values(x, name), name)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has {int((~torch.isfinite(x)).sum())} non-finite value(s) "
                         "(NaN or ±inf); quantization needs finite values")
    return x


def check_tensor(x: object, name: str = "tensor") -> torch.Tensor:
    """Raise a ValueError unless ``x`` is a non-empty, finite floating-point tensor whose
    range (max − min) its dtype holds; return it."""
    finite_range(x, name)
    return x


def check_rounding(rounding: str) -> None:
    """Raise a ValueError unless ``rounding`` is ``"nearest"`` or ``"stochastic"``."""
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


def check_step(step: object, like: torch.Tensor, name: str = "step") -> torch.Tensor:
    """A quantizer's step (a number or a tensor that broadcasts against ``like``) as a
    tensor of ``like``'s dtype and device; a ValueError unless every step is finite and
    positive (a step of 0 quantizes everything to 0, a negative one flips the signs)."""
    if isinstance(step, bool):
        raise ValueError(f"{name} must be a positive number or tensor, got {step!r}")
    try:
        t = torch.as_tensor(step, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a positive number or tensor, got {step!r}") from error
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        shown = t.flatten()[:6].tolist() if t.numel() else "an empty tensor"
        raise ValueError(f"{name} must be finite and positive, got {shown}"
                         f"{' …' if t.numel() > 6 else ''}")
    return t


def check_extra_state(module: nn.Module, extra: object, keys: tuple[str, ...]) -> None:
    """Raise a ValueError unless ``extra`` is the dict of ``keys`` a state dict holds for
    ``module`` (its settings that change the output)."""
    if not isinstance(extra, dict) or set(extra) != set(keys):
        raise ValueError(f"{type(module).__name__}'s extra state is a dict of {sorted(keys)}, "
                         f"got {extra!r}")
