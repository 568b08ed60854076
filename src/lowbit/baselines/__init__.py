"""Baselines the reviewers named, each against the method it challenges (Part I's
"Against stronger baselines" pages, and Part II's "Latent weights"):

- ``lsq`` — LSQ, learned step size QAT (Esser et al. 2020);
- ``clipping`` — ACIQ, analytical clipping with bias correction (Banner et al. 2019);
- ``floats`` — AdaptivFloat, a float format with a per-layer exponent bias
  (Tambe et al. 2020);
- ``pruning`` — gradual magnitude pruning (Zhu & Gupta 2017) and SNIP (Lee et al. 2019);
- ``latent`` — Bop (Helwegen et al. 2019) and a quantization loss, at 1 bit (Part II).
"""
from .clipping import aciq_quantize, bias_correct, laplace_clip
from .latent import Bop, binary_weights, quantization_loss
from .floats import adaptivfloat_values, quantize_adaptivfloat
from .lsq import (LSQAct, LSQConv2d, LSQFunction, LSQLinear, initial_step, lsq_quantize,
                  lsq_range, prepare_lsq)
from .pruning import (GradualPruner, apply_masks, check_sparsity, cubic_sparsity, layer_masks,
                      snip_masks)

__all__ = ["aciq_quantize", "bias_correct", "laplace_clip", "adaptivfloat_values",
           "quantize_adaptivfloat", "LSQAct", "LSQConv2d", "LSQFunction", "LSQLinear",
           "initial_step", "lsq_quantize", "lsq_range", "prepare_lsq", "GradualPruner",
           "apply_masks", "check_sparsity", "cubic_sparsity", "layer_masks", "snip_masks",
           "Bop", "binary_weights", "quantization_loss"]
