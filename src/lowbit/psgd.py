"""PSGD: position-based scaled gradient (Kim, Yoo & Kwak, NeurIPS 2020).

SGD whose gradient is multiplied, element by element, by a scale that shrinks as a
weight approaches its target point (METHODS.md, PSGD)::

    w ← w − η · s(w) ⊙ ∇L(w),     s(w) = λ_s · |w − Q(w)| + ε            (plain)
                                  s(w) = (|w − Q(w)| + ε) / (‖w − Q(w)‖∞ + ε)   (normalized)

where ``Q(w)`` is the nearest point of the layer's symmetric b-bit grid, recomputed from
the current weights at every step, or 0 for pruning. Equivalently, PSGD is plain
gradient descent on warped weights ``v = f(w)`` with ``s = 1 / f'(w)²``.

Choices this implementation makes (each a parameter):

- As in the official code, the scale multiplies the loss gradient; weight decay and
  momentum are then applied as in ``torch.optim.SGD``. Weight decay therefore still pulls
  a weight that sits on the grid towards zero (the official recipe turns it off at 2 bits).
- Only the parameter groups with ``scaled=True`` are scaled: by default the conv and
  linear weights (:func:`param_groups`); biases and BatchNorm follow plain SGD.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
from torch import nn

from .quant import check_bits, quantizable_layers, quantize_symmetric

__all__ = ["position_target", "position_scale", "warp", "PSGD", "param_groups", "sparsity",
           "magnitude_prune", "weight_quantization_mse"]


def _check_nonnegative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or \
            not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def position_target(w: torch.Tensor, bits: int | None,
                    delta: float | None = None) -> torch.Tensor:
    """The nearest target point of each weight: Q(w) on the layer's b-bit grid (its step
    recomputed from max|w|, or fixed to ``delta``), or 0 for pruning (``bits=None``)."""
    if bits is None:
        return torch.zeros_like(w)
    return quantize_symmetric(w, bits, delta=None if delta is None else torch.tensor(delta))


def position_scale(w: torch.Tensor, target: torch.Tensor, lambda_s: float = 150.0,
                   eps: float = 0.0, normalized: bool = False) -> torch.Tensor:
    """The position-based scale s(w) (paper eq. 6; normalized form from the rebuttal)."""
    d = (w - target).abs()
    if normalized:
        return (d + eps) / (d.max() + eps)
    return d.mul_(lambda_s).add_(eps)


def warp(w: torch.Tensor, target: torch.Tensor, lambda_s: float, eps: float) -> torch.Tensor:
    """The warping function f with s = 1/f'² for s = λ|w − w*| + ε:
    ``f(w) = w* + sgn(w − w*) · (2/λ) · (√(λ|w − w*| + ε) − √ε)``."""
    if lambda_s <= 0:
        raise ValueError(f"warp needs lambda_s > 0, got {lambda_s}")
    d = w - target
    return target + torch.sign(d) * (2 / lambda_s) * (
        torch.sqrt(lambda_s * d.abs() + eps) - math.sqrt(eps))


class PSGD(torch.optim.Optimizer):
    """SGD with the position-based scaled gradient.

    Args mirror ``torch.optim.SGD`` (``lr``, ``momentum``, ``dampening``,
    ``weight_decay``, ``nesterov``) plus, per parameter group:
    ``bits`` (2–16: the grid of the target; ``None`` targets 0, for pruning),
    ``lambda_s`` (λ_s ≥ 0), ``eps`` (ε ≥ 0), ``normalized`` (the scale in (0, 1]),
    ``delta`` (a fixed grid step instead of max|w| / (2^(b-1) − 1) recomputed each step)
    and ``scaled`` (False: plain SGD for this group).

    A step checks every gradient first: a non-finite gradient raises a ValueError and
    leaves all parameters and momentum buffers untouched.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 bits: int | None = 4, lambda_s: float = 150.0, eps: float = 0.0,
                 normalized: bool = False, delta: float | None = None,
                 scaled: bool = True) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, bits=bits,
                        lambda_s=lambda_s, eps=eps, normalized=normalized, delta=delta,
                        scaled=scaled)
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    @staticmethod
    def _check_group(g: dict) -> None:
        for name in ("lr", "momentum", "dampening", "weight_decay", "lambda_s", "eps"):
            _check_nonnegative(name, g[name])
        if g["bits"] is not None:
            check_bits(g["bits"], 2, 16)
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        if g["delta"] is not None and not (_check_nonnegative("delta", g["delta"]) > 0):
            raise ValueError(f"delta must be > 0, got {g['delta']}")
        if g["normalized"] and g["eps"] == 0:
            raise ValueError("the normalized scale needs eps > 0 (it divides by ‖w − Q(w)‖∞ + ε)")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:  # check everything before changing anything
            peaks = torch.stack([torch.linalg.vector_norm(p.grad, math.inf) for _, p in grads])
            if not bool(torch.isfinite(peaks).all()):
                bad = [i for i, v in enumerate(peaks.tolist()) if not math.isfinite(v)]
                shapes = [tuple(grads[i][1].shape) for i in bad]
                raise ValueError(f"non-finite gradient in {len(bad)} parameter(s) with shapes "
                                 f"{shapes}; no parameter was updated")
        for group, p in grads:
            g = p.grad
            if group["scaled"]:
                target = position_target(p, group["bits"], group["delta"])
                g = g * position_scale(p, target, group["lambda_s"], group["eps"],
                                       group["normalized"])
            if group["weight_decay"]:
                g = g.add(p, alpha=group["weight_decay"])
            if group["momentum"]:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.detach().clone()
                else:
                    buf.mul_(group["momentum"]).add_(g, alpha=1 - group["dampening"])
                g = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
            p.add_(g, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, bits: int | None = 4, first_last_bits: int | None = None,
                 scale_first_last: bool = True) -> list[dict]:
    """Parameter groups for :class:`PSGD`: conv and linear weights are scaled towards
    their ``bits`` grid; the first and last layer's weights towards ``first_last_bits``
    (if given), or not at all with ``scale_first_last=False``; every other parameter
    (biases, BatchNorm) is trained by plain SGD."""
    layers = [m.weight for _, m in quantizable_layers(model)]
    ends = [layers[0], layers[-1]] if len(layers) > 1 else layers[:1]
    middle = [w for w in layers if all(w is not e for e in ends)]
    scaled_ids = {id(w) for w in layers}
    rest = [p for p in model.parameters() if id(p) not in scaled_ids]
    groups = [{"params": middle, "bits": bits}]
    if scale_first_last:
        groups.append({"params": ends, "bits": first_last_bits if first_last_bits else bits})
    else:
        groups.append({"params": ends, "scaled": False})
    groups.append({"params": rest, "scaled": False})
    return [g for g in groups if g["params"]]


@torch.no_grad()
def magnitude_prune(model: nn.Module, amount: float) -> nn.Module:
    """A copy of ``model`` with the smallest-magnitude fraction ``amount`` of each conv and
    linear layer's weights set to zero (layer-wise, single-shot, no fine-tuning)."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    pruned = copy.deepcopy(model)
    for _, m in quantizable_layers(pruned):
        w = m.weight
        k = int(amount * w.numel())
        if k:
            cut = w.abs().flatten().kthvalue(k).values
            w.masked_fill_(w.abs() <= cut, 0.0)
    return pruned


def sparsity(model: nn.Module, threshold: float = 0.0) -> float:
    """Fraction of conv/linear weights with |w| ≤ threshold (exact zeros by default)."""
    ws = [m.weight.detach() for _, m in quantizable_layers(model)]
    zeros = sum(int((w.abs() <= threshold).sum()) for w in ws)
    return zeros / sum(w.numel() for w in ws)


def weight_quantization_mse(model: nn.Module, bits: int) -> float:
    """Mean of |w − Q(w)|² over all conv/linear weights (each layer its own grid)."""
    total, n = 0.0, 0
    for _, m in quantizable_layers(model):
        w = m.weight.detach()
        total += float(((w - quantize_symmetric(w, bits)) ** 2).sum())
        n += w.numel()
    return total / n
