"""The book's own machinery: the perturbation switch and claims (lowbit.book), and the
build extension that unpacks the vendored JavaScript (book/_ext/widget_js.py)."""
import io
import json
import math
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import book_extension, widget_js
from lowbit import book

ROOT = Path(__file__).resolve().parents[1]


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    return path


def test_safe_extract_with_the_running_python(tmp_path):
    tgz = _tarball(tmp_path / "p.tgz", {"package/dist/embed-amd.js": b"x" * 10,
                                        "package/package.json": b"{}"})
    widget_js().safe_extract(tgz, tmp_path / "out")
    assert (tmp_path / "out/package/dist/embed-amd.js").read_bytes() == b"x" * 10


@pytest.mark.parametrize("has_filter", [True, False])
def test_safe_extract_refuses_paths_outside(tmp_path, monkeypatch, has_filter):
    mod = widget_js()
    if not has_filter:  # as on Python 3.11.2, which has no tarfile.data_filter
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    tgz = _tarball(tmp_path / "evil.tgz", {"../escaped.txt": b"no"})
    with pytest.raises(Exception):
        mod.safe_extract(tgz, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_safe_extract_without_the_filter_keyword(tmp_path, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    tgz = _tarball(tmp_path / "p.tgz", {"package/a/b.js": b"ok"})
    widget_js().safe_extract(tgz, tmp_path / "out")
    assert (tmp_path / "out/package/a/b.js").read_bytes() == b"ok"


def test_vendor_js_failure_takes_the_cdn_fallback(tmp_path, monkeypatch):
    mod = widget_js()

    def broken(dest):
        raise TypeError("extractall() got an unexpected keyword argument 'filter'")

    def no_bundle(out, banner):
        raise subprocess.CalledProcessError(1, ["npm", "install"], stderr="E404 plotly.js")

    monkeypatch.setattr(mod, "_fetch", broken)
    monkeypatch.setattr(mod, "_bundle_plotly", no_bundle)
    monkeypatch.setattr(mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    config = SimpleNamespace(html_extra_path=[], nb_ipywidgets_js=None, mathjax_path=None)
    mod.configure(SimpleNamespace(confdir=str(tmp_path)), config)   # does not raise
    assert config.nb_ipywidgets_js is None and config.mathjax_path is None  # CDN defaults
    # plotly.js needs no npm: without its partial bundle, the plotly package's full copy
    assert config.html_extra_path == [str(tmp_path / "_build" / ".jsdeps")]
    import plotly
    full = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    served = tmp_path / "_build" / ".jsdeps" / "vendor" / "plotly.min.js"
    assert served.read_bytes() == full.read_bytes()



def _book_with_env(**env):
    code = ("import lowbit.book as b; print(b.SEED_OFFSET, b.THREADS, b.seeds(3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", **env})
    return out


def test_seed_offset_and_threads_from_the_environment():
    out = _book_with_env(LOWBIT_SEED="5", LOWBIT_THREADS="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(maxsplit=2) == ["5", "1", "[5, 6, 7]\n"]
    out = _book_with_env()
    assert out.stdout.split(maxsplit=2) == ["0", "2", "[0, 1, 2]\n"]


@pytest.mark.parametrize("env,word", [({"LOWBIT_SEED": "two"}, "LOWBIT_SEED"),
                                      ({"LOWBIT_SEED": "-1"}, "LOWBIT_SEED"),
                                      ({"LOWBIT_THREADS": "0"}, "LOWBIT_THREADS")])
def test_bad_perturbation_values_are_named(env, word):
    out = _book_with_env(**env)
    assert out.returncode != 0 and word in out.stderr and "must be an integer" in out.stderr


def test_setup_pins_threads_and_returns_the_offset_seed(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(book, "SEED_OFFSET", 3)
    assert book.setup(seed=1) == 4
    assert torch.get_num_threads() == book.THREADS
    assert "seed 4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="positive int"):
        book.seeds(0)


def test_claim_asserts_and_logs(tmp_path, monkeypatch):
    log = tmp_path / "claims.jsonl"
    monkeypatch.setenv("LOWBIT_CLAIMS", str(log))
    assert book.claim("a true claim", 0.5) is None
    with pytest.raises(AssertionError, match="a false claim"):
        book.claim("a false claim", -0.1)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and '"holds": false' in lines[1] and '(older form)' in lines[1]


def test_difference_over_seeds():
    d = book.difference([3.0, 4.0, 5.0], [1.0, 1.0, 1.0])
    assert d.mean == 3.0 and d.n == 3 and abs(d.se - 1 / 3 ** 0.5) < 1e-12
    assert abs(d.above() - (3 - 2 / 3 ** 0.5)) < 1e-12 and d.below() < 0
    # large on every seed but of very different sizes: every seed agrees by more than
    # the spread of a (0.58), though the mean is not two standard errors above zero
    e = book.difference([95.0, 95.0, 94.0], [91.0, 35.0, 92.0])
    assert e.mean - 2 * e.se < 0 < e.above() == e.low - e.spread_a
    assert book.difference([1.0, 2.0], [3.0, 5.0]).below() > 0
    # not below: a mean difference of -0.5 with standard error 0.5 is within the spread
    f = book.difference([0.0, 1.0], [1.0, 1.0])
    assert f.not_below() == f.mean + 2 * f.se > 0 and f.above() < 0
    assert book.difference([0.0, 0.1], [1.0, 1.0]).not_below() < 0
    assert book.difference([1.0, 2.0], 0.5).mean == 1.0
    with pytest.raises(ValueError, match="at least 2 seeds"):
        book.difference([1.0], [0.0])
    with pytest.raises(ValueError, match="as many values"):
        book.difference([1.0, 2.0], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        book.difference([1.0, float("nan")], [0.0, 0.0])


def test_log_error():
    assert abs(book.log_error([90.0])[0] - math.log(10.0)) < 1e-12
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        book.log_error([100.0])


def test_value_histograms_count_every_entry_on_shared_bins():
    from lowbit import plots
    g = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    g[0, 0] = 1e3  # an outlier lands in the last bin, not outside the plot
    traces = plots.value_histograms(g, {"PT": g.round(), "half": g / 2}, bins=21)
    assert [t.name for t in traces] == ["full precision", "PT", "half"]
    for t in traces:
        assert len(t.x) == 21 and sum(t.y) == g.numel()
    assert list(traces[0].x) == list(traces[1].x)
    assert traces[0].y[-1] >= 1
    g[1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite in: full precision \\(1 of 3200\\)"):
        plots.value_histograms(g, {"PT": g.round()}, bins=21)


def test_execution_patch_repolls_a_socket_whose_wakeup_was_lost():
    """book/_ext/execution.py: get_msg polls in one-second slices, so a message that is
    waiting when a slice ends is returned then, not at the caller's deadline."""
    import asyncio
    from queue import Empty

    mod = book_extension("execution")
    mod.SLICE = 0.05

    class Socket:  # never wakes a poll: a message counts only when a poll starts
        def __init__(self, ready_at):
            self.ready_at = ready_at

        async def poll(self, timeout_ms):
            if time.monotonic() >= self.ready_at:
                return 1
            await asyncio.sleep(timeout_ms / 1000)
            return 0

    class Channel:
        def __init__(self, ready_in):
            self.socket = Socket(time.monotonic() + ready_in)

        async def _recv(self):
            return {"msg": "reply"}

    async def original(self, timeout=None):  # jupyter_client's: one poll, then Empty
        if await self.socket.poll(None if timeout is None else int(timeout * 1000)):
            return await self._recv()
        raise Empty

    mod._original_get_msg = original
    start = time.monotonic()
    assert asyncio.run(mod.get_msg(Channel(0.12), timeout=10)) == {"msg": "reply"}
    assert time.monotonic() - start < 1.0  # found at the next slice, not at 10 s
    with pytest.raises(Empty):
        asyncio.run(mod.get_msg(Channel(5.0), timeout=0.2))
    assert asyncio.run(mod.get_msg(Channel(0.1), timeout=None)) == {"msg": "reply"}


def test_book_renderer_embeds_no_plotly_js_and_stores_single_precision(capsys):
    import numpy as np
    import plotly.graph_objects as go
    from lowbit import plots

    renderer = plots.BookRenderer()
    renderer.activate()  # plotly's own would display a 4.8 MB script here
    assert capsys.readouterr().out == ""
    x = np.linspace(0, 1, 1001)
    html = renderer.to_mimebundle(go.Figure(go.Scatter(x=x, y=x ** 2)).to_dict())["text/html"]
    assert "Plotly.newPlot" in html and "plotly.js v" not in html and len(html) < 25_000
    assert '"dtype":"f4"' in html.replace(" ", "") and '"f8"' not in html


def test_every_notebook_says_how_to_install_lowbit_when_it_is_missing():
    """A notebook downloaded from the book starts with an import check that names the fix."""
    import json
    for path in sorted((ROOT / "book").glob("*/*.ipynb")):
        first = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        source = "".join(first["source"])
        check = source.split("\n\n")[0]
        assert check.startswith("try:\n    import lowbit"), path
        # -S: no site-packages, so lowbit (and everything else) is missing, as in a bare Python
        run = subprocess.run([sys.executable, "-S", "-c", check], capture_output=True, text=True)
        assert run.returncode != 0 and "pip install -r requirements.txt -e ." in run.stderr, path
        assert "lowbit-course.zip" in run.stderr and "lowbit-0.1.0-py3-none-any.whl" in run.stderr


def test_notebooks_are_committed_without_outputs():
    """The notebooks are sources: outputs come from the build (and a JupyterLab session over
    book/, bash .ci/lab, must be cleared before a commit)."""
    import json
    for path in sorted((ROOT / "book").glob("*/*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, \
                    f"{path.relative_to(ROOT)}: cell {i} has outputs (clear them before a commit)"


def test_code_fits_the_pages_code_column():
    """A page's code column holds 80 characters at a 1,280-pixel window: a longer line would
    make its cell scroll sideways (formatted with black --line-length 80)."""
    import json
    long = [f"{path.relative_to(ROOT)}, cell {i}: {line.strip()[:40]}…"
            for path in sorted((ROOT / "book").glob("*/*.ipynb"))
            for i, cell in enumerate(json.loads(path.read_text())["cells"])
            if cell["cell_type"] == "code"
            for line in "".join(cell["source"]).splitlines() if len(line) > 80]
    assert not long, f"code lines over 80 characters: {long[:5]}"


def test_api_modules_are_the_packages_public_modules_and_the_api_page_has_each():
    """book.API_MODULES (what the API page and its test cover) names every public module of
    the package, in the order book/api.md documents them."""
    import pkgutil
    import re

    import lowbit
    from lowbit import book
    public = {f"lowbit.{m.name}" for m in pkgutil.iter_modules(lowbit.__path__)
              if not m.name.startswith("_")}
    assert set(book.API_MODULES) == public, sorted(public ^ set(book.API_MODULES))
    documented = re.findall(r"\.\. automodule:: (\S+)", (ROOT / "book" / "api.md").read_text())
    assert documented == list(book.API_MODULES)


# ------------------------------------------------------------ the tests behind the claims
def test_paired_t_test_is_scipys_one_sided_test():
    from scipy import stats
    a, b = [3.1, 4.0, 5.2, 2.0, 4.4], [1.0, 1.5, 1.0, 2.5, 1.2]
    e = book.greater(a, b)
    assert e.test == "one-sided paired t-test" and e.n == 5
    assert abs(e.p - stats.ttest_rel(a, b, alternative="greater").pvalue) < 1e-12 and e.holds
    assert abs(book.less(b, a).p - e.p) < 1e-12
    # a bound on either side: "the loss is below 1.5" is less(loss, 1.5)
    assert book.less([0.2, 0.4, 0.3], 1.5).holds and not book.less([1.4, 1.7, 1.6], 1.5).holds
    # 3 seeds with a 2-point mean gain and a spread of 2: not separable (t(2) = 1.73)
    weak = book.greater([2.0, 4.0, 0.0], 0.0)
    assert not weak.holds and weak.p > 0.05
    assert "above 0 on 2 of 3 seeds" in weak.summary and "mean 2, " in weak.summary
    assert "higher on 2 of 3 seeds" in book.greater([2.0, 4.0, 0.0], [0.0, 0.0, 0.0]).summary
    # equal differences have no spread: decided by their sign
    assert book.greater([2.0, 2.0], [1.0, 1.0]).p == 0.0
    assert book.greater([1.0, 1.0], [1.0, 1.0]).p == 1.0


def test_sign_and_wilcoxon_tests_are_exact():
    from scipy import stats
    d = [0.5, 2.0, -0.1, 3.0, 1.0, 0.7]
    s = book.greater(d, 0.0, test="sign")
    assert abs(s.p - stats.binomtest(5, 6, 0.5, alternative="greater").pvalue) < 1e-12
    assert not s.holds  # 5 of 6: p = 7/64
    assert book.greater([1, 2, 3, 4, 5], 0, test="sign").p == 1 / 32
    w = book.greater(d, 0.0, test="wilcoxon")
    assert abs(w.p - stats.wilcoxon(d, alternative="greater").pvalue) < 1e-12
    with pytest.raises(ValueError, match="'t', 'sign' or 'wilcoxon'"):
        book.greater(d, 0.0, test="z")


def test_within_is_two_one_sided_tests():
    a = [90.1, 90.5, 89.8, 90.3, 90.0]
    b = [90.0, 90.2, 90.1, 90.0, 90.1]
    e = book.within(a, b, 1.0)
    assert e.holds and e.test == "two one-sided paired t-tests (TOST)"
    assert not book.within(a, b, 0.05).holds
    assert not book.within([1.0, 5.0, -3.0], [0.0, 0.0, 0.0], 1.0).holds  # too noisy
    with pytest.raises(ValueError, match="tol must be a positive"):
        book.within(a, b, 0)


def test_interval_is_the_t_interval_tost_checks():
    import numpy as np
    from scipy import stats
    a = [90.1, 90.5, 89.8, 90.3, 90.0]
    b = [90.0, 90.2, 90.1, 90.0, 90.1]
    d = np.subtract(a, b)
    mean, lo, hi = book.interval(a, b)
    ref = stats.t.interval(0.9, d.size - 1, loc=d.mean(), scale=stats.sem(d))
    assert mean == pytest.approx(d.mean()) and (lo, hi) == pytest.approx(ref)
    assert f"{lo:+.3g} to {hi:+.3g}" in book.within(a, b, 1.0).summary
    assert book.interval(a, b, 0.95)[1] < lo
    with pytest.raises(ValueError, match="level must be between 0 and 1"):
        book.interval(a, b, 90)
    assert book.effect(a, b) == f"{mean:+.1f} points (90 % interval {lo:+.1f} to {hi:+.1f})"
    assert book.effect([3.0, 5.0], [1.0, 1.0], unit=" %", digits=0).startswith("+3 % (90 % interval")
    # a mean that rounds to zero reads "+0.0", never "-0.0"
    assert book.effect([1.00, 0.98, 0.99], [1.0, 1.0, 1.0]).startswith("+0.0 points")


def test_mean_sd_shows_each_group_as_mean_and_spread():
    import pandas as pd
    frame = pd.DataFrame({"method": ["b", "b", "a", "a"], "seed": [0, 1, 0, 1],
                          "acc": [90.0, 92.0, 80.0, 80.0]})
    shown = book.mean_sd(frame, "method", ["acc"], title="test accuracy (%)")
    assert list(shown.index) == ["b", "a"] and shown.index.name == "test accuracy (%)"
    assert shown.loc["b", "acc"] == "91.0\u00a0±\u00a01.4" and shown.loc["a", "acc"] == "80.0\u00a0±\u00a00.0"
    with pytest.raises(ValueError, match="no column 'loss'"):
        book.mean_sd(frame, "method", ["loss"])


def test_seed_lines_draws_one_line_per_seed():
    from lowbit import plots
    import pandas as pd
    frame = pd.DataFrame({"seed": [3, 4], "SGD, data-free": [50.0, 70.0], "PSGD, data-free": [75.0, 76.0]})
    fig = plots.seed_lines(frame, ["SGD, data-free", "PSGD, data-free"], title="t")
    assert len(fig.data) == 2 and list(fig.data[0].y) == [50.0, 75.0]
    assert list(fig.data[1].x) == ["SGD<br>data-free", "PSGD<br>data-free"]
    assert "seed 4" in fig.data[1].hovertemplate and fig.layout.yaxis.title.text == "test accuracy (%)"
    assert "%{y:.1f}" in fig.data[0].hovertemplate
    assert "%{y:.3g}" in plots.seed_lines(frame, ["SGD, data-free"], hover=".3g").data[0].hovertemplate
    with pytest.raises(ValueError, match="no column 'LSQ'"):
        plots.seed_lines(frame, ["LSQ"])


def test_effects_figure_draws_each_interval_around_its_mean():
    from lowbit import plots
    fig = plots.effects_figure({"a": (1.0, -0.5, 2.0), "b": (-3.0, -4.0, -1.0)})
    t = fig.data[0]
    assert list(t.y) == ["a", "b"] and list(t.x) == [1.0, -3.0]
    assert list(t.error_x.array) == [1.0, 2.0] and list(t.error_x.arrayminus) == [1.5, 1.0]
    assert fig.layout.yaxis.title.text == "change" and fig.layout.xaxis.title.text


def test_every_and_bound():
    assert book.every([61.0, 70.0], above=60).holds
    assert not book.every([59.0, 70.0], above=60).holds
    assert "worst seed 59" in book.every([59.0, 70.0], above=60).summary
    assert book.every([1.0, 2.0], below=3).holds and book.bound(0.2, below=0.5).holds
    with pytest.raises(ValueError, match="exactly one"):
        book.every([1.0], above=0, below=2)


def test_paired_values_are_checked():
    with pytest.raises(ValueError, match="at least 2 paired values"):
        book.greater([1.0], [0.0])
    with pytest.raises(ValueError, match="as many on each side"):
        book.greater([1.0, 2.0], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        book.within([1.0, float("nan")], [0.0, 0.0], 1.0)


def test_seeds_for_power():
    pilot = [2.0, 4.0, 0.0]  # mean 2, sd 2
    n = book.seeds_for(pilot)
    assert book.power(n, 2.0, 2.0) >= 0.8 > book.power(n - 1, 2.0, 2.0)
    assert n == 8
    assert book.seeds_for([10.0, 11.0, 9.0]) == 5  # a clear effect: the minimum
    with pytest.raises(ValueError, match="too small to test"):
        book.seeds_for([0.1, -3.0, 3.1], maximum=20)
    with pytest.raises(ValueError, match="must be positive"):
        book.seeds_for([-1.0, -2.0])


def test_claim_with_evidence_shows_one_line_and_logs(tmp_path, monkeypatch, capsys):
    log = tmp_path / "claims.jsonl"
    monkeypatch.setenv("LOWBIT_CLAIMS", str(log))
    e = book.greater([3.0, 4.0, 5.0, 4.5, 3.5], 1.0)
    assert book.claim("a holds", e) is None
    out = capsys.readouterr().out
    assert out.startswith("✓ a holds (n = 5 · one-sided paired t-test · p < 0.001 · mean ")
    with pytest.raises(AssertionError, match="claim does not hold: b fails"):
        book.claim("b fails", book.greater([0.0, 1.0, -1.0], 0.0))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["holds"] for r in rows] == [True, False] and rows[0]["n"] == 5
    assert rows[0]["test"] == "one-sided paired t-test" and 0 < rows[0]["p"] < 0.05


def test_fmt_p_and_glue():
    assert book.fmt_p(0.0004) == "p < 0.001" and book.fmt_p(0.0066) == "p = 0.0066"
    assert book.fmt_p(0.034) == "p = 0.03" and book.fmt_p(0.5) == "p = 0.50"
    assert book.glue("x", 3.14159, ".2f") is None  # outside a notebook: nothing shown


def test_mechanism_diagrams_draw_what_the_quantizer_and_psgd_compute():
    from lowbit import plots, quant
    w = torch.tensor([-0.9, -0.3, 0.05, 0.4, 1.2])
    fig = plots.grid_diagram(w, bits=3)
    q = [t for t in fig.data if t.name == "Q(w)"][0]
    assert list(q.x) == pytest.approx(quant.quantize_symmetric(w, 3).tolist())
    levels = [t for t in fig.data if t.name.endswith("grid levels")][0]
    assert len(levels.x) == 7 and fig.layout.title.text and fig.layout.xaxis.title.text
    step = plots.scaled_step_diagram(grid_step=0.5, lambda_s=8.0)
    s = [t for t in step.data if t.name == "scale s(w)"][0]
    on_grid = [v for x, v in zip(s.x, s.y) if abs(x / 0.5 - round(x / 0.5)) < 1e-9]
    assert on_grid and max(on_grid) == 0 and max(s.y) == pytest.approx(8.0 * 0.25)


def test_glued_text_reads_back_as_written(monkeypatch):
    """myst-nb's glue:text role literal-evaluates text/plain: '4,000' must not become (4, 0)."""
    from myst_nb.core.variables import format_plain_text
    shown = []
    import IPython
    import IPython.display
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda data, **kw: shown.append(data))
    for value, spec in (("4,000", ""), (6.61, ".1f"), ("p < 0.001", ""), (20432, ","), ("(4, 0)", "")):
        book.glue("k", value, spec)
        text = shown[-1]["application/papermill.record/text/plain"]
        assert format_plain_text(text, "s") == (format(value, spec) if spec else str(value))
