"""FQT: fully quantized training (Chen et al., NeurIPS 2020).

Quantization-aware training (QAT) quantizes the forward pass (activations and weights at 8
bits, deterministic) and keeps the backward pass in full precision. Fully quantized training
(FQT) also quantizes the output gradient ``∇H`` (N samples × D features) of every layer, with
**stochastic** rounding, before it is used (formulas and the official code's constants: the
FQT reference page, ``book/fqt/reference.md``)::

    activation gradient:  ∇X = Q_b(∇H) · W         (b bits: the quantizer under study)
    weight gradient:      ∇W = Q_8(∇H)ᵀ · X        (8 bits, as in the official code: on the
                                                   per-tensor grid with PT, one range per
                                                   column with PSQ and BHQ)

Stochastic rounding makes ``E[Q(∇H)] = ∇H``, so the FQT gradient is an unbiased estimate of
the QAT gradient; only its variance grows. Three gradient quantizers, each a function of a
tensor, a bit-width and an optional ``torch.Generator``, returning the dequantized tensor:

- :func:`quantize_pt` — per tensor: one grid for all of ``∇H``, holding zero exactly, as in
  the official code (``zero_code=False``: over [min, max], with no zero code).
- :func:`quantize_psq` — per sample: one range per row.
- :func:`quantize_bhq` — block Householder: rows sorted by range, each large row grouped
  with small rows (the official rule), scaled and reflected so that its range is spread
  over its group, then quantized per row and transformed back (:func:`bhq_transform`).

The parts, each a module: ``quantizers`` (grids, rounding, the three quantizers),
``kernel`` (the compiled CPU loop), ``layers`` (the QAT/FQT layers),
``measure`` (codes, bounds, gradient bias and variance), ``shadow_free`` (training
with the weights stored on a grid, no full-precision copy).
"""
from .quantizers import (FORWARD_BITS, GRAD_BITS, PT_VARIANTS, QUANTIZERS, BHQPlan,
                         as_rows, bhq_groups, bhq_plan, bhq_transform, check_grad_bits,
                         check_quantizer, code_scales, dequantize, grid, householder,
                         householder_max, quantize_bhq, quantize_copies, quantize_gradient,
                         quantize_psq, quantize_pt, reflect, reflect_loop, rows_on_grid, sr_codes,
                         zero_code_grid)
from .kernel import (Workspace, can_compile, column_block, column_ranges, compiled, order_key,
                     quantize_copies_compiled, round_columns, round_row, row_ranges, sr_loop)
from .layers import (FQTConv2d, FQTFunction, FQTLinear, QuantizedBackward, backward_copies,
                     check_settings, configure, convert, fqt_layer_names, fqt_layers, forward_quant, wrap)
from .shadow_free import GridSGD, on_grid
from .measure import (bins_used, codes, gradient_statistics, layer_gradients,
                      network_variance, output_gradients, output_noise, propagation_gain,
                      sampling_variance, variance_bound)

__all__ = ["FORWARD_BITS", "GRAD_BITS", "PT_VARIANTS", "QUANTIZERS", "BHQPlan", "as_rows",
           "bhq_groups", "bhq_plan", "bhq_transform", "check_grad_bits", "check_quantizer",
           "code_scales", "dequantize", "grid", "householder", "householder_max",
           "quantize_bhq", "quantize_copies", "quantize_gradient", "quantize_psq",
           "quantize_pt", "reflect", "reflect_loop", "rows_on_grid", "sr_codes", "zero_code_grid", "Workspace",
           "can_compile", "compiled", "quantize_copies_compiled", "sr_loop", "round_row",
           "round_columns", "order_key", "row_ranges", "column_ranges", "column_block", "FQTConv2d",
           "FQTFunction", "FQTLinear", "QuantizedBackward", "backward_copies", "check_settings", "configure",
           "convert", "wrap",
           "fqt_layers", "fqt_layer_names", "forward_quant", "bins_used", "codes", "gradient_statistics",
           "layer_gradients", "output_gradients", "variance_bound", "GridSGD", "on_grid", "network_variance", "output_noise",
           "propagation_gain", "sampling_variance"]
