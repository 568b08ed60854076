"""LSQ: learned step size quantization (Esser et al., ICLR 2020), the strong QAT baseline a
PSGD reviewer asks for.

Each quantized tensor ``v`` has a learned step ``s`` (Eq. 1)::

    v̂ = round(clip(v / s, −Q_N, Q_P)) · s

with Q_N = 2^(b−1), Q_P = 2^(b−1) − 1 for signed weights (two's complement, as in the
paper) and Q_N = 0, Q_P = 2^b − 1 for the unsigned activations after a ReLU. The backward
pass is the straight-through estimator for ``v`` (zero outside the clip range) and Eq. 3 for
``s``::

    ∂v̂/∂s = −v/s + round(v/s)   inside (−Q_N, Q_P)
             −Q_N                 at or below −Q_N
             Q_P                  at or above Q_P

scaled by g = 1/√(N·Q_P) (Sec. 2.2; N = the weight's size, or an activation's features
per sample). The step starts at 2·mean|v|/√Q_P (the weights, or the first training batch).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_bits, check_extra_state, check_step, check_tensor
from ..quant import clone_layer, layer_bits, quantizable_layers, replace_layers, set_module

__all__ = ["LSQFunction", "lsq_quantize", "lsq_range", "initial_step", "LSQConv2d",
           "LSQLinear", "LSQAct", "prepare_lsq", "STEP_INITS"]

#: How a weight's step starts: the paper's 2·mean|w|/√Q_P, or ``"grid"``: the step of the
#: book's symmetric layer-wise grid, max|w|/(2^(b−1) − 1) (where PSGD puts the weights; on
#: the book's CNN, LSQ from a PSGD model ends lower from there than from the paper's start).
STEP_INITS = ("paper", "grid")


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P) of LSQ at ``bits``: (2^(b−1), 2^(b−1) − 1) signed, (0, 2^b − 1) unsigned."""
    bits = check_bits(bits, 2 if signed else 1, 16)
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def _on_grid(y: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Eq. 1 from y = v/s: round(clip(y, −Q_N, Q_P))·s, on a new buffer (``y`` is kept)."""
    return y.clamp(-qn, qp).round_().mul_(s)


class LSQFunction(torch.autograd.Function):
    """v̂ = round(clip(v/s, −Q_N, Q_P))·s with the STE for v and Eq. 3, times ``g``, for s."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, s: torch.Tensor, g: float, qn: int, qp: int
                ) -> torch.Tensor:
        y = v / s
        ctx.save_for_backward(y)
        ctx.g, ctx.qn, ctx.qp = g, qn, qp
        return _on_grid(y, s, qn, qp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        low, high = y <= -ctx.qn, y >= ctx.qp
        ds = torch.where(low | high, torch.where(low, -float(ctx.qn), float(ctx.qp)), y.round() - y)
        grad_s = (grad * ds).sum().reshape(1) * ctx.g
        # the STE passes v's gradient on the closed range, as torch.clamp does (a ReLU's
        # zeros sit on the unsigned range's edge)
        return grad * ((y >= -ctx.qn) & (y <= ctx.qp)), grad_s, None, None, None


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, bits: int, signed: bool = True,
                 n: int | None = None) -> torch.Tensor:
    """LSQ's quantizer (Eq. 1) of ``v`` with step ``s`` (a one-element tensor), its gradient
    scale g = 1/√(n·Q_P) with ``n`` = ``v.numel()`` unless given. ``v`` must be finite and
    ``s`` finite and positive (a ValueError names the value)."""
    qn, qp = lsq_range(bits, signed)
    check_tensor(v, "v")
    if not isinstance(s, torch.Tensor) or s.numel() != 1:
        raise ValueError(f"s must be a one-element tensor (the learned step), got {s!r}")
    check_step(s.detach(), v, "s (LSQ's step)")
    n = v.numel() if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (the number of values the step serves), got {n!r}")
    g = 1.0 / math.sqrt(n * qp)
    if not (torch.is_grad_enabled() and (v.requires_grad or s.requires_grad)):
        return _on_grid(v / s, s, qn, qp)  # no gradient (evaluation): nothing to keep
    return LSQFunction.apply(v, s, g, qn, qp)


def initial_step(v: torch.Tensor, bits: int, signed: bool = True, init: str = "paper"
                 ) -> float:
    """The step LSQ starts from: 2·mean|v|/√Q_P (Sec. 2.1), or with ``init="grid"`` the
    symmetric grid's max|v|/(2^(b−1) − 1). Never zero (an all-zero ``v`` gets 1)."""
    check_tensor(v, "v")
    if init not in STEP_INITS:
        raise ValueError(f"init must be one of {STEP_INITS}, got {init!r}")
    qn, qp = lsq_range(bits, signed)
    a = v.detach().abs()
    s = float(2 * a.mean() / math.sqrt(qp)) if init == "paper" else float(a.max() / qp)
    return s if s > 0 else 1.0


class _LSQWeight:
    """Mixin: a conv/linear layer whose weight is LSQ-quantized with a learned ``step``."""

    def _set_lsq(self, weight_bits: int, init: str) -> None:
        lsq_range(weight_bits, True)
        self.weight_bits = int(weight_bits)
        self.step = nn.Parameter(torch.tensor([initial_step(self.weight, weight_bits, True, init)],
                                              device=self.weight.device))

    def quantized_weight(self) -> torch.Tensor:
        return lsq_quantize(self.weight, self.step, self.weight_bits, signed=True)

    def get_extra_state(self) -> dict:  # settings that change the output: in the state dict
        return {"weight_bits": self.weight_bits}

    def set_extra_state(self, extra: dict) -> None:
        check_extra_state(self, extra, ("weight_bits",))
        lsq_range(extra["weight_bits"], True)
        self.weight_bits = int(extra["weight_bits"])


class LSQConv2d(_LSQWeight, nn.Conv2d):
    """Conv2d with an LSQ-quantized weight (its step a parameter, learned with the weight)."""

    def __init__(self, *args, weight_bits: int = 4, init: str = "paper", **kw) -> None:
        super().__init__(*args, **kw)
        self._set_lsq(weight_bits, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class LSQLinear(_LSQWeight, nn.Linear):
    """Linear layer with an LSQ-quantized weight (its step a parameter)."""

    def __init__(self, *args, weight_bits: int = 4, init: str = "paper", **kw) -> None:
        super().__init__(*args, **kw)
        self._set_lsq(weight_bits, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.bias)


class LSQAct(nn.Module):
    """Unsigned LSQ activation quantizer after a ReLU; its step starts at 2·mean|x|/√Q_P of
    the first batch it sees in training mode."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        lsq_range(bits, False)
        self.bits = int(bits)
        self.step = nn.Parameter(torch.tensor([float("nan")]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isnan(self.step).item():
            if not self.training:
                raise RuntimeError("LSQAct has no step yet: run a batch in training mode first")
            with torch.no_grad():
                self.step.fill_(initial_step(x, self.bits, signed=False))
        return lsq_quantize(x, self.step, self.bits, signed=False, n=x[0].numel())

    def get_extra_state(self) -> dict:
        return {"bits": self.bits}

    def set_extra_state(self, extra: dict) -> None:
        check_extra_state(self, extra, ("bits",))
        lsq_range(extra["bits"], False)
        self.bits = int(extra["bits"])

    def extra_repr(self) -> str:
        return f"bits={self.bits}, step={self.step.item():.4g}"


def prepare_lsq(model: nn.Module, weight_bits: int, act_bits: int | None = None,
                first_last_bits: int | None = None, init: str = "paper") -> nn.Module:
    """A copy of ``model`` for LSQ training: conv/linear weights quantized with learned
    steps (``first_last_bits`` for the first and last layer), and with ``act_bits`` an
    :class:`LSQAct` after every ReLU — the places :func:`lowbit.quant.prepare_qat` puts its
    activation quantizers, so the two QAT methods quantize the same tensors."""
    check_bits(weight_bits, 2, 16, "weight_bits")
    if act_bits is not None:
        check_bits(act_bits, 1, 16, "act_bits")
    index = {name: i for i, (name, _) in enumerate(quantizable_layers(model))}

    def lsq_layer(name: str, m: nn.Module) -> nn.Module:
        b = layer_bits(index[name], len(index), weight_bits, first_last_bits)
        new = clone_layer(m, LSQConv2d, LSQLinear, weight_bits=b, init=init)
        new.load_state_dict(m.state_dict(), strict=False)
        new.step.data.fill_(initial_step(m.weight, b, True, init))
        return new

    model = replace_layers(model, lsq_layer, load_state=False)
    if act_bits is not None:
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.ReLU):
                set_module(model, name, nn.Sequential(nn.ReLU(), LSQAct(act_bits)))
    return model
