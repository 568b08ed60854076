"""What the package's optimizers (:class:`lowbit.psgd.PSGD`, :class:`lowbit.fqt.GridSGD`,
:class:`lowbit.baselines.Bop`) share: the closure call of ``torch.optim`` and one check of
every gradient before any parameter moves."""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

__all__ = ["run_closure", "checked_gradients", "max_abs", "all_finite"]


def run_closure(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """Re-evaluate the loss with gradients enabled, as ``torch.optim`` optimizers do."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max|t| of each tensor, as one 1-D tensor (NaN where a tensor holds one, 0 for an empty
    one): multi-tensor ops, several times faster on a CPU than ``_foreach_norm(ts, inf)``."""
    full = [t for t in tensors if t.numel()]
    peaks = torch._foreach_max(torch._foreach_abs(full)) if full else []
    it = iter(peaks)
    return torch.stack([next(it) if t.numel() else t.new_zeros(()) for t in tensors])


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite: one fused pass over the tensors of a
    device and dtype (the non-finite check of torch.amp's GradScaler, run with an unscale by
    1, which changes no bit), and one synchronization."""
    if not tensors:
        return True
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    found = []
    for (device, _), ts in by_kind.items():
        flag = torch.zeros((), device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(ts, flag, _one(device))
        except RuntimeError:  # a dtype the fused check does not take
            flag = (~torch.isfinite(max_abs(ts))).any().float()
        found.append(flag.to(tensors[0].device))
    return not bool(found[0] if len(found) == 1 else torch.stack(found).any())


@functools.lru_cache(maxsize=None)
def _one(device: torch.device) -> torch.Tensor:
    """A 0-d float32 1 on ``device``, made once (:func:`all_finite`'s unscale factor, which
    the check only reads)."""
    return torch.ones((), device=device)


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
    if grads and not all_finite([p.grad for _, p in grads]):
        peaks = max_abs([p.grad for _, p in grads])  # which ones, for the message
        bad = [i for i, v in enumerate(peaks.tolist()) if not math.isfinite(v)]
        shapes = [tuple(grads[i][1].shape) for i in bad]
        raise ValueError(f"non-finite gradient in {len(bad)} parameter(s) with shapes "
                         f"{shapes}; no parameter was updated")
    return grads
