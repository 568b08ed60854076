"""lowbit: the package behind the book *Training low-bit neural networks*.

Modules: :mod:`lowbit.quant` (uniform quantizers, STE, post-training quantization),
:mod:`lowbit.data` (offline data sets), :mod:`lowbit.models`, :mod:`lowbit.train`,
:mod:`lowbit.plots`, :mod:`lowbit.optim` and :mod:`lowbit.bench` (``python -m lowbit.bench``); the methods in
:mod:`lowbit.psgd`, :mod:`lowbit.slb` and :mod:`lowbit.fqt`, and the reviewers' baselines in
:mod:`lowbit.baselines`.
"""
__version__ = "0.1.0"
