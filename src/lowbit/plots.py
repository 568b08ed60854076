"""Plotly figure builders shared by every chapter.

Interactive figures use plotly's own sliders (each step shows one group of traces):
they stay interactive in the static HTML book, where ipywidgets cannot call Python.
Call :func:`use_notebook_renderer` once at the top of a notebook so figures show both
in Jupyter and in the built book.
"""
from __future__ import annotations

import base64
import re
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.io._base_renderers import NotebookRenderer

__all__ = ["BookRenderer", "use_notebook_renderer", "stepped_figure", "line_figure", "seed_lines", "effects_figure", "grid_lines",
           "histogram_with_grid", "value_histograms", "quantizer_staircase", "history_figure",
           "contour_with_paths", "grid_diagram", "scaled_step_diagram", "COLORS", "METHOD_COLORS", "DASHES", "PATTERNS", "method_of", "styles"]

#: Line colours in order of use — the Okabe–Ito palette, told apart by readers with the common
#: forms of colour blindness (blue, vermillion, bluish green, reddish purple, orange, sky
#: blue, black, yellow last since it is faint on white), then two greys.
COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
          "#F0E442", "#7f7f7f", "#bbbbbb"]

#: The colour of each method, the same on every page (a trace whose name starts with a
#: method's name, :func:`method_of`, is drawn in it). Part III's quantizers and the baselines
#: each get one of the palette's colours; full precision is grey, a reference.
METHOD_COLORS = {"full precision": "#7f7f7f", "PSGD": "#0072B2", "SLB": "#009E73",
                 "SGD": "#D55E00", "STE": "#CC79A7", "QAT": "#CC79A7", "BHQ": "#000000",
                 "PSQ": "#56B4E9", "PT": "#E69F00"}
_METHOD_RE = re.compile(r"\s*(%s)\b" % "|".join(map(re.escape, METHOD_COLORS)))
#: Line dashes that tell apart several traces of one method in one figure.
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
#: Bar fill patterns that tell apart several bars of one method in one figure.
PATTERNS = ("", "/", ".", "x", "\\", "+")


def method_of(name: str | None) -> str | None:
    """The method a trace's name starts with (a key of :data:`METHOD_COLORS`), or None:
    ``"PSGD + PTQ"`` → PSGD, ``"STE-QAT W4"`` → STE, ``"PT 8-bit"`` → PT, ``"PTQ"`` → None."""
    m = _METHOD_RE.match(name or "")
    return m.group(1) if m else None


def styles(names: Sequence[str | None], bars: bool = False) -> list[dict]:
    """Line (or, with ``bars``, marker) styles for traces drawn together: each method's
    colour (:data:`METHOD_COLORS`), a second or later trace of the same method told apart by
    its dash (bars: its fill pattern), and the other names in the palette's colours that
    no method in the figure uses."""
    methods = [method_of(n) for n in names]
    taken = {METHOD_COLORS[m] for m in methods if m}
    free = [c for c in COLORS if c not in taken] or COLORS
    seen: dict[str, int] = {}
    out, k = [], 0
    for m in methods:
        if m:
            color = METHOD_COLORS[m]
            j = seen[color] = seen.get(color, -1) + 1
        else:
            color, j, k = free[k % len(free)], 0, k + 1
        if bars:
            out.append(dict(color=color, pattern=dict(shape=PATTERNS[j % len(PATTERNS)])))
        else:
            out.append(dict(color=color, dash=DASHES[j % len(DASHES)]))
    return out


class BookRenderer(NotebookRenderer):
    """plotly's notebook renderer, minus two things it would put in every notebook: a 4.8 MB
    copy of plotly.js (the built book serves one copy for the whole site, from its own files:
    ``book/_ext/widget_js.py``; JupyterLab and Notebook 7 draw the figures' plotly JSON with
    the ``jupyterlab-plotly`` extension that ships with plotly) and the MathJax 2 script it
    would load from a CDN in every figure (the book has MathJax 3)."""

    def activate(self) -> None:
        """Embed nothing: plotly.js comes from the page, not from the notebook's outputs."""

    def to_mimebundle(self, fig_dict: dict) -> dict:
        from plotly.io import to_html
        return {"text/html": to_html(
            _single_precision(fig_dict), config=self.config, auto_play=self.auto_play,
            include_plotlyjs=False, include_mathjax=False, full_html=False, animation_opts=self.animation_opts,
            default_width="100%", default_height=525, validate=False)}


def _single_precision(obj):
    """A copy of a figure dict whose float64 arrays are float32: about 7 significant digits,
    more than a screen can show, in half the bytes (plotly stores numeric arrays as binary)."""
    if isinstance(obj, dict):
        if obj.get("dtype") == "f8" and isinstance(obj.get("bdata"), str):  # plotly's binary form
            values = np.frombuffer(base64.b64decode(obj["bdata"]), dtype="<f8").astype("<f4")
            return {**obj, "dtype": "f4", "bdata": base64.b64encode(values.tobytes()).decode()}
        return {k: _single_precision(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_single_precision(v) for v in obj)
    if isinstance(obj, np.ndarray) and obj.dtype == np.float64:  # plotly 5 keeps arrays as such
        return obj.astype(np.float32)
    return obj


def use_notebook_renderer() -> None:
    """Render figures as plotly JSON (drawn by JupyterLab and Notebook 7) plus HTML that calls
    the page's plotly.js (the built book serves one copy for the site), with no CDN, on
    plotly's white template with :data:`COLORS` as the default colours."""
    pio.renderers["lowbit"] = BookRenderer()
    pio.renderers.default = "plotly_mimetype+lowbit"
    # traces given no colour take the palette's, in order (plotly's own colorway is not
    # colour-blind safe)
    pio.templates["lowbit"] = go.layout.Template(layout=dict(colorway=COLORS))
    pio.templates.default = "plotly_white+lowbit"


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def stepped_figure(steps: Sequence[tuple[str, Sequence[go.BasePlotlyType]]],
                   slider_label: str = "", active: int = 0, title: str = "",
                   height: int = 420, **layout) -> go.Figure:
    """One figure, a slider, and one group of traces per slider step.

    ``steps`` is a list of ``(label, traces)``; moving the slider to a step shows that
    step's traces and hides the others (and may change the title to the label).
    """
    if not steps:
        raise ValueError("stepped_figure needs at least one step")
    fig = go.Figure()
    owner: list[int] = []
    for i, (_, traces) in enumerate(steps):
        for t in traces:
            t.visible = i == active
            fig.add_trace(t)
            owner.append(i)
    def heading(label) -> str:
        return f"{title} — {' '.join(filter(None, [slider_label, str(label)]))}" if title else ""

    slider_steps = [dict(label=str(label), method="update",
                         args=[{"visible": [o == i for o in owner]}, {"title.text": heading(label)}])
                    for i, (label, _) in enumerate(steps)]
    fig.update_layout(
        title=heading(steps[active][0]) or None,
        height=height, margin=dict(t=60, b=40, l=60, r=20),
        sliders=[dict(active=active, steps=slider_steps, pad=dict(t=50),
                      currentvalue=dict(prefix=f"{slider_label} " if slider_label else ""))],
        **layout)
    return fig


def line_figure(x: Sequence, series: Mapping[str, Sequence[float]], title: str = "",
                xaxis: str = "", yaxis: str = "", log_y: bool = False,
                markers: bool = True, height: int = 380, **layout) -> go.Figure:
    """Several named lines over a shared x axis."""
    fig = go.Figure()
    for (name, ys), style in zip(series.items(), styles(list(series))):
        fig.add_trace(go.Scatter(x=list(x), y=list(ys), name=name,
                                 mode="lines+markers" if markers else "lines", line=style))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=height,
                      margin=dict(t=50, b=40, l=60, r=20), **layout)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def seed_lines(frame, columns: Sequence[str], title: str = "", seed: str = "seed",
               xaxis: str = "", yaxis: str = "test accuracy (%)", height: int = 420,
               hover: str = ".1f", **layout) -> go.Figure:
    """One line per seed across ``columns`` (a row of ``frame`` per seed): the paired view
    of a comparison, in which a seed whose result swings shows as one line, not as a wide
    error bar. Hovering a point names its seed and shows the value in the ``hover``
    format (``".1f"``; ``".3g"`` for losses, say)."""
    missing = [c for c in [seed, *columns] if c not in frame.columns]
    if missing:
        raise ValueError(f"no column {missing[0]!r} in the table; it has {list(frame.columns)}")
    fig = go.Figure()
    labels = [str(c).replace(", ", "<br>") for c in columns]
    for _, row in frame.iterrows():
        fig.add_trace(go.Scatter(x=labels, y=[row[c] for c in columns], mode="lines+markers",
                                 line=dict(color=COLORS[0], width=1), showlegend=False,
                                 hovertemplate=f"seed {row[seed]}: %{{y:{hover}}}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=height, **layout)
    return fig


def effects_figure(effects: Mapping[str, tuple[float, float, float]], title: str = "",
                   xaxis: str = "difference (points)", yaxis: str = "change", height: int = 360,
                   **layout) -> go.Figure:
    """Measured effects as points with their intervals, one row each (``name: (mean, low,
    high)``, as :func:`lowbit.book.interval` gives them), and a line at zero: an effect
    whose interval crosses the line is one the seeds cannot tell from none."""
    names = list(effects)
    mean = [effects[n][0] for n in names]
    fig = go.Figure(go.Scatter(
        x=mean, y=names, mode="markers", marker=dict(color=COLORS[0], size=9),
        error_x=dict(type="data", symmetric=False, array=[effects[n][2] - effects[n][0] for n in names],
                     arrayminus=[effects[n][0] - effects[n][1] for n in names]),
        hovertemplate="%{y}: %{x:+.1f}<extra></extra>", showlegend=False))
    fig.add_vline(x=0, line=dict(color="#7f7f7f", dash="dot"))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=height,
                      yaxis_autorange="reversed", **layout)
    return fig


def grid_lines(levels, y_max: float, name: str = "grid", color: str = "#555555",
               showlegend: bool = True) -> go.Scatter:
    """Vertical lines at the quantization ``levels`` as one trace (cheap to draw)."""
    xs, ys = [], []
    for v in _np(levels).ravel():
        xs += [float(v), float(v), None]
        ys += [0.0, y_max, None]
    return go.Scatter(x=xs, y=ys, mode="lines", name=name, showlegend=showlegend,
                      line=dict(color=color, width=1, dash="dot"), hoverinfo="skip")


def histogram_with_grid(w, levels, bins: int = 120, name: str = "weights",
                        color: str = COLORS[0]) -> list[go.BasePlotlyType]:
    """Traces: a histogram of ``w`` and dotted lines at the grid ``levels``."""
    w = _np(w).ravel()
    counts, edges = np.histogram(w, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    bar = go.Bar(x=centers, y=counts, width=float(edges[1] - edges[0]), name=name,
                 marker=dict(color=color), opacity=0.8)
    return [bar, grid_lines(levels, float(counts.max()) * 1.05)]


def value_histograms(reference, others: Mapping[str, object], bins: int = 81,
                     coverage: float = 0.995, reference_name: str = "full precision"
                     ) -> list[go.BasePlotlyType]:
    """Traces: step-line histograms of ``reference`` (filled) and of each tensor in
    ``others``, on shared bins over the central ``coverage`` of ``reference``'s values
    (values outside are counted in the two end bins, so nothing is hidden); counts per bin.
    For comparing a tensor with its quantized versions."""
    ref = _np(reference).ravel().astype(np.float64)
    arrays = [(reference_name, ref)] + [(name, _np(x).ravel()) for name, x in others.items()]
    bad = [f"{name} ({int((~np.isfinite(x)).sum())} of {x.size})" for name, x in arrays
           if not np.isfinite(x).all()]
    if bad:
        raise ValueError(f"value_histograms needs finite values; non-finite in: {', '.join(bad)}")
    tail = (1.0 - coverage) / 2
    lo, hi = np.quantile(ref, [tail, 1.0 - tail])
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    traces = []
    lines = styles([name for name, _ in arrays])
    for i, ((name, x), line) in enumerate(zip(arrays, lines)):
        counts, _ = np.histogram(np.clip(x, lo, hi), bins=edges)
        style = dict(fill="tozeroy", line=dict(line, shape="hvh")) if i == 0 else \
            dict(line=dict(line, shape="hvh", width=1.5))
        traces.append(go.Scatter(x=centers, y=counts, name=name, mode="lines", **style))
    return traces


def quantizer_staircase(w, q, name: str = "Q(w)") -> list[go.BasePlotlyType]:
    """Traces: the identity and the quantizer ``q`` as a function of ``w`` (sorted)."""
    w, q = _np(w).ravel(), _np(q).ravel()
    order = np.argsort(w)
    return [go.Scatter(x=w[order], y=w[order], name="w", mode="lines",
                       line=dict(color="#999", dash="dash")),
            go.Scatter(x=w[order], y=q[order], name=name, mode="lines",
                       line=dict(color=COLORS[0], shape="hv"))]


def history_figure(histories: Mapping[str, object], metric: str = "test_acc",
                   title: str = "", yaxis: str | None = None) -> go.Figure:
    """One line per run: ``metric`` (a History field or extra key) against the epoch."""
    series = {}
    for name, h in histories.items():
        values = getattr(h, metric, None)
        if values is None:
            values = h.extra[metric]
        series[name] = values
    n = max(len(v) for v in series.values())
    return line_figure(range(1, n + 1), series, title=title, xaxis="epoch",
                       yaxis=yaxis or metric.replace("_", " "))


def contour_with_paths(x, y, z, paths: Mapping[str, Sequence] | None = None,
                       points=None, title: str = "", xaxis: str = "w₁", yaxis: str = "w₂",
                       height: int = 460, colorscale: str = "Blues_r",
                       max_path_points: int = 500) -> go.Figure:
    """A contour plot of ``z`` over the (possibly non-uniform) axes ``x``, ``y``, with
    named paths (each an (n, 2) array of points, drawn through at most ``max_path_points``
    of them) and optional marker ``points``."""
    fig = go.Figure(go.Contour(x=_np(x), y=_np(y), z=_np(z), colorscale=colorscale,
                               showscale=False, contours=dict(coloring="heatmap"),
                               ncontours=25, line=dict(width=0.5), hoverinfo="skip"))
    for i, (name, path) in enumerate((paths or {}).items()):
        path = _np(path)
        if len(path) > max_path_points:  # evenly spaced points, the last one kept
            path = path[np.unique(np.linspace(0, len(path) - 1, max_path_points).round().astype(int))]
        fig.add_trace(go.Scatter(x=path[:, 0], y=path[:, 1], mode="lines", name=name,
                                 line=dict(color=COLORS[(i + 1) % len(COLORS)], width=2)))
        fig.add_trace(go.Scatter(x=path[-1:, 0], y=path[-1:, 1], mode="markers",
                                 showlegend=False, marker=dict(
                                     color=COLORS[(i + 1) % len(COLORS)], size=9,
                                     line=dict(color="white", width=1))))
    if points is not None:
        pts = _np(points)
        fig.add_trace(go.Scatter(x=pts[:, 0], y=pts[:, 1], mode="markers", name="grid points",
                                 marker=dict(symbol="x", color="black", size=6)))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=height,
                      margin=dict(t=50, b=40, l=60, r=20))
    return fig


def frontier_traces(table, methods: Sequence[str], x: str = "weight bits",
                    y: str = "accuracy", reference: float | None = None,
                    reference_name: str = "full precision") -> list[go.BasePlotlyType]:
    """Accuracy against bits, one line with error bars per method: ``table`` has the
    columns ``method``, ``x``, ``mean`` and ``std`` (one row per method and bit-width);
    ``reference`` adds a dashed horizontal line (full precision)."""
    traces = []
    for name, style in zip(methods, styles(methods)):
        part = table[table.method == name].sort_values(x)
        if part.empty:
            continue
        traces.append(go.Scatter(x=[str(v) for v in part[x]], y=part["mean"].tolist(),
                                 error_y=dict(type="data", array=part["std"].tolist()),
                                 name=name, mode="lines+markers", line=style))
    if reference is not None:  # across the methods' bit-widths
        xs = sorted({str(v) for v in table[table.method.isin(methods)][x]}, key=float)
        traces.append(go.Scatter(x=xs, y=[reference] * len(xs), name=reference_name,
                                 mode="lines", line=dict(color=METHOD_COLORS["full precision"],
                                                         dash="dash")))
    return traces


def grid_diagram(w, bits: int = 3, title: str = "The grid and the error of rounding to it"
                 ) -> go.Figure:
    """A diagram of symmetric b-bit quantization on a few numbers ``w``: the grid's levels
    ``k·Δ`` (``Δ = max|w| / (2^(b−1) − 1)``), each number's rounding to the nearest level
    drawn as an arrow, the error ``e = Q(w) − w`` written beside it, and the step Δ marked."""
    w = _np(w).astype(float).ravel()
    q_max = 2 ** (bits - 1) - 1
    delta = float(np.abs(w).max()) / q_max
    levels = delta * np.arange(-q_max, q_max + 1)
    q = delta * np.clip(np.round(w / delta), -q_max, q_max)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=levels, y=np.zeros_like(levels), mode="markers+text",
                             marker=dict(symbol="line-ns-open", size=26, color="#555555",
                                         line=dict(width=2)),
                             text=[f"{k:+d}Δ" if k else "0" for k in range(-q_max, q_max + 1)],
                             textposition="bottom center", name=f"{bits}-bit grid levels"))
    ys = 0.55 + 0.35 * (np.arange(len(w)) % 2)
    fig.add_trace(go.Scatter(x=w, y=ys, mode="markers", name="numbers w",
                             marker=dict(size=10, color=COLORS[0])))
    fig.add_trace(go.Scatter(x=q, y=np.zeros_like(q), mode="markers", name="Q(w)",
                             marker=dict(size=11, color=COLORS[1], symbol="diamond")))
    for wi, qi, yi in zip(w, q, ys):
        fig.add_annotation(x=qi, y=0.04, ax=wi, ay=yi, xref="x", yref="y", axref="x",
                           ayref="y", showarrow=True, arrowhead=2, arrowwidth=1.5,
                           arrowcolor=COLORS[1])
        fig.add_annotation(x=wi, y=yi + 0.12, text=f"e = {qi - wi:+.2f}", showarrow=False,
                           font=dict(size=11, color=COLORS[1]))
    fig.add_shape(type="line", x0=0, x1=delta, y0=-0.42, y1=-0.42,
                  line=dict(color="#555555", width=2))
    fig.add_annotation(x=delta / 2, y=-0.52, text=f"Δ = {delta:.2g}", showarrow=False)
    fig.update_layout(title=title, height=330, xaxis_title="value",
                      yaxis=dict(visible=False, range=[-0.65, 1.2],
                                 title="numbers (above) and the grid (on the line)"),
                      showlegend=True,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def scaled_step_diagram(grid_step: float = 1.0, lambda_s: float = 4.0, eps: float = 0.0,
                        title: str = "Where PSGD's step vanishes") -> go.Figure:
    """A diagram of PSGD's mechanism in one dimension: the scale ``s(w) = λ_s·|w − w*| + ε``
    (``w*`` the nearest grid point) against w, with the grid points where it vanishes, and,
    at a few weights, the step ``−η·s(w)·g`` that PSGD takes for the same gradient g as
    SGD's step ``−η·g`` (arrows): largest half-way between grid points, none on them."""
    w = np.linspace(-2 * grid_step, 2 * grid_step, 801)
    target = grid_step * np.round(w / grid_step)
    scale = lambda_s * np.abs(w - target) + eps
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=w, y=scale, name="scale s(w)", line=dict(color=COLORS[0])))
    points = grid_step * np.arange(-2, 3)
    fig.add_trace(go.Scatter(x=points, y=np.zeros_like(points), mode="markers",
                             name="grid points w* (s = ε)",
                             marker=dict(symbol="x", size=11, color="#000000")))
    fig.add_trace(go.Scatter(x=w, y=np.ones_like(w), name="SGD's scale (1)",
                             line=dict(color=METHOD_COLORS["SGD"], dash="dot")))
    unit = 0.15 * grid_step  # the length of SGD's step for the gradient drawn
    for w0 in (grid_step * np.array([-1.5, -1.1, 0.5, 0.9])).tolist():
        s0 = lambda_s * abs(w0 - grid_step * round(w0 / grid_step)) + eps
        for y, length, color in ((-0.3, unit, METHOD_COLORS["SGD"]),
                                 (-0.7, unit * s0, METHOD_COLORS["PSGD"])):
            fig.add_annotation(x=w0 + length, y=y, ax=w0, ay=y, xref="x", yref="y",
                               axref="x", ayref="y", showarrow=bool(length > 1e-9), arrowhead=2,
                               arrowwidth=2, arrowcolor=color, text="")
    for y, text in ((-0.3, "SGD's step"), (-0.7, "PSGD's step = s(w) × SGD's")):
        fig.add_annotation(x=2 * grid_step, y=y, xanchor="right", showarrow=False, text=text,
                           font=dict(size=11))
    fig.update_layout(title=title, height=400, xaxis_title="weight w",
                      yaxis_title="scale of the gradient",
                      yaxis_range=[-0.95, max(2.2, lambda_s * grid_step / 2 * 1.1)])
    return fig
