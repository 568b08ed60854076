"""Two stronger pruning baselines a PSGD reviewer asks for, beside single-shot magnitude
pruning (:func:`lowbit.psgd.magnitude_prune`) and an L1 penalty.

- **Gradual magnitude pruning** (Zhu & Gupta 2017, "To prune, or not to prune"): during
  training, every ``every`` steps each layer's smallest weights are set to zero so that
  its sparsity follows the cubic schedule (Eq. 1)::

      s_t = s_f + (s_i − s_f)·(1 − (t − t_0)/(n·Δt))³,   t_0 ≤ t ≤ t_0 + n·Δt

  and stays at s_f after that; pruned weights stay at zero (the network fine-tunes around
  them for the rest of the run).
- **SNIP** (Lee, Ajanthan & Torr, ICLR 2019): before training, one batch's connection
  sensitivity |∂L/∂w · w| (Eq. 6, normalised) ranks every conv/linear weight of the network
  at once; the top (1 − sparsity) are kept and the network trains from its initialisation
  with that mask fixed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_tensor
from ..quant import quantizable_layers

__all__ = ["check_sparsity", "cubic_sparsity", "layer_masks", "apply_masks", "GradualPruner",
           "snip_masks"]


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float in [0, 1), or raise a ValueError that names it."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return value


def cubic_sparsity(step: int, final: float, end: int, begin: int = 0, initial: float = 0.0
                   ) -> float:
    """Zhu & Gupta's target sparsity at ``step``: ``initial`` before ``begin``, rising as a
    cubic to ``final`` at ``end``, ``final`` after it."""
    final, initial = check_sparsity(final, "final"), check_sparsity(initial, "initial")
    if end <= begin:
        raise ValueError(f"the schedule must end after it begins, got begin={begin}, end={end}")
    if step <= begin:
        return initial
    t = min(1.0, (step - begin) / (end - begin))
    return final + (initial - final) * (1.0 - t) ** 3


def _keep_largest(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(sparsity * score.numel())  # how many to drop
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    cut = score.flatten().kthvalue(k).values
    return score > cut


@torch.no_grad()
def layer_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per conv/linear layer, the mask that keeps its largest-magnitude (1 − sparsity)."""
    sparsity = check_sparsity(sparsity)
    return {n: _keep_largest(m.weight.abs(), sparsity) for n, m in quantizable_layers(model)}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the weights that ``masks`` (layer name → bool mask) drop, in place."""
    layers = dict(quantizable_layers(model))
    for name, mask in masks.items():
        if name not in layers:
            raise ValueError(f"no conv/linear layer {name!r} to mask; the model has "
                             f"{sorted(layers)}")
        w = layers[name].weight
        if mask.shape != w.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, its weight "
                             f"{tuple(w.shape)}")
        w.mul_(mask.to(w.device, w.dtype))
    return model


class GradualPruner:
    """Gradual magnitude pruning of ``model`` over ``total_steps`` optimizer steps: call
    :meth:`step` after each optimizer step. The sparsity rises from 0 at ``begin_fraction`` of
    the run to ``final`` at ``end_fraction`` (masks recomputed every ``every`` steps, layer
    by layer, and applied after every step so pruned weights stay zero); the rest of the run
    fine-tunes the sparse network."""

    def __init__(self, model: nn.Module, final: float, total_steps: int, every: int = 10,
                 begin_fraction: float = 0.0, end_fraction: float = 0.75) -> None:
        self.final = check_sparsity(final, "final")
        if total_steps < 1 or every < 1:
            raise ValueError(f"total_steps and every must be positive, got {total_steps}, {every}")
        if not 0.0 <= begin_fraction < end_fraction <= 1.0:
            raise ValueError("need 0 ≤ begin_fraction < end_fraction ≤ 1, got "
                             f"{begin_fraction}, {end_fraction}")
        self.model, self.every = model, every
        self.begin = int(begin_fraction * total_steps)
        self.end = max(self.begin + 1, int(end_fraction * total_steps))
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0

    def step(self, step: int) -> None:
        """After optimizer step ``step`` (1, 2, …): update the masks when due, apply them."""
        due = (step - self.begin) % self.every == 0 or step == self.end
        if self.begin < step <= self.end and due:
            self.sparsity = cubic_sparsity(step, self.final, self.end, self.begin)
            self.masks = layer_masks(self.model, self.sparsity)
        if self.masks:
            apply_masks(self.model, self.masks)


def snip_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sparsity: float,
               loss_fn=nn.functional.cross_entropy) -> dict[str, torch.Tensor]:
    """SNIP's masks for ``model`` at its initialisation: the connection sensitivities
    ``|g ⊙ w|`` on the batch ``(x, y)``, ranked over all conv/linear weights together; the top
    (1 − sparsity) of them are kept. The model is left as it was (its gradients cleared)."""
    sparsity = check_sparsity(sparsity)
    check_tensor(x, "x")
    layers = quantizable_layers(model)
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.train()
    loss_fn(model(x), y).backward()
    model.train(was_training)
    scores = {n: (m.weight.grad * m.weight).detach().abs() for n, m in layers}
    model.zero_grad(set_to_none=True)
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(sparsity * flat.numel())
    if k == 0:
        return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    cut = flat.kthvalue(k).values
    return {n: s > cut for n, s in scores.items()}
