"""Loss landscapes as Li et al. (2018) define them, computed through ``loss-landscapes``.

``loss-landscapes`` 3.0.6 evaluates models through its model wrapper and metrics, which
we use. Its plane functions we do not, because of known defects (listed on the PSGD
reference page, ``book/psgd/reference``): random
directions are uniform rather than Gaussian; filter normalization touches biases more than
once; parameters are moved in place unless ``deepcopy_model=True``; and
``planar_interpolation`` walks the grid in place in a zig-zag that shifts every other
column by one step and accumulates rounding drift. Here:

- directions are Gaussian, normalized filter by filter to the norm of the model's filter
  (Li et al., eq. 1), and zero for biases and BatchNorm parameters (their "ignore biasbn");
- every grid point is set exactly as θ + α·d₁ + β·d₂ on a private copy of the model, so the
  model passed in is never touched;
- optionally the perturbed weights are quantized before the loss is measured, to see the
  landscape the quantized model lives in.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from loss_landscapes.metrics import Loss
from loss_landscapes.model_interface.model_wrapper import wrap_model
from torch import nn

from .checks import check_bits
from .quant import layer_bits, quantizable_layers, quantize_symmetric

__all__ = ["filter_normalized_direction", "Plane", "loss_plane", "loss_line", "sharpness"]


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """One random direction, a tensor per parameter of ``model`` (in ``parameters()``
    order): Gaussian entries, each filter (slice along dim 0) rescaled to the norm of the
    same filter of the model; zero for 1-D parameters (biases, BatchNorm)."""
    out = []
    for p in model.parameters():
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        p_norm = p.detach().flatten(1).norm(dim=1)
        out.append(d * (p_norm / d_norm).view(-1, *[1] * (p.dim() - 1)))
    return out


class _Evaluator:
    """A private copy of a model whose parameters can be set to θ + Σ cᵢ·dᵢ and scored with
    ``loss-landscapes``' Loss metric (optionally after quantizing the weights)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 bits: int | None, first_last_bits: int | None) -> None:
        self.net = copy.deepcopy(model).eval()
        self.wrapper = wrap_model(self.net)
        self.params = list(self.wrapper.get_module_parameters().parameters)
        self.theta = [p.detach().clone() for p in self.params]
        self.metric = Loss(F.cross_entropy, x, y)
        self.layers = [m for _, m in quantizable_layers(self.net)]
        self.bits = None if bits is None else check_bits(bits)
        self.first_last_bits = first_last_bits

    @torch.no_grad()
    def __call__(self, coefficients: list[float], directions: list[list[torch.Tensor]]) -> float:
        for i, p in enumerate(self.params):
            value = self.theta[i].clone()
            for c, d in zip(coefficients, directions):
                value.add_(d[i], alpha=c)
            p.copy_(value)
        if self.bits is not None:
            n = len(self.layers)
            for k, m in enumerate(self.layers):
                m.weight.copy_(quantize_symmetric(m.weight, layer_bits(k, n, self.bits,
                                                                       self.first_last_bits)))
        return self.metric(self.wrapper)


@dataclass
class Plane:
    """Loss on the plane θ + α·d₁ + β·d₂: ``loss[i, j]`` at ``alphas[i]``, ``betas[j]``."""
    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray

    @property
    def center(self) -> float:
        return float(self.loss[len(self.alphas) // 2, len(self.betas) // 2])


def _check(extent: float, steps: int) -> None:
    if not (extent > 0 and np.isfinite(extent)):
        raise ValueError(f"extent must be a positive number, got {extent}")
    if steps < 3 or steps % 2 == 0:
        raise ValueError(f"steps must be an odd number ≥ 3 (so that 0 is a grid point), got {steps}")


def loss_plane(model: nn.Module, x: torch.Tensor, y: torch.Tensor, extent: float = 1.0,
               steps: int = 21, seed: int = 0, bits: int | None = None,
               first_last_bits: int | None = None,
               directions: list[list[torch.Tensor]] | None = None) -> Plane:
    """Cross-entropy on (x, y) over the square [−extent, extent]² of a random plane through
    the model's weights (two filter-normalized Gaussian directions from ``seed``, unless
    given). With ``bits``, the weights at each point are quantized first."""
    _check(extent, steps)
    if directions is None:
        g = torch.Generator().manual_seed(seed)
        directions = [filter_normalized_direction(model, g) for _ in range(2)]
    ev = _Evaluator(model, x, y, bits, first_last_bits)
    alphas = np.linspace(-extent, extent, steps)
    loss = np.array([[ev([a, b], directions) for b in alphas] for a in alphas])
    return Plane(alphas, alphas.copy(), loss)


def loss_line(model: nn.Module, x: torch.Tensor, y: torch.Tensor, direction: list[torch.Tensor],
              alphas: np.ndarray, bits: int | None = None,
              first_last_bits: int | None = None) -> np.ndarray:
    """Loss along θ + α·d for each α in ``alphas``."""
    ev = _Evaluator(model, x, y, bits, first_last_bits)
    return np.array([ev([a], [direction]) for a in alphas])


def sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float = 0.2,
              n_directions: int = 8, seed: int = 0) -> float:
    """Mean over random filter-normalized directions d of max(L(θ + r·d), L(θ − r·d)) − L(θ):
    how fast the loss rises at distance ``radius`` (in filter-normalized units)."""
    g = torch.Generator().manual_seed(seed)
    ev = _Evaluator(model, x, y, None, None)
    base = ev([], [])
    rises = []
    for _ in range(n_directions):
        d = filter_normalized_direction(model, g)
        rises.append(max(ev([radius], [d]), ev([-radius], [d])) - base)
    return float(np.mean(rises))
