"""lowbit: the package behind the book *Training low-bit neural networks*.

Modules: :mod:`lowbit.quant` (uniform quantizers, STE, post-training quantization),
:mod:`lowbit.data` (offline data sets), :mod:`lowbit.models`, :mod:`lowbit.train`,
:mod:`lowbit.plots` and :mod:`lowbit.bench` (``python -m lowbit.bench``).
"""
__version__ = "0.1.0"

import torch as _torch

# Weights pulled towards a zero grid point (PSGD, pruning) shrink geometrically, and their
# products with activations become subnormal floats, which make CPU convolutions about ten
# times slower, in training and in evaluation alike. Flushing subnormals to zero changes
# no result that matters here; it is set once, for every user of the package.
_torch.set_flush_denormal(True)
