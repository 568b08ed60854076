"""SLB: searching for low-bit weights (Yang et al., NeurIPS 2020).

Each weight is a distribution over a small set ``V`` of discrete values (formulas, defaults
and every open choice: the SLB reference page, ``book/slb/reference.md``)::

    V = {v_1 … v_m},  m = 2^b, evenly spaced in [-1, 1]      (1 bit: {-1, +1})
    P = softmax(A / τ)                                         (A: m logits per weight)
    training weight:  W̃ = α · Σ_i P_i v_i                      (the expectation, paper eq. 6)
    test weight:      Ŵ = α · v_argmax(A)                       (the discrete weight)

``Ŵ − W̃`` is the *quantization gap*; lowering the temperature τ closes it. State batch
normalization (SBN) keeps two sets of running statistics, one for the network with
continuous weights and one for the network with discrete weights.

No official code was released; every choice the paper leaves open is a parameter here:

- ``alpha``, the layer's output scale: ``"learned"`` (a positive scalar, initialised to
  the standard deviation of PyTorch's default initialisation) or ``"fixed"`` (that value,
  kept). A BatchNorm after the layer absorbs it; the last linear layer has none. A learned
  α is trained as ``log_alpha``, so it cannot change sign: trained directly with Adam, it
  crossed zero late in some runs, when the cold softmax no longer lets the logits follow,
  and the network collapsed (a 2-bit run at 96% fell to 54% in its fifth epoch).
- ``init``: random logits (``"random"``, the paper) or logits that favour the value
  nearest to a trained full-precision weight (``"nearest"``).
- Which state a layer uses is explicit: ``"continuous"``, ``"discrete"``, or ``"auto"``
  (continuous in training mode, discrete in evaluation mode). :func:`use_state` switches
  a whole model.
- The discrete statistics of SBN are collected by a second, gradient-free forward pass of
  each training batch through the discrete network (:func:`update_discrete_stats`).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import quant
from .checks import check_bits, check_extra_state, check_tensor
from .quant import clone_layer

__all__ = ["VALUE_SETS", "ArgmaxTracker", "logit_margins", "gap_bound", "gap_at", "temperature_for_gap",
           "GapSchedule", "GapAnnealer", "value_set", "check_temperature", "SLBConv2d", "SLBLinear", "StateBatchNorm1d",
           "StateBatchNorm2d", "slb_layers", "set_temperature", "use_state", "layer_gap",
           "model_gap", "TemperatureSchedule", "Annealer", "convert", "update_discrete_stats",
           "recalibrate_bn", "export", "codes", "parameter_memory", "ExpectedWeight",
           "expected_weight_grad_loop", "discrete_weight_loop"]

State = Literal["auto", "continuous", "discrete"]
STATES = ("auto", "continuous", "discrete")
MAX_BITS = 8


#: The value sets an SLB layer can search — ``"even"``, the paper's 2^b values evenly spaced in
#: [−1, 1] (no zero at any bit-width); ``"zero"``, the 2^b − 1 values of the symmetric grid,
#: k/(2^(b−1) − 1), which hold zero (a control for the paper's choice; 2 bits or more).
VALUE_SETS = ("even", "zero")


def value_set(bits: int, kind: str = "even") -> torch.Tensor:
    """The values ``V`` of a b-bit SLB weight (:data:`VALUE_SETS`): by default the 2^b values
    evenly spaced in [-1, 1] (1 bit: {-1, +1})."""
    if kind not in VALUE_SETS:
        raise ValueError(f"the value set must be one of {VALUE_SETS}, got {kind!r}")
    b = check_bits(bits, 1 if kind == "even" else 2, MAX_BITS, "bits")
    if kind == "zero":  # k / q exactly: zero is a value, not a float near it
        q = 2 ** (b - 1) - 1
        return torch.arange(-q, q + 1, dtype=torch.float32) / q
    return torch.linspace(-1.0, 1.0, 2 ** b)


def check_temperature(tau: object, name: str = "temperature") -> float:
    """Return ``tau`` as a float, or raise a ValueError unless it is finite and > 0."""
    if isinstance(tau, torch.Tensor) and tau.numel() == 1:
        tau = tau.item()
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or \
            not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {tau!r}")
    return float(tau)


def _check_state(state: str) -> str:
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    return state


# ----------------------------------------------------------------------------- layers
class _SLBWeight(nn.Module):
    """The searched weight of one layer: logits over ``V`` and the output scale α."""

    def _init_slb(self, shape: torch.Size, fan_in: int, bits: int, temperature: float,
                  alpha: str, init: str, weight: torch.Tensor | None, values: str = "even"
                  ) -> None:
        self.bits = check_bits(bits, 1, MAX_BITS, "bits")
        self.weight_shape = tuple(shape)
        self.temperature = temperature  # (checked by the property)
        self.state: State = "auto"
        if alpha not in ("learned", "fixed"):
            raise ValueError(f"alpha must be 'learned' or 'fixed', got {alpha!r}")
        if init not in ("random", "nearest"):
            raise ValueError(f"init must be 'random' or 'nearest', got {init!r}")
        self.register_buffer("values", value_set(bits, values))
        # PyTorch's default init is U(-1/√fan_in, 1/√fan_in): standard deviation 1/√(3·fan_in)
        a0 = torch.tensor(1.0 / math.sqrt(3.0 * fan_in))
        if init == "nearest":
            if weight is None:
                raise ValueError("init='nearest' needs the full-precision weight")
            check_tensor(weight, "weight")
            if tuple(weight.shape) != tuple(shape):
                raise ValueError(f"init='nearest' needs the layer's weight, of shape "
                                 f"{tuple(shape)}; got shape {tuple(weight.shape)}")
            a0 = weight.detach().abs().max().clamp(min=1e-8).cpu()
        if alpha == "learned":  # learned as log α: a scale stays positive (see the docstring)
            self.log_alpha = nn.Parameter(a0.clone().log())
        else:
            self.register_buffer("alpha", a0.clone())
        # The value axis comes first, logits[i] holding every weight's logit for v_i: the
        # softmax and the sum over a short leading axis run 6x faster than over a last
        # axis of length 2^b (measured on the CPU).
        logits = torch.randn(len(self.values), *shape)
        if init == "nearest":
            # a logit margin of 2 for the nearest value, less for the others
            vals = self.values.reshape(-1, *([1] * len(shape)))
            dist = (weight.detach().cpu().unsqueeze(0) / a0 - vals).abs()
            logits = -dist * (2.0 / (self.values[1] - self.values[0]))
        self.logits = nn.Parameter(logits)

    def __getattr__(self, name: str):
        # a learned scale is the parameter log_alpha; alpha reads it as exp(log_alpha)
        if name == "alpha" and "log_alpha" in self._parameters:
            return self._parameters["log_alpha"].exp()
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        # ... and assigning alpha sets log_alpha = log(alpha), so the assignment is not lost
        if name == "alpha" and "log_alpha" in self.__dict__.get("_parameters", {}):
            a = torch.as_tensor(value, dtype=torch.float32).detach()
            if a.numel() != 1 or not bool(torch.isfinite(a).all()) or float(a) <= 0:
                raise ValueError(f"alpha must be one finite number > 0 (the layer learns "
                                 f"log α), got {value!r}")
            with torch.no_grad():
                self._parameters["log_alpha"].copy_(a.reshape(()).log())
            return
        super().__setattr__(name, value)

    @property
    def temperature(self) -> float:
        """The softmax temperature τ (finite and > 0; checked when set)."""
        return self._temperature

    @temperature.setter
    def temperature(self, tau: float) -> None:
        self._temperature = check_temperature(tau)

    def probabilities(self) -> torch.Tensor:
        """P = softmax(A / τ) over the value axis (the first): P[i] is every weight's
        probability of v_i."""
        return torch.softmax(self.logits / self.temperature, dim=0)

    def expected_weight(self) -> torch.Tensor:
        """The continuous weight W̃ = α Σ_i P_i v_i (paper eq. 6). On a CPU its gradient
        comes from :class:`ExpectedWeight`'s closed form."""
        alpha = self.alpha
        if self._compiles(alpha):
            return ExpectedWeight.apply(self.logits, alpha, self.values, self.temperature)
        return alpha * _expectation(self.logits, self.values, self.temperature)[1]

    def discrete_weight(self) -> torch.Tensor:
        """The discrete weight Ŵ = α v_argmax (what the exported model uses). Without
        autograd on a CPU, one compiled pass over the logits (:func:`discrete_weight_loop`)
        gives it bit for bit, in place of four tensor operations (SLB's discrete pass
        builds it at every step)."""
        alpha = self.alpha
        if not (alpha.requires_grad and torch.is_grad_enabled()) and self._compiles(alpha):
            out = torch.empty(self.weight_shape, dtype=torch.float32)
            _discrete_weight_loop()(self.logits.detach().numpy().reshape(len(self.values), -1),
                                    self.values.numpy(), alpha.item(), out.numpy().reshape(-1))
            return out
        return alpha * self.values[self.argmax()]

    def _compiles(self, alpha: torch.Tensor) -> bool:
        """Whether the compiled loops take this layer's logits (float32, contiguous, CPU)."""
        return _compiled_fits(self.logits, self.values, alpha) and self.logits.is_contiguous()

    def argmax(self) -> torch.Tensor:
        """Index of each weight's most probable value (``max(0).indices``: on the CPU
        ``argmax(0)`` over the leading axis is 30x slower)."""
        return self.logits.detach().max(0).indices

    def current_state(self) -> str:
        if self.state == "auto":
            return "continuous" if self.training else "discrete"
        return self.state

    def effective_weight(self) -> torch.Tensor:
        return self.expected_weight() if self.current_state() == "continuous" \
            else self.discrete_weight()

    # The temperature and the state change the layer's output, so they live in its state
    # dict (a cached model comes back at the temperature it was trained to).
    def get_extra_state(self) -> dict:
        return {"temperature": self.temperature, "state": self.state}

    def set_extra_state(self, extra: dict) -> None:
        check_extra_state(self, extra, ("temperature", "state"))
        self.temperature = extra["temperature"]  # (checked by the property)
        self.state = _check_state(extra["state"])

    def extra_repr(self) -> str:
        return (f"{self.weight_shape}, bits={self.bits}, temperature={self.temperature:.4g}, "
                f"state={self.state}")


def _expectation(logits: torch.Tensor, values: torch.Tensor, tau: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """P = softmax(A/τ) over the value axis (as ``probabilities``) and e = Σ_i P_i v_i, the
    expected weight of paper eq. 6 before the scale α: for autograd's path and for
    :class:`ExpectedWeight`'s forward alike."""
    p = torch.softmax(logits / tau, dim=0)
    return p, (values @ p.reshape(len(values), -1)).reshape(p.shape[1:])


class ExpectedWeight(torch.autograd.Function):
    """W̃ = α Σ_i p_i v_i with p = softmax(A/τ) over the value axis (paper eq. 6), and its
    gradient in closed form, one compiled pass (:func:`expected_weight_grad_loop`)::

        ∂L/∂A_i = (α/τ) · g · p_i · (v_i − e),   ∂L/∂α = Σ g · e,   e = Σ_i p_i v_i

    (g = ∂L/∂W̃), which is what autograd computes through the softmax, the sum and the
    product in five steps. CPU, float32."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, alpha: torch.Tensor, values: torch.Tensor,
                tau: float) -> torch.Tensor:
        p, e = _expectation(logits, values, tau)
        ctx.save_for_backward(p, e, values)
        ctx.alpha, ctx.tau = alpha.item(), tau
        return alpha * e

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        p, e, values = ctx.saved_tensors
        m = len(values)
        grad = torch.empty_like(p)
        total = _expected_weight_grad_loop()(
            p.numpy().reshape(m, -1), e.numpy().reshape(-1), values.numpy(),
            g.contiguous().numpy().reshape(-1), ctx.alpha / ctx.tau, grad.numpy().reshape(m, -1))
        return grad, torch.tensor(total, dtype=torch.float32), None, None


def expected_weight_grad_loop(p, e, values, g, scale, grad):
    """``grad[i, j] = scale · g[j] · p[i, j] · (values[i] − e[j])``, and Σ_j g[j]·e[j]
    returned (:class:`ExpectedWeight`'s backward; ``scale`` = α/τ). Compiled with numba."""
    total = 0.0
    for j in range(p.shape[1]):
        total += g[j] * e[j]
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            grad[i, j] = scale * g[j] * p[i, j] * (values[i] - e[j])
    return total


def _expected_weight_grad_loop():
    """:func:`expected_weight_grad_loop` compiled, sums reassociated (fastmath)."""
    return _numba(expected_weight_grad_loop, fastmath=True)


@functools.cache
def _numba(loop, fastmath: bool = False):
    """``loop`` compiled by numba for the CPU on its first use (None without numba)."""
    try:
        import numba
    except ImportError:  # pragma: no cover
        return None
    return numba.njit(fastmath=fastmath, cache=True)(loop)


class SLBConv2d(_SLBWeight):
    """Conv2d whose weight is searched over the b-bit value set (see module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple,
                 stride: int | tuple = 1, padding: int | tuple = 0, dilation: int | tuple = 1,
                 groups: int = 1, bias: bool = False, bits: int = 2, temperature: float = 1.0,
                 alpha: str = "learned", init: str = "random",
                 weight: torch.Tensor | None = None, values: str = "even") -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must both be divisible by groups ({groups})")
        k = nn.modules.utils._pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding = nn.modules.utils._pair(stride), nn.modules.utils._pair(padding)
        self.dilation, self.groups = nn.modules.utils._pair(dilation), groups
        shape = torch.Size((out_channels, in_channels // groups, *k))
        self._init_slb(shape, shape[1:].numel(), bits, temperature, alpha, init, weight, values)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class SLBLinear(_SLBWeight):
    """Linear layer whose weight is searched over the b-bit value set."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 2,
                 temperature: float = 1.0, alpha: str = "learned", init: str = "random",
                 weight: torch.Tensor | None = None, values: str = "even") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_slb(torch.Size((out_features, in_features)), in_features, bits, temperature,
                       alpha, init, weight, values)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class _StateBatchNorm(nn.Module):
    """Batch normalization with two sets of running statistics and one affine transform.

    ``state`` picks the set: ``"continuous"`` (the network with expectation weights),
    ``"discrete"`` (the network with argmax weights) or ``"auto"`` (continuous in training
    mode, discrete in evaluation mode). Only the chosen set is updated by a training-mode
    forward pass.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1
                 ) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.state: State = "auto"
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        for s in ("continuous", "discrete"):
            self.register_buffer(f"{s}_mean", torch.zeros(num_features))
            self.register_buffer(f"{s}_var", torch.ones(num_features))
            self.register_buffer(f"{s}_batches", torch.tensor(0, dtype=torch.long))

    def current_state(self) -> str:
        if self.state == "auto":
            return "continuous" if self.training else "discrete"
        return self.state

    def statistics(self, state: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(running mean, running variance) of ``state`` ('continuous' or 'discrete')."""
        if state not in ("continuous", "discrete"):
            raise ValueError(f"state must be 'continuous' or 'discrete', got {state!r}")
        return getattr(self, f"{state}_mean"), getattr(self, f"{state}_var")

    def reset_statistics(self, state: str) -> None:
        mean, var = self.statistics(state)
        mean.zero_()
        var.fill_(1.0)
        getattr(self, f"{state}_batches").zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self._ndim:
            raise ValueError(f"{type(self).__name__} expects a {self._ndim}-D input, "
                             f"got shape {tuple(x.shape)}")
        s = self.current_state()
        mean, var = self.statistics(s)
        momentum = self.momentum
        if self.training:
            batches = getattr(self, f"{s}_batches")
            batches.add_(1)
            if momentum is None:  # cumulative average, as in nn.BatchNorm
                momentum = 1.0 / float(batches)
            if not torch.is_grad_enabled() and _batch_fits(x, mean, var, self.weight):
                return _batch_norm_compiled(x, self.weight, self.bias, self.eps, momentum,
                                            mean, var)
        return F.batch_norm(x, mean, var, self.weight, self.bias, self.training,
                            momentum or 0.0, self.eps)

    def get_extra_state(self) -> dict:
        return {"state": self.state}

    def set_extra_state(self, extra: dict) -> None:
        check_extra_state(self, extra, ("state",))
        self.state = _check_state(extra["state"])

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, state={self.state}"


def batch_norm_loop(x, weight, bias, eps, momentum, running_mean, running_var, out):
    """Training-mode batch normalization of ``x`` (N, C, L) without autograd, one channel
    per iteration: the batch mean and the biased variance (two passes, in float64), the
    output (x − mean)·weight/√(var + eps) + bias, and the running statistics moved by
    ``momentum`` (the unbiased variance), as ``F.batch_norm`` computes them up to the
    rounding of its sums. Compiled with numba (:func:`_batch_norm_loop`)."""
    n_batch, channels, length = x.shape
    n = n_batch * length
    for c in range(channels):
        total = 0.0
        for i in range(n_batch):
            for j in range(length):
                total += x[i, c, j]
        mean = total / n
        squares = 0.0
        for i in range(n_batch):
            for j in range(length):
                d = x[i, c, j] - mean
                squares += d * d
        var = squares / n
        scale = weight[c] / math.sqrt(var + eps)
        for i in range(n_batch):
            for j in range(length):
                out[i, c, j] = (x[i, c, j] - mean) * scale + bias[c]
        running_mean[c] = (1 - momentum) * running_mean[c] + momentum * mean
        running_var[c] = (1 - momentum) * running_var[c] + momentum * var * n / (n - 1)


def _batch_norm_loop():
    """:func:`batch_norm_loop` compiled (None without numba), made on first use. Sums are
    reassociated (fastmath), so that they vectorize: on a CPU the NCHW training-mode
    ``F.batch_norm`` costs about four times as much, and SBN's discrete pass runs one per
    state BN at every step (``python -m lowbit.bench slb``). One thread: numba's threads
    would compete with the convolutions' for the cores."""
    return _numba(batch_norm_loop, fastmath=True)


def discrete_weight_loop(logits, values, scale, out):
    """``out[j] = scale · values[k]``, k the first index of the largest ``logits[:, j]``
    (a NaN counts as the largest), as ``logits.max(0).indices`` picks it; the product is
    rounded once to float32, as torch's. Compiled with numba on first use."""
    best = logits[0].copy()
    top = np.zeros(logits.shape[1], np.int64)
    for i in range(1, logits.shape[0]):
        for j in range(logits.shape[1]):
            v = logits[i, j]
            if v > best[j] or (v != v and best[j] == best[j]):
                best[j] = v
                top[j] = i
    for j in range(logits.shape[1]):
        out[j] = scale * values[top[j]]


def _discrete_weight_loop():
    """:func:`discrete_weight_loop` compiled."""
    return _numba(discrete_weight_loop)


def _compiled_fits(*tensors: torch.Tensor) -> bool:
    """Whether the compiled loops take these tensors: numba is there, and they are float32
    on the CPU."""
    return _batch_norm_loop() is not None and all(
        t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def _batch_fits(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether :func:`batch_norm_loop` takes this batch and these statistics and weights:
    float32 on the CPU, (N, C, H, W) contiguous, more than one value per channel (else
    ``F.batch_norm`` names the error)."""
    return (x.dim() == 4 and x.is_contiguous() and x.numel() > x.shape[1]
            and _compiled_fits(x, *others))


def _batch_norm_compiled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float, momentum: float, running_mean: torch.Tensor,
                         running_var: torch.Tensor) -> torch.Tensor:
    """:func:`batch_norm_loop` on ``x``, into a new tensor; the running statistics are
    updated in place."""
    out = torch.empty_like(x)
    n, c = x.shape[:2]
    _batch_norm_loop()(x.numpy().reshape(n, c, -1), weight.detach().numpy(),
                       bias.detach().numpy(), float(eps), float(momentum),
                       running_mean.numpy(), running_var.numpy(), out.numpy().reshape(n, c, -1))
    return out


class StateBatchNorm2d(_StateBatchNorm):
    """:class:`_StateBatchNorm` for (N, C, H, W) inputs."""
    _ndim = 4


class StateBatchNorm1d(_StateBatchNorm):
    """:class:`_StateBatchNorm` for (N, C) inputs."""
    _ndim = 2


# ----------------------------------------------------------------------------- model level
def slb_layers(model: nn.Module) -> list[tuple[str, _SLBWeight]]:
    """The SLB layers of ``model`` in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _SLBWeight)]


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set the softmax temperature of every SLB layer."""
    tau = check_temperature(tau)
    for _, m in slb_layers(model):
        m.temperature = tau


@contextlib.contextmanager
def use_state(model: nn.Module, state: State) -> Iterator[nn.Module]:
    """Within the block, every SLB layer and state BN of ``model`` uses ``state``."""
    _check_state(state)
    mods = [m for m in model.modules() if isinstance(m, (_SLBWeight, _StateBatchNorm))]
    old = [m.state for m in mods]
    for m in mods:
        m.state = state
    try:
        yield model
    finally:
        for m, s in zip(mods, old):
            m.state = s


@torch.no_grad()
def layer_gap(layer: _SLBWeight) -> float:
    """The layer's relative quantization gap ‖Ŵ − W̃‖ / ‖Ŵ‖ (0 when the softmax is one-hot)."""
    d = layer.discrete_weight()
    return float((d - layer.expected_weight()).norm() / d.norm())


@torch.no_grad()
def model_gap(model: nn.Module) -> float:
    """The quantization gap of all SLB weights of ``model`` together, as in :func:`layer_gap`."""
    num, den = 0.0, 0.0
    for _, m in slb_layers(model):
        d = m.discrete_weight()
        num += float(((d - m.expected_weight()) ** 2).sum())
        den += float((d ** 2).sum())
    if den == 0:
        raise ValueError("model has no SLB layers (convert it with lowbit.slb.convert)")
    return math.sqrt(num / den)


class ArgmaxTracker:
    """Follows every SLB weight's argmax through training (a reviewer's "is the commitment
    reversible?"). Call it after each optimizer step (``fit``'s ``on_step``); every
    ``every`` steps it records, in ``log``:

    - ``tau``: the temperature;
    - ``flips``: the fraction of weights whose argmax changed since the last record;
    - ``committed``: the fraction whose largest probability is at least ``threshold`` now;
    - ``switched``: of the weights that were committed at an earlier record, the fraction
      whose argmax has changed at least once since they first were.
    """

    def __init__(self, model: nn.Module, every: int = 10, threshold: float = 0.99) -> None:
        self.layers = [m for _, m in slb_layers(model)]
        if not self.layers:
            raise ValueError("model has no SLB layers (convert it with lowbit.slb.convert)")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        if not 0.5 < threshold < 1.0:
            raise ValueError(f"threshold must be a probability in (0.5, 1), got {threshold!r}")
        self.every, self.threshold = every, threshold
        self.prev = self._argmax()
        self.ever = self._pmax() >= threshold   # committed at some record so far
        self.switched = torch.zeros_like(self.ever)
        self.log: dict[str, list[float]] = {"tau": [], "flips": [], "committed": [],
                                            "switched": []}

    @torch.no_grad()
    def _argmax(self) -> torch.Tensor:
        return torch.cat([m.argmax().flatten() for m in self.layers])

    @torch.no_grad()
    def _pmax(self) -> torch.Tensor:
        return torch.cat([m.probabilities().amax(0).flatten() for m in self.layers])

    def __call__(self, step: int) -> None:
        if step % self.every:
            return
        a, committed = self._argmax(), self._pmax() >= self.threshold
        flipped = a != self.prev
        self.switched |= flipped & self.ever
        self.ever |= committed
        self.prev = a
        n_ever = int(self.ever.sum())
        self.log["tau"].append(float(self.layers[0].temperature))
        self.log["flips"].append(float(flipped.float().mean()))
        self.log["committed"].append(float(committed.float().mean()))
        self.log["switched"].append(float(self.switched.sum()) / n_ever if n_ever else 0.0)


@dataclass(frozen=True)
class TemperatureSchedule:
    """τ as a function of training progress p ∈ [0, 1].

    τ stays at ``start`` until ``begin``, moves to ``end`` by ``finish`` and stays there.
    ``kind``: ``"exp"`` (geometric: 1/τ grows by a constant factor per step, the paper's
    best), ``"cos"``, ``"linear"``, or ``"restarts"`` (``cycles`` exponential cycles, each
    starting again from ``start`` — SGDR-like, as a reviewer suggested).
    """
    kind: str = "exp"
    start: float = 1.0
    end: float = 0.001
    begin: float = 0.0
    finish: float = 1.0
    cycles: int = 3

    KINDS = ("exp", "cos", "linear", "restarts")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {self.kind!r}")
        check_temperature(self.start, "start temperature")
        check_temperature(self.end, "end temperature")
        if self.end > self.start:
            raise ValueError(f"an annealing schedule cools: end temperature {self.end} is "
                             f"above start temperature {self.start}")
        for name in ("begin", "finish"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be a fraction of training in [0, 1], got {v!r}")
        if self.finish <= self.begin:
            raise ValueError(f"the schedule ends (finish={self.finish}) before it begins "
                             f"(begin={self.begin}); finish must be later than begin")
        if self.kind == "restarts" and (not isinstance(self.cycles, int) or self.cycles < 1):
            raise ValueError(f"cycles must be a positive int, got {self.cycles!r}")

    def __call__(self, progress: float) -> float:
        if not math.isfinite(progress):
            raise ValueError(f"progress must be finite, got {progress!r}")
        s = min(max((progress - self.begin) / (self.finish - self.begin), 0.0), 1.0)
        a, b = self.start, self.end
        if self.kind == "restarts":
            if s >= 1.0:
                return b
            s = (s * self.cycles) % 1.0
        if self.kind in ("exp", "restarts"):
            return a * (b / a) ** s
        if self.kind == "cos":
            return b + (a - b) * (1 + math.cos(math.pi * s)) / 2
        return a + (b - a) * s


class Annealer:
    """Steps a model's temperature along a schedule: call ``step()`` once per epoch or
    once per iteration, ``total`` times in all (``fit``'s ``on_epoch``/``on_step`` hooks)."""

    def __init__(self, model: nn.Module, schedule: TemperatureSchedule, total: int) -> None:
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a positive number of steps, got {total!r}")
        if not slb_layers(model):
            raise ValueError("model has no SLB layers (convert it with lowbit.slb.convert)")
        self.model, self.schedule, self.total, self.count = model, schedule, total, 0
        set_temperature(model, self.temperature)

    @property
    def temperature(self) -> float:
        return self.schedule(self.count / self.total)

    def step(self, *_) -> float:
        self.count = min(self.count + 1, self.total)
        tau = self.temperature
        set_temperature(self.model, tau)
        return tau


# ----------------------------------------------------------------------------- gap and margins
@torch.no_grad()
def logit_margins(layer: _SLBWeight) -> torch.Tensor:
    """Each weight's logit margin m = a_k − max_{i≠k} a_i (k its argmax): how far its choice
    leads the runner-up, in logit units (the temperature divides it)."""
    top = layer.logits.detach().topk(2, dim=0).values
    return top[0] - top[1]


@torch.no_grad()
def gap_bound(model: nn.Module, tau: float | None = None) -> float:
    """An upper bound on :func:`model_gap` from the logit margins alone (the SLB reference
    page): a weight's gap ``|W̃ − Ŵ| = α·|Σ_i p_i (v_i − v_k)|`` ≤ α·2·(1 − p_k) and
    1 − p_k ≤ (2^b − 1)·exp(−m/τ), so ‖W̃ − Ŵ‖ ≤ ‖2α(2^b − 1)·exp(−m/τ)‖. At the layers'
    temperature unless ``tau`` is given."""
    num, den = 0.0, 0.0
    for _, m in slb_layers(model):
        t = m.temperature if tau is None else check_temperature(tau)
        e = (2 * m.alpha * (len(m.values) - 1) * torch.exp(-logit_margins(m) / t)).clamp(max=2 * m.alpha)
        num += float((e ** 2).sum())
        den += float((m.discrete_weight() ** 2).sum())
    if den == 0:
        raise ValueError("model has no SLB layers (convert it with lowbit.slb.convert)")
    return math.sqrt(num / den)


@torch.no_grad()
def gap_at(model: nn.Module, tau: float) -> float:
    """:func:`model_gap` if every SLB layer were at temperature ``tau`` (the layers' own
    temperatures are left as they were)."""
    tau = check_temperature(tau)
    layers = [m for _, m in slb_layers(model)]
    old = [m.temperature for m in layers]
    try:
        for m in layers:
            m.temperature = tau
        return model_gap(model)
    finally:
        for m, t in zip(layers, old):
            m.temperature = t


def temperature_for_gap(model: nn.Module, target: float, low: float = 1e-5, high: float = 1.0,
                        iters: int = 30) -> float:
    """The largest temperature in [low, high] at which the model's gap is at most ``target``
    (bisection on log τ; ``low`` when even that is too warm, ``high`` when it is cold enough)."""
    if not 0 < target:
        raise ValueError(f"target must be a positive gap, got {target!r}")
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low ≤ high, got {low!r}, {high!r}")
    if gap_at(model, high) <= target:
        return high
    lo, hi = math.log(low), math.log(high)
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap_at(model, math.exp(mid)) <= target else (lo, mid)
    return math.exp(lo)


@dataclass(frozen=True)
class GapSchedule:
    """A schedule that sets τ from the model instead of the clock: the gap may be at most
    ``start`` at the beginning and falls geometrically to ``end`` (as a fraction of training
    done, like :class:`TemperatureSchedule`). Every ``every`` steps the gap is checked, and
    when it is over the target τ becomes the largest temperature that brings it under; τ
    never exceeds ``tau_max`` and never warms up again (it only cools)."""
    start: float = 0.5
    end: float = 0.005
    every: int = 5
    tau_max: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.end <= self.start:
            raise ValueError(f"the gap target must fall: need 0 < end ≤ start, got {self.start}, {self.end}")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive number of steps, got {self.every!r}")
        check_temperature(self.tau_max, "tau_max")

    def target(self, progress: float) -> float:
        return self.start * (self.end / self.start) ** min(max(progress, 0.0), 1.0)


class GapAnnealer(Annealer):
    """Steps a model's temperature by a :class:`GapSchedule`, ``total`` steps in all (the
    same interface as :class:`Annealer`)."""

    def __init__(self, model: nn.Module, schedule: GapSchedule, total: int) -> None:
        self.tau = schedule.tau_max
        super().__init__(model, schedule, total)

    @property
    def temperature(self) -> float:
        return self.tau

    def step(self, *_) -> float:
        self.count = min(self.count + 1, self.total)
        if self.count % self.schedule.every == 0 or self.count == self.total:
            target = self.schedule.target(self.count / self.total)
            if gap_at(self.model, self.tau) > target:
                # the target falls slowly: look within a factor 2 first (8 halvings: 0.3%)
                low = self.tau / 2
                if gap_at(self.model, low) <= target:
                    tau = temperature_for_gap(self.model, target, low=low, high=self.tau, iters=8)
                else:
                    tau = temperature_for_gap(self.model, target, high=low)
                self.tau = min(self.tau, tau)
                set_temperature(self.model, self.tau)
        return self.tau


def convert(model: nn.Module, bits: int, act_bits: int | None = None, sbn: bool = True,
            temperature: float = 1.0, alpha: str = "learned", init: str = "random",
            seed: int | None = None, values: str = "even") -> nn.Module:
    """A copy of ``model`` for SLB: every conv/linear layer becomes an SLB layer with
    ``bits``-bit weights, every BatchNorm a state BN (``sbn=True``), and, with
    ``act_bits``, every ReLU is followed by :class:`lowbit.quant.ActQuant`.

    ``init='nearest'`` starts each weight's distribution at the value nearest to the
    model's trained weight; ``'random'`` draws the logits from N(0, 1) (``seed`` fixes them).
    ``values`` picks the value set (:data:`VALUE_SETS`).
    """
    bits = check_bits(bits, 1, MAX_BITS, "bits")
    value_set(bits, values)  # checks the set and the bits before anything is copied
    if act_bits is not None:
        check_bits(act_bits, 1, 32, "act_bits")
    if seed is not None:
        torch.manual_seed(seed)

    def slb_layer(name: str, m: nn.Module) -> nn.Module:
        kw = dict(bits=bits, temperature=temperature, alpha=alpha, init=init, weight=m.weight,
                  values=values)
        if getattr(m, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"SLB's conv layers pad with zeros; {name!r} pads with "
                             f"{m.padding_mode!r}")
        new = clone_layer(m, SLBConv2d, SLBLinear, **kw)
        if m.bias is not None:
            new.bias.data.copy_(m.bias.detach())
        return new

    @torch.no_grad()
    def state_bn(name: str, m: nn.Module) -> nn.Module:
        cls = StateBatchNorm2d if isinstance(m, nn.BatchNorm2d) else StateBatchNorm1d
        new = cls(m.num_features, m.eps, m.momentum)
        new.weight.copy_(m.weight)
        new.bias.copy_(m.bias)
        for s in ("continuous", "discrete"):
            new.statistics(s)[0].copy_(m.running_mean)
            new.statistics(s)[1].copy_(m.running_var)
        return new

    model = quant.replace_layers(model, slb_layer, load_state=False)
    if sbn:
        bns = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
        model = quant.replace_layers(model, state_bn, bns, copy_model=False, load_state=False)
    if act_bits is not None:
        quant.quantize_activations(model, act_bits)
    return model


class _PassDone(Exception):
    """Raised by a hook to end the discrete pass once nothing after it keeps statistics."""


def _keeps_statistics(m: nn.Module) -> bool:
    """Whether a training-mode forward of ``m`` may change its own buffers (a BatchNorm's,
    a state BN's, an activation quantizer's running range, any module of unknown kind that
    has buffers); an SLB layer's value set never changes."""
    return not isinstance(m, _SLBWeight) and next(m.buffers(recurse=False), None) is not None


#: Per model, the modules that keep statistics and how many calls of them one forward
#: makes (the discrete pass stops after the last of them).
_PASS_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def update_discrete_stats(model: nn.Module, x: torch.Tensor) -> None:
    """Run ``x`` through the discrete network in training mode without gradients (no graph
    is recorded): the discrete statistics of every state BN see the batch (the second pass
    of SBN), and so does every other module that keeps statistics (an activation
    quantizer's running range).

    The pass stops right after the last call of such a module: what follows it (often the
    classifier, and its discrete weight) changes no statistic. The first pass of a model
    runs to its end and counts those calls, a module called twice counted twice; the count
    is made again whenever the model's modules change. (A model whose number of such calls
    depends on its input would need every pass to run to the end: call ``model(x)`` under
    :func:`use_state` instead.) Every module ends in the mode and the state it was in.
    """
    modules = list(model.modules())
    keepers = [m for m in modules if _keeps_statistics(m)]
    resting = [m for m in modules if not m.training]  # put back in evaluation mode after
    key = tuple(map(id, keepers))
    plan = _PASS_PLANS.get(model)
    calls = [0]
    if plan is None or plan[0] != key:
        def hook(*_):
            calls[0] += 1
    else:
        def hook(*_):
            calls[0] += 1
            if calls[0] == plan[1]:
                raise _PassDone
    handles = [m.register_forward_hook(hook) for m in keepers]
    try:
        for m in resting:
            m.training = True
        with use_state(model, "discrete"):
            model(x)
        _PASS_PLANS[model] = (key, calls[0])
    except _PassDone:
        pass
    finally:
        for h in handles:
            h.remove()
        for m in resting:
            m.training = False


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, state: State = "discrete",
                   max_batches: int | None = None) -> nn.Module:
    """Post-training BN recalibration (the cheaper alternative to SBN a reviewer asked
    about): reset the running statistics and re-estimate them, as a cumulative average over
    ``batches``, with the network in ``state``. Works on state BNs and plain BatchNorm."""
    _check_state(state)
    if max_batches is not None and (isinstance(max_batches, bool) or
                                    not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if isinstance(batches, torch.Tensor) or not hasattr(batches, "__iter__"):
        raise ValueError("batches must be an iterable of input batches (or (x, y) pairs), "
                         f"got {type(batches).__name__}")
    bns = [m for m in model.modules()
           if isinstance(m, (_StateBatchNorm, nn.modules.batchnorm._BatchNorm))]
    if not bns:
        raise ValueError("model has no batch normalization to recalibrate")
    batches = iter(batches)
    first = next(batches, None)
    x0 = first[0] if isinstance(first, (tuple, list)) and first else first
    if not isinstance(x0, torch.Tensor):
        raise ValueError("batches must yield input tensors or (x, y) pairs; got "
                         + ("no batch at all" if first is None else type(x0).__name__)
                         + " (the statistics were left as they were)")
    batches = itertools.chain([first], batches)
    saved = [m.momentum for m in bns]
    for m in bns:
        if isinstance(m, _StateBatchNorm):
            m.reset_statistics("discrete" if state == "auto" else state)
        else:
            m.reset_running_stats()
        m.momentum = None
    was = model.training
    model.train()
    device = next(model.parameters()).device
    try:
        with use_state(model, "discrete" if state == "auto" else state):
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                model((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)
    return model


@torch.no_grad()
def codes(layer: _SLBWeight) -> tuple[torch.Tensor, float]:
    """The layer's integer codes k ∈ {0 … n − 1} (uint8; n = 2^b values, or 2^b − 1 for the
    value set with zero) and the scale: weight = scale · (2k / (n − 1) − 1)."""
    return layer.argmax().to(torch.uint8), float(layer.alpha)


@torch.no_grad()
def export(model: nn.Module) -> nn.Module:
    """An ordinary model whose conv/linear weights are the discrete (argmax) weights and
    whose BatchNorms carry the discrete statistics: what the SLB model computes in
    evaluation mode, with no logits left. Each exported layer records ``weight_bits``
    (for :func:`lowbit.quant.model_size_bits`) and its integer ``codes``."""
    def plain_layer(name: str, m: _SLBWeight) -> nn.Module:
        k, scale = codes(m)
        new = clone_layer(m)
        new.weight.copy_(m.discrete_weight())
        if m.bias is not None:
            new.bias.copy_(m.bias)
        new.weight_bits = m.bits
        new.register_buffer("codes", k)
        new.scale = scale
        return new

    def plain_bn(name: str, m: _StateBatchNorm) -> nn.Module:
        cls = nn.BatchNorm2d if isinstance(m, StateBatchNorm2d) else nn.BatchNorm1d
        new = cls(m.num_features, m.eps, m.momentum)
        new.weight.copy_(m.weight)
        new.bias.copy_(m.bias)
        mean, var = m.statistics("discrete")
        new.running_mean.copy_(mean)
        new.running_var.copy_(var)
        return new

    out = quant.replace_layers(model, plain_layer, slb_layers(model), load_state=False)
    bns = [(n, m) for n, m in out.named_modules() if isinstance(m, _StateBatchNorm)]
    out = quant.replace_layers(out, plain_bn, bns, copy_model=False, load_state=False)
    return out.eval()


def parameter_memory(model: nn.Module) -> int:
    """Bytes of the model's trainable parameters (what an optimizer also keeps state for)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
