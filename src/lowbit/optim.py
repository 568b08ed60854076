"""What the package's optimizers (:class:`lowbit.psgd.PSGD`, :class:`lowbit.fqt.GridSGD`,
:class:`lowbit.baselines.Bop`) share: the closure call of ``torch.optim`` and one check of
every gradient before any parameter moves."""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["run_closure", "checked_gradients"]


def run_closure(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """Re-evaluate the loss with gradients enabled, as ``torch.optim`` optimizers do."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def checked_gradients(optimizer: torch.optim.Optimizer, name: str
                      ) -> list[tuple[dict, torch.Tensor]]:
    """``(group, parameter)`` for every parameter with a gradient. Raises a ValueError, before
    anything is updated, if a gradient is sparse or holds NaN or ±inf."""
    grads = [(g, p) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    sparse = [tuple(p.shape) for _, p in grads if p.grad.is_sparse]
    if sparse:
        raise ValueError(f"{name} does not take sparse gradients (parameters of shapes "
                         f"{sparse}); use dense gradients (e.g. nn.Embedding(sparse=False))"
                         "; no parameter was updated")
    if grads:
        peaks = torch.stack(torch._foreach_norm([p.grad for _, p in grads], math.inf))
        if not bool(torch.isfinite(peaks).all()):
            bad = [i for i, v in enumerate(peaks.tolist()) if not math.isfinite(v)]
            shapes = [tuple(grads[i][1].shape) for i in bad]
            raise ValueError(f"non-finite gradient in {len(bad)} parameter(s) with shapes "
                             f"{shapes}; no parameter was updated")
    return grads
