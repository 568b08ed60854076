"""Training with no full-precision shadow weights (a reviewer's central objection to FQT).

FQT as published keeps a full-precision copy of every weight and quantizes it in each
forward pass. :class:`GridSGD` keeps none: a weight tensor is only ever a b-bit code per
element times one step Δ per tensor. Each update is formed transiently (an accumulator's
worth of precision) and rounded straight back onto the grid::

    v = w − lr·(g + λ·w)               (never stored)
    Δ' = max|v| / (2^(b−1) − 1)         (the grid follows the weights' range)
    w ← Δ'·clip(SR(v / Δ'), −(2^(b−1) − 1), 2^(b−1) − 1)

Stochastic rounding SR keeps every update unbiased, E[w_new] = v, however small it is
against Δ; nearest rounding (``rounding="nearest"``) drops every update smaller than Δ/2,
which is where training on a coarse grid stalls. No momentum: a momentum buffer would be a
full-precision tensor of the weights' size, the memory this is meant to save.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..optim import checked_gradients, run_closure
from ..checks import check_bits, check_rounding
from ..quant import dither, signed_levels

__all__ = ["GridSGD", "on_grid"]


def on_grid(w: torch.Tensor, delta: float, bits: int) -> bool:
    """Whether every element of ``w`` is an integer multiple k·Δ with ``|k| ≤ 2^(b−1) − 1``
    (to float precision): what a b-bit code and one step can hold, and nothing more."""
    k = w.detach().double() / delta
    return bool(((k - k.round()).abs() <= 1e-4).all() and (k.round().abs() <= signed_levels(bits)).all())


class GridSGD(torch.optim.Optimizer):
    """SGD on weights stored on a b-bit grid (``bits`` per parameter group; a group with
    ``bits=None`` — biases, BatchNorm — trains in full precision). The step Δ of each
    tensor is in ``state[p]["delta"]``; the counts of updates smaller than a step, in
    ``small_updates`` / ``updates``, say where the grid is too coarse for the learning rate.
    """

    def __init__(self, params: Iterable, lr: float = 0.1, bits: int | None = 8,
                 weight_decay: float = 0.0, rounding: str = "stochastic",
                 generator: torch.Generator | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        check_rounding(rounding)
        if bits is not None:
            check_bits(bits, 2, 16)
        super().__init__(params, dict(lr=lr, bits=bits, weight_decay=weight_decay,
                                      rounding=rounding))
        for g in self.param_groups:
            if g["bits"] is not None:
                check_bits(g["bits"], 2, 16)
                check_rounding(g["rounding"])
        self.generator = generator
        self.small_updates, self.updates = 0, 0

    @torch.no_grad()
    def snap(self) -> None:
        """Round every gridded weight to its grid (nearest): call once before training, so
        that the stored weights hold b bits from the first step on."""
        for g in self.param_groups:
            if g["bits"] is None:
                continue
            q = signed_levels(g["bits"])
            for p in g["params"]:
                m = float(p.abs().max())
                delta = m / q if m > 0 else 1.0
                p.copy_((p / delta).round_().clamp_(-q, q).mul_(delta))
                self.state[p]["delta"] = delta

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for g, p in checked_gradients(self, "GridSGD"):
            d = p.grad if g["weight_decay"] == 0 else p.grad.add(p, alpha=g["weight_decay"])
            if g["bits"] is None:
                p.add_(d, alpha=-g["lr"])
                continue
            q = signed_levels(g["bits"])
            v = p - g["lr"] * d          # transient: the only higher-precision value
            m = float(v.abs().max())
            delta = m / q if m > 0 else 1.0
            step_size = self.state[p].get("delta", delta)
            self.small_updates += int(((g["lr"] * d).abs() < step_size).sum())
            self.updates += d.numel()
            y = v.div_(delta)
            if g["rounding"] == "stochastic":
                y.add_(dither(y, self.generator)).floor_()
            else:
                y.round_()
            p.copy_(y.clamp_(-q, q).mul_(delta))
            self.state[p]["delta"] = delta
        return loss
