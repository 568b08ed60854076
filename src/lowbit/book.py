"""Helpers for the book's notebooks: one call to set a notebook up, the seeds a page runs,
the statistical tests behind every claim and a way to assert one, a way to put a computed
number into the prose (:func:`glue`), and a way to show the library's own code in the text
(d2l's habit) instead of copying it.

A claim is tested on the paired per-seed results of the runs it compares: a one-sided
paired t-test with n − 1 degrees of freedom (:func:`greater`, :func:`less`), or an exact
sign test or Wilcoxon signed-rank test where the differences are far from normal, and
"within x" as two one-sided tests (:func:`within`), each at the 5 % level. The seed count a
comparison needs comes from a pilot (:func:`seeds_for`). :func:`claim` asserts the test's
verdict and shows the claim as one line, its n, test and p-value folded under it; the book's
claims ledger lists them all.

Two environment variables perturb every page, so that the book's claims are tested as
claims about the methods and not about where one machine's floats fell:

- ``LOWBIT_SEED``: an integer added to every seed the book uses (default 0);
- ``LOWBIT_THREADS``: the CPU thread count torch and numba are pinned to (default 2).
"""
from __future__ import annotations

import html
import inspect
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from .plots import use_notebook_renderer
from .train import get_device, seed_everything

__all__ = ["setup", "seeds", "claim", "Evidence", "greater", "less", "within", "every",
           "bound", "interval", "effect", "mean_sd", "power", "seeds_for", "ALPHA", "glue", "fmt_p",
           "Difference", "difference", "log_error", "show_source",
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
    print(f"seed {seed} (LOWBIT_SEED={SEED_OFFSET}) · {THREADS} thread{'s' * (THREADS != 1)} "
          f"(LOWBIT_THREADS)\ntorch {torch.__version__} · device {get_device()} · "
          f"python {platform.python_version()}{' · FULL size' if FULL else ''}")
    return seed


def seeds(n: int, start: int = 0) -> list[int]:
    """The ``n`` seeds a page runs: ``start + LOWBIT_SEED``, and the ``n − 1`` after it."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of seeds must be a positive int, got {n!r}")
    return [start + SEED_OFFSET + i for i in range(n)]


#: The level of every test in the book (a claim holds when its p-value is below 5 %).
ALPHA = 0.05


@dataclass(frozen=True)
class Evidence:
    """The outcome of testing one claim: whether it holds, which test decided, on how many
    paired values (seeds), its p-value (None for a claim about computed values, not a
    sample), and a one-line summary of the data (mean difference and its confidence
    bound, how many seeds agree)."""
    holds: bool
    test: str
    n: int
    p: float | None
    summary: str

    def details(self) -> str:
        """``n = 10 · one-sided paired t-test · p = 0.003 · <summary>``."""
        parts = [f"n = {self.n}", self.test]
        if self.p is not None:
            parts.append(fmt_p(self.p))
        return " · ".join(parts + ([self.summary] if self.summary else []))


def fmt_p(p: float) -> str:
    """A p-value as the text prints it: ``p = 0.03``, ``p = 0.0066``, ``p < 0.001``."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}" if p < 0.01 else f"p = {p:.2f}"


def _paired(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim == 0 and b.ndim == 0:
        raise ValueError(f"a test over seeds needs paired values, got two numbers {a} and {b}")
    a = np.broadcast_to(a, b.shape).ravel() if a.ndim == 0 else a.ravel()
    b = np.broadcast_to(b, a.shape).ravel() if b.ndim == 0 else b.ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need as many on each side, got {a.size} and {b.size}")
    if a.size < 2:
        raise ValueError(f"a test over seeds needs at least 2 paired values, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"paired values must be finite, got {a.tolist()} and {b.tolist()}")
    return a - b


def _num(x: float, unit: str) -> str:
    return f"{x:+.3g}{unit}"


def _sided(d: np.ndarray, test: str, alpha: float) -> tuple[float, str, float]:
    """p-value of "the differences d are above zero", the test's name, and the 95 % lower
    confidence bound of their mean (t-test) or their median (sign, Wilcoxon)."""
    from scipy import stats
    n, mean = d.size, float(d.mean())
    if test == "t":
        sd = float(d.std(ddof=1))
        if sd == 0.0:
            return (0.0 if mean > 0 else 1.0), "one-sided paired t-test", mean
        se = sd / math.sqrt(n)
        return (float(stats.t.sf(mean / se, n - 1)), "one-sided paired t-test",
                mean - float(stats.t.ppf(1 - alpha, n - 1)) * se)
    if test == "sign":
        up, nonzero = int((d > 0).sum()), int((d != 0).sum())
        p = float(stats.binom.sf(up - 1, nonzero, 0.5)) if nonzero else 1.0
        return p, "exact one-sided sign test", float(np.median(d))
    if test == "wilcoxon":
        p = float(stats.wilcoxon(d, alternative="greater", zero_method="wilcox").pvalue) \
            if d.any() else 1.0
        return p, "one-sided Wilcoxon signed-rank test", float(np.median(d))
    raise ValueError(f"test must be 't', 'sign' or 'wilcoxon', got {test!r}")


def _one_sided(a, b, test: str, unit: str, alpha: float, sign: int) -> Evidence:
    """``sign`` = +1: "a is greater than b"; −1: "a is less than b"."""
    d = _paired(a, b)
    p, name, bound_ = _sided(sign * d, test, alpha)
    n = d.size
    agree = int((sign * d > 0).sum())
    what = "mean" if test == "t" else "median"
    side, word = ("lower", "above") if sign > 0 else ("upper", "below")
    centre = float(d.mean()) if test == "t" else float(np.median(d))
    if np.ndim(b) == 0:  # a against a fixed bound: describe a itself
        level = float(b)
        est = f"{what} {centre + level:.3g}{unit}"
        ci = f", 95 % {side} bound {sign * bound_ + level:.3g}{unit}" if test == "t" else ""
        return Evidence(p < alpha, name, n, p,
                        f"{est}{ci}; {word} {level:g}{unit} on {agree} of {n} seeds")
    if np.ndim(a) == 0:
        raise ValueError("give the paired values first and a fixed bound second")
    ci = f", 95 % {side} bound {_num(sign * bound_, unit)}" if test == "t" else ""
    return Evidence(p < alpha, name, n, p,
                    f"{what} difference {_num(centre, unit)}{ci}; "
                    f"{'higher' if sign > 0 else 'lower'} on {agree} of {n} seeds")


def greater(a, b=0.0, test: str = "t", unit: str = "", alpha: float = ALPHA) -> Evidence:
    """Test "a is greater than b" on paired values (one per seed; ``b`` may be a number, a
    fixed bound).

    ``test="t"``: one-sided paired t-test, t = mean(d) / (sd(d)/√n) with n − 1 degrees of
    freedom, d = a − b; the summary gives the mean difference and its one-sided 95 % lower
    confidence bound. ``"sign"``: exact sign test (the number of positive differences
    against Binomial(n', ½), n' the non-zero ones). ``"wilcoxon"``: Wilcoxon's signed-rank
    test (exact for small n), for differences far from normal but symmetric."""
    return _one_sided(a, b, test, unit, alpha, +1)


def less(a, b=0.0, test: str = "t", unit: str = "", alpha: float = ALPHA) -> Evidence:
    """Test "a is less than b" (as :func:`greater`, the other way; the summary gives the
    mean difference a − b and its 95 % upper bound, or, for a fixed bound b, a's mean)."""
    return _one_sided(a, b, test, unit, alpha, -1)


def within(a, b, tol: float, unit: str = "", alpha: float = ALPHA) -> Evidence:
    """Test "a is within ±tol of b" on paired values by two one-sided t-tests (TOST):
    the mean difference is above −tol (one test) and below +tol (the other), each at
    ``alpha``; p is the larger of the two. Equivalently, the 90 % confidence interval of the
    mean difference lies inside ±tol; the summary gives that interval."""
    from scipy import stats
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    d = _paired(a, b)
    n, sd = d.size, float(d.std(ddof=1))
    mean, lo, hi = interval(a, b, 1 - 2 * alpha)
    if sd == 0.0:
        p = 0.0 if abs(mean) < tol else 1.0
    else:
        se = sd / math.sqrt(n)
        p = float(max(stats.t.sf((mean + tol) / se, n - 1), stats.t.sf((tol - mean) / se, n - 1)))
    return Evidence(p < alpha, "two one-sided paired t-tests (TOST)", n, p,
                    f"mean difference {_num(mean, unit)}, 90 % interval {_num(lo, unit)} to "
                    f"{_num(hi, unit)}, inside ±{tol:g}{unit}")


def interval(a, b=0.0, level: float = 0.9) -> tuple[float, float, float]:
    """The mean paired difference ``a − b`` over seeds and its two-sided t confidence
    interval at ``level`` (90 % by default: the interval TOST checks): ``(mean, low,
    high)``. For an effect a page measures and reports without claiming it."""
    from scipy import stats
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level!r}")
    d = _paired(a, b)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, d.size - 1)) * sd / math.sqrt(d.size)
    return mean, mean - half, mean + half


def _against(v: np.ndarray, above: float | None, below: float | None,
             unit: str) -> tuple[bool, float, str]:
    """Whether every value is above (or below) the bound, the worst value, and the bound
    in words. Give exactly one of ``above`` and ``below``."""
    if (above is None) == (below is None):
        raise ValueError("give exactly one of above and below")
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"the values must be finite, got {v.tolist()}")
    if above is not None:
        return bool(v.min() > above), float(v.min()), f"above {above:g}{unit}"
    return bool(v.max() < below), float(v.max()), f"below {below:g}{unit}"


def every(values, above: float | None = None, below: float | None = None,
          unit: str = "") -> Evidence:
    """The claim "on every seed, the value is above (or below) a bound": a statement about
    the seeds run, decided by the worst of them (no p-value). Give ``above`` or ``below``."""
    v = np.asarray(values, dtype=float).ravel()
    holds, worst, rel = _against(v, above, below, unit)
    return Evidence(holds, "every seed", int(v.size), None,
                    f"worst seed {worst:.4g}{unit}, bound: {rel}")


def bound(value: float, above: float | None = None, below: float | None = None,
          unit: str = "") -> Evidence:
    """A claim about one computed value (an exact count, a property of a formula), not a
    sample: holds when it is above (or below) the bound."""
    holds, v, rel = _against(np.asarray([value], dtype=float), above, below, unit)
    return Evidence(holds, "computed value", 1, None, f"value {v:.4g}{unit}, bound: {rel}")


def effect(a, b=0.0, unit: str = " points", digits: int = 1) -> str:
    """A measured paired difference ``a − b`` as the prose gives it: its mean and 90 %
    interval (:func:`interval`), ``"+1.2 points (90 % interval +0.4 to +2.0)"``. For an
    effect a page reports and glues without claiming it."""
    mean, lo, hi = interval(a, b)

    def signed(x: float) -> str:  # a value that rounds to zero reads +0.0, not -0.0
        return f"{0.0 if round(x, digits) == 0 else x:+.{digits}f}"

    return f"{signed(mean)}{unit} (90 % interval {signed(lo)} to {signed(hi)})"


def mean_sd(frame, by: str, columns: Sequence[str], title: str = "", digits: int = 1):
    """A results table as a page shows it: one row per value of ``by`` (in order of first
    appearance), each of ``columns`` as "mean ± sd" over the rows of ``frame`` (one per
    seed) with ``digits`` decimals; ``title`` names the index (what the numbers are)."""
    import pandas as pd
    if not isinstance(digits, int) or digits < 0:
        raise ValueError(f"digits must be a non-negative int, got {digits!r}")
    missing = [c for c in [by, *columns] if c not in frame.columns]
    if missing:
        raise ValueError(f"no column {missing[0]!r} in the table; it has {list(frame.columns)}")
    stats_ = frame.groupby(by, sort=False)[list(columns)].agg(["mean", "std"])
    # non-breaking spaces: a narrow column wraps between numbers, not inside "85.8 ± 0.4"
    shown = pd.DataFrame({c: [f"{stats_.loc[k, (c, 'mean')]:.{digits}f}\u00a0±\u00a0"
                              f"{stats_.loc[k, (c, 'std')]:.{digits}f}" for k in stats_.index]
                          for c in columns}, index=stats_.index)
    shown.index.name = title or by
    return shown


def power(n: int, effect: float, sd: float, alpha: float = ALPHA) -> float:
    """The power of the one-sided paired t-test on ``n`` seeds: the probability that it
    finds a mean difference ``effect`` when the differences' standard deviation is ``sd``
    (the non-central t distribution with n − 1 degrees of freedom)."""
    from scipy import stats
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 seeds, got {n}")
    if sd <= 0:
        return 1.0 if effect > 0 else 0.0
    crit = stats.t.ppf(1 - alpha, n - 1)
    return float(stats.nct.sf(crit, n - 1, effect / sd * math.sqrt(n)))


def seeds_for(pilot_differences, effect: float | None = None, target: float = 0.8,
              alpha: float = ALPHA, minimum: int = 5, maximum: int = 200) -> int:
    """The number of seeds a one-sided paired t-test needs for ``target`` power at
    ``effect`` (the pilot's mean difference by default), with the standard deviation
    estimated from a pilot's per-seed differences; at least ``minimum``. Raises when even
    ``maximum`` seeds are not enough (the effect is too small for the spread)."""
    d = np.asarray(pilot_differences, dtype=float).ravel()
    if d.size < 2 or not np.isfinite(d).all():
        raise ValueError(f"a pilot needs at least 2 finite differences, got {d.tolist()}")
    effect = float(d.mean()) if effect is None else float(effect)
    if effect <= 0:
        raise ValueError(f"the effect to detect must be positive, got {effect:.3g}")
    sd = float(d.std(ddof=1))
    for n in range(max(minimum, 2), maximum + 1):
        if power(n, effect, sd, alpha) >= target:
            return n
    raise ValueError(f"{maximum} seeds give less than {target:.0%} power at effect "
                     f"{effect:.3g} with a spread of {sd:.3g}: the effect is too small to test")


def claim(text: str, evidence: "Evidence | float", unit: str = "") -> None:
    """Assert a claim of the text and show it as one line, ✓ and the statement, with its
    n, test and p-value folded under it (in the book; printed after it elsewhere).

    ``evidence`` is an :class:`Evidence` from one of the tests (:func:`greater`,
    :func:`within`, :func:`every`, ...). A plain number is the older form, a margin whose
    sign decides (``margin > 0``; kept for the pages not yet moved to the tests). With
    ``LOWBIT_CLAIMS=file`` each claim is also appended to that file as a JSON line."""
    if isinstance(evidence, Evidence):
        ok, record = evidence.holds, asdict(evidence)
        detail = evidence.details()
    else:
        margin = float(evidence)
        ok = margin > 0
        record = {"holds": ok, "test": "margin (older form)", "n": None, "p": None,
                  "summary": f"margin {margin:.4g}{unit}"}
        detail = f"margin {margin:.4g}{unit} (older form: mean minus two standard errors)"
    mark = "✓" if ok else "✗"
    record = {"claim": text, **record, "seed_offset": SEED_OFFSET, "threads": THREADS}
    _show_claim(mark, text, detail, record)
    log = os.environ.get("LOWBIT_CLAIMS")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
    assert ok, f"claim does not hold: {text} ({detail})"


def _show_claim(mark: str, text: str, detail: str, record: dict) -> None:
    """One claim as a folded HTML line for the book (with its record for the ledger, in a
    data attribute) and as plain text for a terminal."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(f"{mark} {text} ({detail})")
        return
    data = html.escape(json.dumps(record), quote=True)
    page = (f'<details class="lowbit-claim" data-lowbit-claim="{data}"><summary>{mark} '
            f'{html.escape(text)}</summary><span class="lowbit-claim-detail">'
            f'{html.escape(detail)}</span></details>')
    display({"text/plain": f"{mark} {text} ({detail})", "text/html": page}, raw=True)


def glue(name: str, value: object, spec: str = "") -> None:
    """Put a computed value into the page's prose, where the markdown has myst-nb's
    ``glue:text`` role with ``name`` (myst-nb's glue). ``spec`` formats a number
    (``".1f"``). Shows nothing in the notebook."""
    text = format(value, spec) if spec else str(value)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover
        return
    if get_ipython() is not None:
        # myst-nb reads text/plain with ast.literal_eval (to drop a string's quotes), which
        # would turn "4,000" into the tuple (4, 0): the quoted form comes back as the text
        prefix = "application/papermill.record/"
        display({prefix + "text/plain": repr(text)}, raw=True,
                metadata={"scrapbook": {"name": name, "mime_prefix": prefix}})


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
API_MODULES = ("lowbit.quant", "lowbit.checks", "lowbit.psgd", "lowbit.slb", "lowbit.fqt",
               "lowbit.baselines", "lowbit.optim", "lowbit.models", "lowbit.data", "lowbit.train",
               "lowbit.recipes", "lowbit.cache", "lowbit.landscape", "lowbit.plots", "lowbit.book",
               "lowbit.bench", "lowbit.course", "lowbit.run")


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
