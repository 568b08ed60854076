"""Measuring FQT: the codes a quantizer uses, its variance bound, and the bias and variance
of the FQT weight gradient around the QAT gradient on a real model."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterable, Iterator

import torch
from torch import nn

from ..train import loss_and_correct
from .layers import FQTLayer, configure, fqt_layer_names
from .quantizers import SCOPE, as_rows, check_grad_bits, check_quantizer, grid, \
    rows_on_grid, sr_codes
from ..quant import dither

__all__ = ["codes", "bins_used", "variance_bound", "output_gradients", "layer_gradients",
           "gradient_statistics", "network_variance", "propagation_gain", "output_noise",
           "sampling_variance"]


@torch.no_grad()
def codes(g: torch.Tensor, bits: int, quantizer: str = "pt",
          generator: torch.Generator | None = None) -> torch.Tensor:
    """The integer codes (0 … 2^b − 1, as floats, shaped (N, D)) that ``quantizer`` gives
    the rows of ``g`` — in the transformed domain for BHQ."""
    x = as_rows(g)
    b = check_grad_bits(bits)
    y, lo, span, _ = rows_on_grid(x, check_quantizer(quantizer), b)
    return sr_codes(y - lo, span, b, dither(y, generator))


@torch.no_grad()
def bins_used(g: torch.Tensor, bits: int, quantizer: str = "pt",
              generator: torch.Generator | None = None) -> float:
    """Mean over rows of the fraction of the 2^b codes a row's quantized values use (in the
    transformed domain for BHQ): how much of the grid the quantizer puts to work."""
    c = codes(g, bits, quantizer, generator)
    used = [torch.unique(row).numel() for row in c]
    return sum(used) / (len(used) * 2 ** check_grad_bits(bits))


def variance_bound(g: torch.Tensor, bits: int, quantizer: str = "pt") -> float:
    """The variance bound of the quantized gradient (summed over entries; the FQT reference
    page): each entry's stochastic rounding has variance at most Δ²/4, so per tensor
    N·D·Δ²/4 (Δ = span/B of the tensor's grid), per sample Σᵢ D·Δᵢ²/4."""
    x = as_rows(g)
    b = check_grad_bits(bits)
    if quantizer not in ("pt", "pt_minmax", "psq"):
        raise ValueError(f"the bound is for 'pt', 'pt_minmax' or 'psq', got {quantizer!r}")
    span = grid(x, SCOPE[quantizer], b)[1]
    return float((x.shape[1] * span.expand(x.shape[0], 1) ** 2).sum()) / (4 * (2 ** b - 1) ** 2)


@contextlib.contextmanager
def _training_pass(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` is in training mode, so BatchNorm uses the batch's
    statistics as it does while training (its backward mixes each channel: the gradients
    FQT quantizes are dense, not the mostly-zero ones of an evaluation-mode pass); the
    running statistics and the mode are restored afterwards. Repeated passes over the same
    batch see the same forward pass."""
    was = model.training
    saved = [b.detach().clone() for b in model.buffers()]
    model.train()
    try:
        yield model
    finally:
        with torch.no_grad():
            for b, old in zip(model.buffers(), saved):
                b.copy_(old)
        model.train(was)


def output_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """The output gradient ∇H of every FQT layer for the cross-entropy on (x, y), in QAT
    mode (full precision) with BatchNorm in training mode (``_training_pass``): the
    tensors FQT quantizes during training."""
    grads: dict[str, torch.Tensor] = {}
    hooks = [m.register_full_backward_hook(
        lambda mod, gin, gout, name=n: grads.__setitem__(name, gout[0].detach().clone()))
        for n, m in model.named_modules() if isinstance(m, FQTLayer)]
    try:
        with _settings_kept(model), _training_pass(model), warnings.catch_warnings():
            configure(model, mode="qat")
            # the first layer's input needs no gradient: fine
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            model.zero_grad(set_to_none=True)
            loss_and_correct(model(x), y)[0].backward()
    finally:
        for h in hooks:
            h.remove()
    return {n: grads[n] for n, m in model.named_modules() if n in grads}


def layer_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of the cross-entropy on (x, y) for each FQT layer's weight, with
    BatchNorm in training mode as during training (``_training_pass``)."""
    with _training_pass(model):
        model.zero_grad(set_to_none=True)
        loss_and_correct(model(x), y)[0].backward()
    return {n: m.weight.grad.detach().clone() for n, m in model.named_modules()
            if isinstance(m, FQTLayer)}


def _check_draws(draws: object) -> int:
    if not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws must be an int ≥ 2, got {draws!r}")
    return draws


@contextlib.contextmanager
def _settings_kept(model: nn.Module) -> Iterator[list]:
    """Within the block the FQT layers' settings may change; they are restored after it."""
    layers = [m for m in model.modules() if isinstance(m, FQTLayer)]
    saved = [(m.mode, m.quantizer, m.grad_bits, m.generator) for m in layers]
    try:
        yield layers
    finally:
        for m, (mode, q, b, gen) in zip(layers, saved):
            m.mode, m.quantizer, m.grad_bits, m.generator = mode, q, b, gen


def network_variance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, quantizer: str,
                     grad_bits: int, draws: int = 30, seed: int = 0,
                     only: Iterable[str] | None = None) -> float:
    """The variance the gradient quantization adds to the whole network's weight gradient on
    one batch: Σ over every weight-gradient entry of every FQT layer of its variance over
    ``draws`` stochastic-rounding draws. With ``only`` (layer names) just those layers
    quantize their output gradient; the others keep QAT's full-precision backward (one
    layer's term of Theorem 2's sum over layers)."""
    draws = _check_draws(draws)
    names = fqt_layer_names(model)
    chosen = set(names if only is None else only)
    if not chosen <= set(names):
        raise ValueError(f"no FQT layer(s) {sorted(chosen - set(names))}; the model has {names}")
    with _settings_kept(model):
        configure(model, mode="qat", quantizer=quantizer, grad_bits=grad_bits,
                  generator=torch.Generator(device=x.device).manual_seed(seed))
        for n, m in model.named_modules():
            if n in chosen:
                m.mode = "fqt"
        s1 = s2 = None
        for _ in range(draws):
            g = torch.cat([t.flatten() for t in layer_gradients(model, x, y).values()]).double()
            s1 = g if s1 is None else s1 + g
            s2 = g * g if s2 is None else s2 + g * g
    mean = s1 / draws
    return float(((s2 - draws * mean ** 2) / (draws - 1)).clamp(min=0).sum())


def propagation_gain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str,
                     iters: int = 30, seed: int = 0) -> float:
    """λ_max(γᵀγ) for layer ``name``: γ is the linear map from a change of the layer's output
    gradient ∇H to the change of every weight gradient it reaches (its own and those of the
    layers below, through QAT's backward, BatchNorm in training mode). Theorem 2 bounds a
    layer's share of the gradient variance by λ_max(γᵀγ) times the variance of its
    quantized ∇H. Power iteration, ``iters`` steps (γᵀ by double backward)."""
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, FQTLayer))
    if name not in layers:
        raise ValueError(f"no FQT layer {name!r}; the model has {sorted(layers)}")
    weights = [m.weight for m in layers.values()]
    captured = {}
    hook = layers[name].register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    with _settings_kept(model), _training_pass(model):
        configure(model, mode="qat")
        try:
            model(x)
        finally:
            hook.remove()
        h = captured["h"]
        reached = [w for w, g in zip(weights, torch.autograd.grad(
            h, weights, torch.ones_like(h), retain_graph=True, allow_unused=True))
            if g is not None]
        gen = torch.Generator(device=x.device).manual_seed(seed)
        v = torch.randn(h.shape, generator=gen, device=x.device, dtype=h.dtype)
        lam = 0.0
        for _ in range(iters):
            v = (v / v.norm()).requires_grad_(True)
            jv = torch.autograd.grad(h, reached, v, retain_graph=True, create_graph=True)
            lam = float(sum((t.detach() ** 2).sum() for t in jv))
            v = torch.autograd.grad(jv, v, [t.detach() for t in jv], retain_graph=True)[0]
    return lam


def output_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str,
                 quantizer: str, grad_bits: int, draws: int = 30, seed: int = 0
                 ) -> tuple[float, float]:
    """The variance (summed over entries) of the two quantized copies of layer ``name``'s
    output gradient on one batch: the ``grad_bits`` copy that flows to the layer below (0 for
    the first layer, which makes none) and the 8-bit copy of its weight gradient."""
    from .layers import backward_copies
    from .quantizers import quantize_copies
    draws = _check_draws(draws)
    names = fqt_layer_names(model)
    if name not in names:
        raise ValueError(f"no FQT layer {name!r}; the model has {names}")
    g = output_gradients(model, x, y)[name]
    rows = as_rows(g)
    copies = backward_copies(check_quantizer(quantizer), check_grad_bits(grad_bits),
                             need_input_grad=name != names[0])
    gen = torch.Generator(device=x.device).manual_seed(seed)
    s1 = [torch.zeros_like(rows, dtype=torch.float64) for _ in copies]
    s2 = [torch.zeros_like(rows, dtype=torch.float64) for _ in copies]
    for _ in range(draws):
        for i, q in enumerate(quantize_copies(rows, copies, gen)):
            s1[i] += q
            s2[i] += q.double() ** 2
    var = [float(((b - draws * (a / draws) ** 2) / (draws - 1)).clamp(min=0).sum())
           for a, b in zip(s1, s2)]
    return (var[0], var[1]) if len(copies) == 2 else (0.0, var[0])


def sampling_variance(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                      ) -> float:
    """The variance of the QAT weight gradient across mini-batches (summed over every
    weight-gradient entry of every FQT layer): Theorem 2's first term, the variance SGD
    has anyway. At least two batches."""
    gs = []
    with _settings_kept(model):
        configure(model, mode="qat")
        for x, y in batches:
            gs.append(torch.cat([t.flatten() for t in layer_gradients(model, x, y).values()]).double())
    if len(gs) < 2:
        raise ValueError(f"the variance across batches needs at least 2 batches, got {len(gs)}")
    return float(torch.stack(gs).var(0).sum())


def gradient_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, quantizer: str,
                        grad_bits: int, draws: int = 50, seed: int = 0) -> dict[str, dict]:
    """Bias and variance of the FQT weight gradient around the QAT gradient, per layer, over
    ``draws`` stochastic-rounding draws for one batch. Returns, per layer: ``bias`` (‖mean
    of the draws − QAT‖ / ‖QAT‖), ``variance`` (Σ over entries of the sample variance),
    ``qat_norm2`` (‖QAT gradient‖²) and ``bias_se`` (the bias expected from noise alone,
    √(variance/draws)/‖QAT‖). The model's settings are restored afterwards."""
    draws = _check_draws(draws)
    with _settings_kept(model):
        configure(model, mode="qat")
        ref = layer_gradients(model, x, y)
        configure(model, mode="fqt", quantizer=quantizer, grad_bits=grad_bits,
                  generator=torch.Generator(device=x.device).manual_seed(seed))
        s1 = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in ref.items()}
        s2 = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in ref.items()}
        for _ in range(draws):
            for n, g in layer_gradients(model, x, y).items():
                s1[n] += g
                s2[n] += g.double() ** 2
    out = {}
    for n, g in ref.items():
        mean = s1[n] / draws
        var = float(((s2[n] - draws * mean ** 2) / (draws - 1)).clamp(min=0).sum())
        norm = float(g.double().norm())
        out[n] = dict(bias=float((mean - g).norm()) / norm, variance=var,
                      qat_norm2=norm ** 2, bias_se=math.sqrt(var / draws) / norm)
    return out
