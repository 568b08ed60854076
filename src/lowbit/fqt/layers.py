"""Layers with QAT's 8-bit forward and a QAT or FQT backward, as ``autograd.Function``s."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_extra_state
from ..quant import clone_layer, quantize_asymmetric, quantize_symmetric, \
    replace_layers
from .kernel import Workspace, can_compile, quantize_copies_compiled
from .quantizers import FORWARD_BITS, as_rows, check_grad_bits, check_quantizer, \
    quantize_copies

__all__ = ["FQTFunction", "FQTLinear", "FQTConv2d", "QuantizedBackward", "check_settings",
           "configure", "convert", "fqt_layer_names",
           "wrap", "backward_copies"]


def forward_quant(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QAT's forward quantization: 8-bit activations (per tensor, asymmetric) and 8-bit
    weights (symmetric), both deterministic."""
    return quantize_asymmetric(x, FORWARD_BITS), quantize_symmetric(w, FORWARD_BITS)


def backward_copies(quantizer: str, bits: int, need_input_grad: bool
                    ) -> tuple[tuple[int, str], ...]:
    """The quantized copies of ∇H a layer's FQT backward makes: ``bits`` with
    ``quantizer`` for the input gradient (unless none is needed: the first layer), and
    an 8-bit copy for the weight gradient — on the same per-tensor grid with PT, one range
    per column (feature) with the per-sample quantizers, as in the official code."""
    wt = (FORWARD_BITS, quantizer if quantizer.startswith("pt") else "column")
    return ((bits, quantizer), wt) if need_input_grad else (wt,)


class FQTFunction(torch.autograd.Function):
    """y = op(Q8(x), Q8(w)) + b. The backward quantizes ∇H (:func:`backward_copies`), one
    uniform draw for both copies (each stays unbiased), and passes the results straight
    through the forward quantizers::

        ∇X = Q_b(∇H) · W,     ∇W = Q_8(∇H)ᵀ · X
    """

    @staticmethod
    def forward(ctx, x, w, bias, layer):
        xq, wq = forward_quant(x, w) if layer.forward_bits else (x, w)
        ctx.save_for_backward(xq, wq)
        ctx.layer = layer
        return layer._op(xq, wq, bias)

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq = ctx.saved_tensors
        layer = ctx.layer
        g_act = g_wt = grad_out
        if layer.mode == "fqt":
            rows = as_rows(grad_out, "output gradient")
            copies = backward_copies(layer.quantizer, layer.grad_bits, ctx.needs_input_grad[0])
            work = layer._work(rows)
            if work is not None and can_compile(rows, copies):  # the same numbers, one pass
                q = quantize_copies_compiled(rows, copies, layer.generator, work)
            else:
                out = [work.q, work.d][:len(copies)] if work is not None else None
                u = work.dither(layer.generator) if work is not None else None
                q = quantize_copies(rows, copies, layer.generator if u is None else None,
                                    u=u, out=out)
            g_wt = q[-1].reshape(grad_out.shape)
            g_act = q[0].reshape(grad_out.shape) if len(q) == 2 else None
        gx = layer._grad_input(xq.shape, wq, g_act) if ctx.needs_input_grad[0] else None
        gw = layer._grad_weight(xq, wq.shape, g_wt)
        gb = layer._grad_bias(g_wt) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class FQTLayer:
    """Shared settings of the QAT/FQT layers, kept in the state dict (the generator is not:
    set it again with :func:`configure`)."""

    #: The bits of QAT's forward quantization (8), or None, where the input and weight are
    #: used as they come (in :class:`QuantizedBackward` the wrapped layer and ActQuant
    #: quantize them).
    forward_bits: int | None = FORWARD_BITS

    def _set_fqt(self, mode: str, quantizer: str, grad_bits: int) -> None:
        configure(self, mode, quantizer, grad_bits)
        self.generator: torch.Generator | None = None
        self._workspace: Workspace | None = None

    def _work(self, rows: torch.Tensor) -> Workspace | None:
        """The backward's reusable memory for output gradients shaped like ``rows`` (CPU)."""
        if rows.device.type != "cpu":
            return None
        if self._workspace is None or self._workspace.key != (rows.shape, rows.dtype,
                                                              rows.device):
            self._workspace = Workspace(rows)
        return self._workspace

    def get_extra_state(self) -> dict:  # settings that change the gradients: in the state dict
        return {"mode": self.mode, "quantizer": self.quantizer, "grad_bits": self.grad_bits}

    def set_extra_state(self, extra: dict) -> None:
        check_extra_state(self, extra, ("mode", "quantizer", "grad_bits"))
        configure(self, extra["mode"], extra["quantizer"], extra["grad_bits"])

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", mode={self.mode}, quantizer={self.quantizer}, "
                                       f"grad_bits={self.grad_bits}")


class FQTLinear(FQTLayer, nn.Linear):
    """Linear layer with 8-bit forward and a QAT or FQT backward."""

    def __init__(self, *args, mode: str = "fqt", quantizer: str = "psq", grad_bits: int = 8,
                 **kw) -> None:
        super().__init__(*args, **kw)
        self._set_fqt(mode, quantizer, grad_bits)

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def _grad_input(self, shape, w, g):
        return g @ w

    def _grad_weight(self, x, shape, g):
        return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    def _grad_bias(self, g):
        return g.reshape(-1, g.shape[-1]).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FQTFunction.apply(x, self.weight, self.bias, self)


class FQTConv2d(FQTLayer, nn.Conv2d):
    """Conv2d with 8-bit forward and a QAT or FQT backward."""

    def __init__(self, *args, mode: str = "fqt", quantizer: str = "psq", grad_bits: int = 8,
                 **kw) -> None:
        super().__init__(*args, **kw)
        self._set_fqt(mode, quantizer, grad_bits)

    def _op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _grad_input(self, shape, w, g):
        return torch.nn.grad.conv2d_input(shape, w, g, self.stride, self.padding,
                                          self.dilation, self.groups)

    def _grad_weight(self, x, shape, g):
        return torch.nn.grad.conv2d_weight(x, shape, g, self.stride, self.padding,
                                           self.dilation, self.groups)

    def _grad_bias(self, g):
        return g.sum(dim=(0, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FQTFunction.apply(x, self.weight, self.bias, self)


class QuantizedBackward(FQTLayer, nn.Module):
    """FQT's backward for any layer whose forward is ``op(x, weight) + bias``: a conv or
    linear layer, an STE-QAT layer (its fake-quantized weight), an SLB layer (its expected
    or discrete weight). The forward is the wrapped layer's, unchanged (activations are
    quantized by the model's :class:`lowbit.quant.ActQuant` modules); the backward
    quantizes the output gradient as :class:`FQTFunction` does, and the weight gradient
    flows on into whatever made the weight (SLB's logits, the STE's latent weight).
    :func:`wrap` puts one around every such layer of a model, for low-bit weights,
    activations and gradients together."""

    forward_bits = None

    def __init__(self, layer: nn.Module, mode: str = "fqt", quantizer: str = "psq",
                 grad_bits: int = 8) -> None:
        super().__init__()
        if not hasattr(layer, "in_channels") and not hasattr(layer, "in_features"):
            raise ValueError(f"QuantizedBackward wraps a conv or linear layer (or an SLB or "
                             f"QAT one), got {type(layer).__name__}")
        self.layer = layer
        self._conv = hasattr(layer, "in_channels")
        self._set_fqt(mode, quantizer, grad_bits)

    def weight_used(self) -> torch.Tensor:
        """The weight the wrapped layer's forward would use now."""
        m = self.layer
        if hasattr(m, "effective_weight"):  # SLB: expectation or argmax, by state
            return m.effective_weight()
        if hasattr(m, "quantized_weight"):  # STE-QAT
            return m.quantized_weight()
        return m.weight

    def _op(self, x, w, b):
        m = self.layer
        if self._conv:
            return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w, b)

    def _grad_input(self, shape, w, g):
        m = self.layer
        if self._conv:
            return torch.nn.grad.conv2d_input(shape, w, g, m.stride, m.padding, m.dilation,
                                              m.groups)
        return g @ w

    def _grad_weight(self, x, shape, g):
        m = self.layer
        if self._conv:
            return torch.nn.grad.conv2d_weight(x, shape, g, m.stride, m.padding, m.dilation,
                                               m.groups)
        return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    def _grad_bias(self, g):
        return g.sum(dim=(0, 2, 3)) if self._conv else g.reshape(-1, g.shape[-1]).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FQTFunction.apply(x, self.weight_used(), self.layer.bias, self)


def wrap(model: nn.Module, quantizer: str = "psq", grad_bits: int = 8,
         mode: str = "fqt") -> nn.Module:
    """A copy of ``model`` with :class:`QuantizedBackward` around every conv, linear, SLB
    and STE-QAT layer: the forward stays, the output gradients are quantized."""
    check_settings(mode, quantizer, grad_bits)  # before copying anything
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) or hasattr(m, "effective_weight")]
    return replace_layers(model, lambda name, m: QuantizedBackward(m, mode, quantizer,
                                                                   grad_bits),
                          layers, load_state=False)


def fqt_layers(module: nn.Module) -> list[nn.Module]:
    """The QAT/FQT layers in ``module`` (or the layer itself)."""
    return [module] if isinstance(module, FQTLayer) else \
        [m for m in module.modules() if isinstance(m, FQTLayer)]


def fqt_layer_names(module: nn.Module) -> list[str]:
    """The names of the QAT/FQT layers in ``module``, in registration (forward) order."""
    return [n for n, m in module.named_modules() if isinstance(m, FQTLayer)]


def check_settings(mode: str | None = None, quantizer: str | None = None,
                   grad_bits: int | None = None) -> int | None:
    """Raise a ValueError unless the given FQT settings are valid (None: not given);
    return ``grad_bits`` as an int."""
    if mode is not None and mode not in ("qat", "fqt"):
        raise ValueError(f"mode must be 'qat' or 'fqt', got {mode!r}")
    if quantizer is not None:
        check_quantizer(quantizer)
    return None if grad_bits is None else check_grad_bits(grad_bits)


def configure(module: nn.Module, mode: str | None = None, quantizer: str | None = None,
              grad_bits: int | None = None, generator: torch.Generator | None = None) -> None:
    """Set the mode (``"qat"`` or ``"fqt"``), gradient quantizer and bits of every FQT layer
    in ``module`` (or of the layer itself); arguments left as None are kept. Everything is
    checked (:func:`check_settings`) before anything is set."""
    grad_bits = check_settings(mode, quantizer, grad_bits)
    for m in fqt_layers(module):
        if mode is not None:
            m.mode = mode
        if quantizer is not None:
            m.quantizer = quantizer
        if grad_bits is not None:
            m.grad_bits = grad_bits
        if generator is not None:
            m.generator = generator


def convert(model: nn.Module, mode: str = "fqt", quantizer: str = "psq",
            grad_bits: int = 8) -> nn.Module:
    """A copy of ``model`` whose conv and linear layers are :class:`FQTConv2d` /
    :class:`FQTLinear` in ``mode`` (QAT: full-precision backward; FQT: quantized)."""
    check_settings(mode, quantizer, grad_bits)  # before copying anything
    kw = dict(mode=mode, quantizer=quantizer, grad_bits=grad_bits)

    def fqt_layer(name: str, m: nn.Module) -> nn.Module:
        return clone_layer(m, FQTConv2d, FQTLinear, **kw)

    return replace_layers(model, fqt_layer)
