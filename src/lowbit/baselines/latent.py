"""Two other answers to 1-bit training that a SLB reviewer cites.

**Bop** (Helwegen et al., NeurIPS 2019, "Latent weights do not exist"): a binary weight
has no latent real value to update, only a sign to flip. Bop keeps an exponential moving
average of each weight's gradient and flips the weight when that average is strong enough
and agrees with the weight's sign (Algorithm 1)::

    m ← (1 − γ)·m + γ·g
    w ← −w   where |m| > τ and sign(m) = sign(w)

γ (the adaptivity rate) sets how long the average remembers, τ (the threshold) how strong
it must be. Here every conv and linear weight is ±α with α fixed per layer (the mean |w| of
its initialisation; BatchNorm absorbs it where one follows), and Bop changes only signs; the
other parameters (BatchNorm, biases) train with Adam, as in the paper.

**A quantization loss** (the IJCAI 2019 hashing paper the reviewer cites trains binary
codes with a loss that pulls the continuous values towards their binarized ones): here the
STE's latent weights get the penalty λ·Σ‖w − α·sign(w)‖² (α = mean|w| per layer), so they
gather near ±α and the forward pass's binarization changes them little.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..optim import checked_gradients, run_closure
from ..quant import binarize, quantizable_layers

__all__ = ["Bop", "binary_weights", "quantization_loss"]


@torch.no_grad()
def binary_weights(model: nn.Module) -> list[torch.Tensor]:
    """Set every conv and linear weight of ``model`` to α·sign(w) (α = its mean ``|w|``, sign(0)
    taken as +1), in place, and return the weights: the parameters :class:`Bop` flips."""
    weights = []
    for _, m in quantizable_layers(model):
        m.weight.copy_(binarize(m.weight))
        weights.append(m.weight)
    return weights


class Bop(torch.optim.Optimizer):
    """Bop for weights that are ±α: flip a weight where the moving average of its gradient
    exceeds ``threshold`` and has the weight's sign (a step would push it through zero).
    ``flips`` counts the flips of the last step."""

    def __init__(self, params: Iterable, gamma: float = 1e-3, threshold: float = 1e-6) -> None:
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma (the adaptivity rate) must be in (0, 1], got {gamma!r}")
        if not threshold >= 0:
            raise ValueError(f"threshold must be non-negative, got {threshold!r}")
        super().__init__(params, dict(gamma=gamma, threshold=threshold))
        self.flips = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        self.flips = 0
        for group, p in checked_gradients(self, "Bop"):
            state = self.state[p]
            if "m" not in state:
                if bool((p == 0).any()):
                    raise ValueError("Bop flips signs: its weights must be ±α, not zero "
                                     "(set them with lowbit.baselines.binary_weights)")
                state["m"] = torch.zeros_like(p)
            m = state["m"].lerp_(p.grad, group["gamma"])
            flip = (m.abs() > group["threshold"]) & (torch.sign(m) == torch.sign(p))
            p.mul_(torch.where(flip, -1.0, 1.0))
            self.flips += int(flip.sum())
        return loss


def quantization_loss(model: nn.Module) -> torch.Tensor:
    """Σ over conv/linear layers of ‖w − α·sign(w)‖², α = mean|w| (not differentiated): the
    distance of the latent weights from their binarized values."""
    return sum(((m.weight - binarize(m.weight).detach()) ** 2).sum()
               for _, m in quantizable_layers(model))
