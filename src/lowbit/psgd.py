"""PSGD: position-based scaled gradient (Kim, Yoo & Kwak, NeurIPS 2020).

SGD whose gradient is multiplied, element by element, by a scale that shrinks as a
weight approaches its target point (paper eq. 6)::

    w ← w − η · s(w) ⊙ ∇L(w),     s(w) = λ_s · |w − Q(w)| + ε            (plain)
                                  s(w) = (|w − Q(w)| + ε) / (‖w − Q(w)‖∞ + ε)   (normalized)

where ``Q(w)`` is the nearest point of the layer's symmetric b-bit grid, or 0 for pruning.
Equivalently, PSGD is plain gradient descent on warped weights ``v = f(w)`` with
``s = 1 / f'(w)²``. (Formulas, defaults and the official code's constants: the PSGD
reference page, ``book/psgd/reference.md``.)

Choices this implementation makes (each a parameter):

- As in the official code, the scale multiplies the loss gradient; weight decay and
  momentum are then applied as in ``torch.optim.SGD``. Weight decay therefore still pulls
  a weight that sits on the grid towards zero (the official recipe turns it off at 2 bits).
- Only the parameter groups with ``scaled=True`` are scaled: by default the conv and
  linear weights (:func:`param_groups`); biases and BatchNorm follow plain SGD. The
  official code also scales the last layer's bias (``param_groups(last_bias=True)``).
- The grid's range: ``grid_range="current"`` (the default) takes max|w| of the weights at
  every step, the range the model is quantized with afterwards; ``"running"`` keeps, as
  the official code does, a running average of min(w, 0) and max(w, 0) with momentum
  ``range_momentum`` (0.1), in the optimizer's state.
"""
from __future__ import annotations

import copy
import math
import struct
from typing import Iterable

import torch
from torch import nn
from torch.optim.sgd import sgd

from .optim import checked_gradients, max_abs, run_closure
from .checks import check_bits
from .quant import quantizable_layers, quantize_symmetric

__all__ = ["position_target", "position_scale", "warp", "PSGD",
           "param_groups", "sparsity", "magnitude_prune", "weight_quantization_mse"]


def _check_nonnegative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or \
            not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


GRID_RANGES = ("current", "running")


def position_target(w: torch.Tensor, bits: int | None,
                    delta: float | torch.Tensor | None = None) -> torch.Tensor:
    """The nearest target point of each weight: Q(w) on the layer's b-bit grid (its step
    recomputed from max|w|, or fixed to ``delta``), or 0 for pruning (``bits=None``)."""
    if bits is None:
        return torch.zeros_like(w)
    return quantize_symmetric(w, bits, delta=None if delta is None else torch.as_tensor(delta))


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
    ``delta`` (a fixed grid step instead of max|w| / (2^(b-1) − 1) recomputed each step),
    ``grid_range`` (``"current"``, or ``"running"``: the official running average of the
    range, ``range_momentum``) and ``scaled`` (False: plain SGD for this group).

    A step checks every gradient first: a non-finite or sparse gradient raises a
    ValueError and leaves all parameters and momentum buffers untouched. Groups are checked
    before they are added, and a state dict before it is loaded.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 bits: int | None = 4, lambda_s: float = 150.0, eps: float = 0.0,
                 normalized: bool = False, delta: float | None = None,
                 grid_range: str = "current", range_momentum: float = 0.1,
                 scaled: bool = True) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, bits=bits,
                        lambda_s=lambda_s, eps=eps, normalized=normalized, delta=delta,
                        grid_range=grid_range, range_momentum=range_momentum, scaled=scaled)
        self._check_group(defaults)
        super().__init__(params, defaults)

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
        if g["grid_range"] not in GRID_RANGES:
            raise ValueError(f"grid_range must be one of {GRID_RANGES}, got {g['grid_range']!r}")
        if not 0 < _check_nonnegative("range_momentum", g["range_momentum"]) <= 1:
            raise ValueError(f"range_momentum must be in (0, 1], got {g['range_momentum']}")

    def add_param_group(self, param_group: dict) -> None:
        # checked with the defaults filled in, before it joins the optimizer
        if not isinstance(param_group, dict):
            raise TypeError(f"a parameter group is a dict, got {type(param_group).__name__}")
        unknown = set(param_group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"unknown PSGD setting(s) {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list):
            raise ValueError("not an optimizer state dict (no list of param_groups)")
        for g in groups:
            missing = set(self.defaults) - set(g)
            if missing:
                raise ValueError(f"the state dict's group lacks PSGD setting(s) "
                                 f"{sorted(missing)}: it is not a PSGD state dict")
            self._check_group(g)
        super().load_state_dict(state_dict)

    def _delta(self, p: torch.Tensor, group: dict) -> torch.Tensor | float | None:
        """The grid step for ``p``: fixed, or None (max|w| now), or from the running range."""
        if group["delta"] is not None or group["bits"] is None \
                or group["grid_range"] == "current":
            return group["delta"]
        state = self.state[p]
        lo, hi = p.detach().amin().clamp(max=0), p.detach().amax().clamp(min=0)
        if "range_min" not in state:
            state["range_min"], state["range_max"] = lo.clone(), hi.clone()
        else:
            state["range_min"].lerp_(lo, group["range_momentum"])
            state["range_max"].lerp_(hi, group["range_momentum"])
        absmax = torch.maximum(-state["range_min"], state["range_max"])
        return torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / \
            (2 ** (group["bits"] - 1) - 1)

    @staticmethod
    def _takes_foreach(group: dict) -> bool:
        """The plain scale with the grid's range taken from the current weights, or aimed at
        0: the settings :meth:`_foreach_scale` computes for many tensors at once."""
        return not (group["normalized"] or group["delta"] is not None or (
            group["bits"] is not None and group["grid_range"] != "current"))

    @staticmethod
    def _grid_steps(ps: list[torch.Tensor], bits: int) -> list[float] | list[torch.Tensor]:
        """Δ = max|w| / qmax of each parameter (1 where max|w| = 0); raises a ValueError if
        a parameter holds a non-finite weight."""
        qmax = 2 ** (bits - 1) - 1
        peaks = max_abs(ps)  # max|w| of each tensor
        values = peaks.tolist()  # (on a GPU, a synchronization)
        _check_peaks(ps, values)
        if peaks.device.type == "cpu":
            # Δ = max|w| / qmax rounded to the weights' dtype, as the tensors compute it
            # (a division in double precision, then rounded, is the float32 one, as
            # 53 ≥ 2·24 + 2), passed as plain numbers: on a CPU, right after the backward
            # pass, the few small tensor ops cost more than the arithmetic
            return [_rounded(v / qmax, p.dtype) if v > 0 else 1.0 for p, v in zip(ps, values)]
        # 0-d tensors on the device (a CUDA division by a plain number may
        # multiply by its reciprocal instead, which is not the same rounding)
        return list(torch.where(peaks > 0, peaks / qmax, 1.0).unbind())

    @classmethod
    def _foreach_scale(cls, ps: list[torch.Tensor], bits: int | None, lambda_s: float,
                       eps: float) -> list[torch.Tensor]:
        """s(w) for many parameters at once (multi-tensor ``_foreach`` ops), bit for bit the
        arithmetic of :func:`position_target` and :func:`position_scale`. Two of their
        steps are left out because here they change no bit: the clamp to ±qmax (with
        Δ = max|w| / qmax, |w / Δ| rounds to qmax at most) and adding ε = 0."""
        if bits is None:  # pruning: the target is 0, |w − 0| = |w|
            d = torch._foreach_abs(ps)
        else:
            deltas = cls._grid_steps(ps, bits)
            d = torch._foreach_div(ps, deltas)  # Q(w) = Δ · round(w / Δ)
            torch._foreach_round_(d)
            torch._foreach_mul_(d, deltas)
            torch._foreach_sub_(d, ps)
            torch._foreach_abs_(d)
        torch._foreach_mul_(d, lambda_s)  # s = λ_s·|w − Q(w)| + ε
        if eps != 0:
            torch._foreach_add_(d, eps)
        return d

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        checked_gradients(self, "PSGD")  # everything checked before anything changes
        # [group, parameters, gradients] for every group with a gradient
        todo = [[g, ps, [p.grad for p in ps]] for g in self.param_groups
                if (ps := [p for p in g["params"] if p.grad is not None])]
        # Groups that agree on a setting are computed together, one multi-tensor call per
        # setting (param_groups gives the first and last layers groups of their own)
        together: dict[tuple, list] = {}
        for item in todo:
            g, ps, grads = item
            if not g["scaled"]:
                continue
            if self._takes_foreach(g):
                together.setdefault((g["bits"], g["lambda_s"], g["eps"]), []).append(item)
            else:
                item[2] = torch._foreach_mul(grads, [
                    position_scale(p, position_target(p, g["bits"], self._delta(p, g)),
                                   g["lambda_s"], g["eps"], g["normalized"]) for p in ps])
        for (bits, lambda_s, eps), items in together.items():
            ps = [p for _, group_ps, _ in items for p in group_ps]
            scaled = torch._foreach_mul([gr for *_, grads in items for gr in grads],
                                        self._foreach_scale(ps, bits, lambda_s, eps))
            for item in items:
                item[2], scaled = scaled[:len(item[1])], scaled[len(item[1]):]
        # then exactly torch.optim.SGD's update: weight decay,
        # momentum, Nesterov, on the scaled gradient
        updates: dict[tuple, list] = {}
        for item in todo:
            updates.setdefault(tuple(item[0][k] for k in _SGD_SETTINGS), []).append(item)
        for key, items in updates.items():  # every group checked before any is updated
            ps = [p for _, group_ps, _ in items for p in group_ps]
            _check_no_overflow(ps, [gr for *_, grads in items for gr in grads],
                               [self.state[p].get("momentum_buffer") for p in ps],
                               dict(zip(_SGD_SETTINGS, key)))
        for key, items in updates.items():
            ps = [p for _, group_ps, _ in items for p in group_ps]
            bufs = [self.state[p].get("momentum_buffer") for p in ps]
            # (foreach=None: torch.optim.SGD's own choice, multi-tensor on GPUs)
            sgd(ps, [gr for *_, grads in items for gr in grads], bufs, foreach=None,
                maximize=False, **dict(zip(_SGD_SETTINGS, key)))
            if key[_SGD_SETTINGS.index("momentum")]:
                for p, buf in zip(ps, bufs):
                    self.state[p]["momentum_buffer"] = buf
        return loss


def _check_no_overflow(ps: list[torch.Tensor], grads: list[torch.Tensor],
                       bufs: list[torch.Tensor | None], settings: dict) -> None:
    """Raise before anything is written: a ValueError if a weight of ``ps`` is not finite
    (in an unscaled group its NaN would reach the momentum), a FloatingPointError if SGD's
    update by the (scaled) ``grads`` would make a weight or a momentum value non-finite (a
    finite gradient of 3e38 times a learning rate of 10, say). A bound from the largest
    magnitudes decides; only where it exceeds half the largest float is the step tried on
    copies."""
    lr, m, decay = settings["lr"], settings["momentum"], settings["weight_decay"]
    w, g = max_abs(ps).double(), max_abs(grads).double()
    _check_peaks(ps, w.tolist())
    b = torch.zeros_like(w)  # max|buffer|, 0 where there is none yet
    held = [i for i, x in enumerate(bufs) if x is not None]
    if held:
        b[held] = max_abs([bufs[i] for i in held]).double()
    d = g + decay * w
    u = (m * b + max(1.0 - settings["dampening"], 1.0) * d) if m else d
    if m and settings["nesterov"]:
        u = d + m * u
    big = torch.tensor([0.5 * torch.finfo(p.dtype).max for p in ps], dtype=torch.float64, device=w.device)
    if bool(((w + lr * u) <= big).all()):
        return
    trial_ps = [p.detach().clone() for p in ps]
    trial_bufs = [None if x is None else x.clone() for x in bufs]
    sgd(trial_ps, grads, trial_bufs, foreach=None, maximize=False, **settings)
    bad = [tuple(p.shape) for p, t, x in zip(ps, trial_ps, trial_bufs)
           if not bool(torch.isfinite(t).all()) or (x is not None and not bool(torch.isfinite(x).all()))]
    if bad:
        raise FloatingPointError(f"this step would make non-finite weights in parameter(s) with "
                                 f"shapes {bad} (the update overflows); lower the learning rate "
                                 "(or the scale λ_s); no parameter was updated")


def _check_peaks(ps: list[torch.Tensor], peaks: list[float]) -> None:
    """Raises a ValueError naming the parameters whose max|w| (``peaks``) is not finite."""
    if not all(map(math.isfinite, peaks)):
        bad = [tuple(p.shape) for p, v in zip(ps, peaks) if not math.isfinite(v)]
        raise ValueError(f"non-finite weights in parameter(s) with shapes {bad}; "
                         "no parameter was updated")


def _rounded(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to the nearest value of ``dtype`` (ties to even), as a Python float."""
    if dtype == torch.float64:
        return x
    if dtype == torch.float32:
        return struct.unpack("f", struct.pack("f", x))[0]
    return torch.tensor(x, dtype=dtype).item()


#: The settings of torch.optim.SGD's update, by which PSGD updates groups together.
_SGD_SETTINGS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")


def param_groups(model: nn.Module, bits: int | None = 4, first_last_bits: int | None = None,
                 scale_first_last: bool = True, last_bias: bool = False) -> list[dict]:
    """Parameter groups for :class:`PSGD`: conv and linear weights are scaled towards
    their ``bits`` grid; the first and last layer's weights towards ``first_last_bits``
    (if given), or not at all with ``scale_first_last=False``; with ``last_bias`` the last
    layer's bias too, on a grid of its own (as in the official code); every other
    parameter (biases, BatchNorm) is trained by plain SGD."""
    mods = [m for _, m in quantizable_layers(model)]
    layers = [m.weight for m in mods]
    ends = [layers[0], layers[-1]] if len(layers) > 1 else layers[:1]
    if last_bias and mods and mods[-1].bias is not None:
        ends.append(mods[-1].bias)
    middle = [w for w in layers if all(w is not e for e in ends)]
    scaled_ids = {id(w) for w in layers + ends}
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
    """Fraction of conv/linear weights with ``|w| ≤ threshold`` (exact zeros by default)."""
    ws = [m.weight.detach() for _, m in quantizable_layers(model)]
    n = sum(w.numel() for w in ws)
    if n == 0:
        raise ValueError("the model has no conv or linear weights to measure the sparsity of")
    return sum(int((w.abs() <= threshold).sum()) for w in ws) / n


def weight_quantization_mse(model: nn.Module, bits: int) -> float:
    """Mean of ``|w − Q(w)|²`` over all conv/linear weights (each layer its own grid)."""
    total, n = 0.0, 0
    for _, m in quantizable_layers(model):
        w = m.weight.detach()
        total += float(((w - quantize_symmetric(w, bits)) ** 2).sum())
        n += w.numel()
    return total / n
