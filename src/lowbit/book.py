"""Helpers for the book's notebooks: one call to set a notebook up, the seeds a page runs,
a way to assert a claim with its margin, and a way to show the library's own code in the
text (d2l's habit) instead of copying it.

Two environment variables perturb every page, so that the book's claims are tested as
claims about the methods and not about where one machine's floats fell:

- ``LOWBIT_SEED``: an integer added to every seed the book uses (default 0);
- ``LOWBIT_THREADS``: the CPU thread count torch and numba are pinned to (default 2).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import platform
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .plots import use_notebook_renderer
from .train import get_device, seed_everything

__all__ = ["setup", "seeds", "claim", "Difference", "difference", "log_error", "show_source",
           "api_name", "API_MODULES", "FULL",
           "SEED_OFFSET", "THREADS"]

#: ``LOWBIT_FULL=1`` in the environment runs the chapters at full size (for a GPU);
#: by default they use settings that run on two CPU cores in about a minute.
FULL = os.environ.get("LOWBIT_FULL", "") not in ("", "0")


def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value}")
    return value


#: ``LOWBIT_SEED``: added to every seed the book uses (0 by default).
SEED_OFFSET = _env_int("LOWBIT_SEED", 0, 0, 2**31 - 1000)

#: CPU results depend on the number of threads (the order of floating-point sums), so the
#: notebooks pin it (``LOWBIT_THREADS``, 2 by default): a rerun with the same thread count
#: and seeds reproduces a page's numbers on the same machine, and the claims are checked
#: with other thread counts too.
THREADS = _env_int("LOWBIT_THREADS", 2, 1, 256)


def _pin_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:  # numba's parallel loops (FQT's compiled rounding) use the same count
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover
        pass


def setup(seed: int = 0) -> int:
    """Seed everything with ``seed + LOWBIT_SEED``, pin torch's and numba's CPU threads to
    ``LOWBIT_THREADS``, flush subnormal floats (much faster CPU kernels, no result that
    matters changes), pick the plotly renderer the book needs, and print the provenance
    line. Returns the seed used."""
    use_notebook_renderer()
    _pin_threads(THREADS)
    torch.set_flush_denormal(True)
    seed = seed_everything(seed + SEED_OFFSET)
    print(f"seed {seed} (LOWBIT_SEED={SEED_OFFSET}) · {THREADS} threads (LOWBIT_THREADS) · "
          f"torch {torch.__version__} · device {get_device()} · "
          f"python {platform.python_version()}{' · FULL size' if FULL else ''}")
    return seed


def seeds(n: int, start: int = 0) -> list[int]:
    """The ``n`` seeds a page runs: ``start + LOWBIT_SEED``, and the ``n − 1`` after it."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of seeds must be a positive int, got {n!r}")
    return [start + SEED_OFFSET + i for i in range(n)]


def claim(text: str, margin: float, unit: str = "") -> float:
    """Assert a claim of the text whose truth is ``margin > 0``, and print the margin.

    ``margin`` is how far the data is from making the claim false, in the claim's own
    units (points of accuracy, a ratio minus its bound, ...), computed by the caller from
    the page's numbers — for a difference, typically the mean difference minus twice its
    standard error over the seeds. With ``LOWBIT_CLAIMS=file`` each claim is also appended
    to that file as a JSON line (the perturbation table's source)."""
    margin = float(margin)
    ok = margin > 0
    print(f"{'✓' if ok else '✗'} {text} (margin {margin:.4g}{unit})")
    log = os.environ.get("LOWBIT_CLAIMS")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"claim": text, "margin": margin, "ok": ok,
                                "seed_offset": SEED_OFFSET, "threads": THREADS}) + "\n")
    assert ok, f"claim does not hold: {text} (margin {margin:.4g}{unit})"
    return margin


@dataclass(frozen=True)
class Difference:
    """Paired differences ``a − b`` over seeds: their mean and its standard error, their
    smallest and largest value, and the seed-to-seed spread (standard deviation) of each
    side."""
    mean: float
    se: float
    n: int
    low: float
    high: float
    spread_a: float
    spread_b: float

    def above(self, k: float = 2.0) -> float:
        """Margin of "a is above b": the difference's mean is above k standard errors, or
        every seed agrees by more than the seed-to-seed spread of ``a`` (the larger of the
        two margins). The second form holds a difference that is large on every seed but
        varies a lot in size (SGD's 2-bit accuracy, say), which the first cannot."""
        return max(self.mean - k * self.se, self.low - self.spread_a)

    def below(self, k: float = 2.0) -> float:
        """Margin of "a is below b" (as :meth:`above`, with the roles swapped)."""
        return max(-self.mean - k * self.se, -self.high - self.spread_b)

    def not_below(self, k: float = 2.0) -> float:
        """Margin of the weaker "a is not below b": the difference's mean plus k standard
        errors is above zero. For a difference that is large on most seeds but not on all,
        where a few seeds cannot make :meth:`above` hold at every seed offset."""
        return self.mean + k * self.se

    def within(self, tol: float, k: float = 2.0) -> float:
        """Margin of "the difference is within ±tol, k standard errors included"."""
        return tol - abs(self.mean) - k * self.se

    def __str__(self) -> str:
        return (f"{self.mean:+.3g} ± {self.se:.2g} (n = {self.n}; per seed "
                f"{self.low:+.3g} to {self.high:+.3g})")


def difference(a, b=0.0) -> Difference:
    """Paired difference ``a − b`` over seeds (sequences of equal length, or a scalar for
    ``b``): its mean, the standard error of the mean (sample standard deviation / √n), its
    range, and each side's standard deviation. Needs at least two seeds: one seed has no
    spread to compare a difference with."""
    a = np.asarray(a, dtype=float).ravel()
    b = np.broadcast_to(np.asarray(b, dtype=float), a.shape) if np.ndim(b) == 0 else \
        np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired differences need as many values on each side, got "
                         f"{a.size} and {b.size}")
    if a.size < 2:
        raise ValueError(f"a difference over seeds needs at least 2 seeds, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired differences need finite values")
    d = a - b
    return Difference(float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), int(d.size),
                      float(d.min()), float(d.max()), float(a.std(ddof=1)), float(b.std(ddof=1)))


def log_error(accuracy) -> np.ndarray:
    """The natural log of the error rate, ``log(100 − accuracy)``, for accuracies in %.

    Compare two methods' accuracies on this scale when one of them varies a lot from seed
    to seed (SGD's 2-bit accuracy ranges from 40% to 90%): the difference of log errors is
    the log of the ratio of error rates, which the seeds agree on far better than on the
    difference of accuracies."""
    acc = np.asarray(accuracy, dtype=float)
    if not ((acc >= 0) & (acc < 100)).all():
        raise ValueError(f"accuracies must be in [0, 100) %, got {acc.tolist()}")
    return np.log(100.0 - acc)


#: The modules the book's API reference documents (book/api.md), each with its ``__all__``.
API_MODULES = ("lowbit.quant", "lowbit.psgd", "lowbit.slb", "lowbit.fqt", "lowbit.baselines",
               "lowbit.optim", "lowbit.models", "lowbit.data", "lowbit.train", "lowbit.recipes",
               "lowbit.cache", "lowbit.landscape", "lowbit.plots", "lowbit.book", "lowbit.bench",
               "lowbit.course", "lowbit.run")


def api_name(obj: object) -> str | None:
    """The name under which the API reference documents ``obj`` (a function, class or
    method of ``lowbit``): its module, or the package that exports it (``lowbit.fqt`` for
    ``lowbit.fqt.quantizers.grid``), then its qualified name; None if it is not public."""
    module, qualname = getattr(obj, "__module__", "") or "", getattr(obj, "__qualname__", "")
    while "." in qualname and qualname.rsplit(".", 1)[1].startswith("_"):
        qualname = qualname.rsplit(".", 1)[0]  # __call__, _helper: the class's entry
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        candidate = ".".join(parts[:i])
        exported = getattr(sys.modules.get(candidate), "__all__", ())
        if candidate in API_MODULES and qualname.split(".")[0] in exported:
            return f"{candidate}.{qualname}"
    return None


def show_source(*objs) -> "object":
    """Display the source of functions or classes from ``lowbit`` as a code block, with a
    link to each one's entry in the book's API reference."""
    from IPython.display import Markdown
    blocks = [inspect.getsource(o).rstrip() for o in objs]
    names = [n for n in map(api_name, objs) if n]
    links = ", ".join(f"[`{n}`](../api.html#{n})" for n in names)
    return Markdown("```python\n" + "\n\n\n".join(blocks) + "\n```"
                    + (f"\n\nIn the API reference: {links}." if links else ""))
