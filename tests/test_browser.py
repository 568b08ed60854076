"""Open every page of the built book in headless Chromium (Debian's package) and check
that each plotly figure drew and each ipywidget rendered, with no error placeholder and
no uncaught JavaScript error.

Needs ``_build/html`` (``bash .ci/book``) and ``chromium`` on the PATH; skipped when
either is missing, except under CI (``CI=true``), where a missing one fails.
``LOWBIT_SCREENSHOTS=folder`` also saves a full-page PNG of every page there.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from bs4 import BeautifulSoup
from conftest import widget_js

HTML = Path(__file__).resolve().parents[1] / "_build" / "html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGES = sorted(p.relative_to(HTML).as_posix() for p in (HTML / "book").rglob("*.html")) \
    if HTML.exists() else []

pytestmark = pytest.mark.browser
if not os.environ.get("CI"):
    pytestmark = [pytest.mark.browser,
                  pytest.mark.skipif(not PAGES, reason="build the book first: bash .ci/book"),
                  pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def server():
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                               "--virtual-time-budget=20000", *args, url],
                              capture_output=True, text=True, timeout=180)


def test_pages_found():
    assert PAGES, f"no pages under {HTML}/book: build the book first (bash .ci/book)"
    assert CHROMIUM, "chromium is not installed (apt-get install chromium)"


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(server, page):
    run = chromium(f"{server}/{page}", "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    dom = BeautifulSoup(run.stdout, "html.parser")
    source = BeautifulSoup((HTML / page).read_text(), "html.parser")

    js_errors = [line for line in run.stderr.splitlines()
                 if "Uncaught" in line or "Failed to load resource" in line]
    assert not js_errors, f"{page}: JavaScript errors:\n" + "\n".join(js_errors[:10])

    external = [tag.get("src") or tag.get("href") for tag in source.find_all(["script", "link"])
                if (tag.get("src") or tag.get("href") or "").startswith(("http:", "https:", "//"))]
    assert not external, f"{page}: loads from outside the book: {external}"

    # every figure of the page drew, and so did any that a widget's output added
    figures = {d["id"] for d in source.select("div.plotly-graph-div")}
    in_dom = dom.select("div.plotly-graph-div")
    drawn = {d.get("id") for d in in_dom if d.select_one("svg.main-svg")}
    assert figures <= drawn, f"{page}: plotly figures that did not draw: {figures - drawn}"
    assert len(drawn) == len(in_dom), f"{page}: {len(in_dom) - len(drawn)} figures did not draw"
    # 3-D figures draw with WebGL into a canvas; their SVG layer exists even when WebGL fails
    for div in in_dom:
        scene = div.select_one("div.gl-container > div[id^=scene]")
        if scene is not None:
            assert scene.select_one("canvas"), f"{page}: a 3-D figure has no WebGL canvas"

    views = source.find_all("script", type="application/vnd.jupyter.widget-view+json")
    rendered = [s for s in dom.find_all("script", type="application/vnd.jupyter.widget-view+json")
                if s.find_next_sibling(class_="jupyter-widgets")
                or s.parent.select_one(".jupyter-widgets")]
    assert len(rendered) == len(views), f"{page}: {len(rendered)} of {len(views)} widgets rendered"
    text = dom.get_text(" ")
    for placeholder in ("Error displaying widget", "Error rendering output",
                        "model not found"):
        assert placeholder not in text, f"{page}: widget placeholder {placeholder!r}"

    folder = os.environ.get("LOWBIT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        out = Path(folder) / (page.replace("/", "_").removesuffix(".html") + ".png")
        chromium(f"{server}/{page}", f"--screenshot={out}", "--window-size=1280,6000")


# Light pages: plotly.js is served once for the whole site (lowbit.plots.BookRenderer embeds
# no copy; book/_ext/widget_js.py serves plotly's partial bundle of the book's trace types),
# so a page weighs what its text and figure data weigh.
PAGE_LIMIT_MB, SITE_LIMIT_MB = 1.5, 25.0


def test_pages_are_light():
    sizes = {page: (HTML / page).stat().st_size / 1e6 for page in PAGES}
    heavy = {p: round(s, 2) for p, s in sizes.items() if s > PAGE_LIMIT_MB}
    assert not heavy, f"pages over {PAGE_LIMIT_MB} MB: {heavy}"
    copies = [p for p in PAGES if "/** plotly.js" in (HTML / p).read_text() or
              "plotly.js v" in (HTML / p).read_text()[:200_000]]
    assert not copies, f"pages that embed their own plotly.js: {copies}"


def test_site_is_light():
    """The published site, its PDF included: the one in the site, or where ``bash .ci/pdf``
    wrote it when this build left it out (LOWBIT_PDF=0, as in the tests)."""
    files = [f for f in HTML.rglob("*") if f.is_file() and f.name != "lowbit-book.pdf"]
    pdfs = [f for f in (HTML / "lowbit-book.pdf", HTML.parent / "pdf" / "lowbit-book.pdf")
            if f.is_file()]
    total = sum(f.stat().st_size for f in files + pdfs[:1]) / 1e6
    what = f"with its PDF ({pdfs[0].stat().st_size / 1e6:.1f} MB)" if pdfs else "(no PDF built)"
    assert total < SITE_LIMIT_MB, f"the site weighs {total:.1f} MB {what}, limit {SITE_LIMIT_MB}"
    served = HTML / "vendor" / "plotly.min.js"
    assert served.exists(), "plotly.js is not served by the book"
    # plotly's partial bundle of the book's traces, of the plotly.js release that the plotly
    # package writing the figures ships (npm is part of the setup, so no full-copy fallback)
    with open(served) as f:
        assert f.readline().strip() == widget_js().plotly_banner(), \
            "the site serves the full plotly.js, not the book's partial bundle"


def figures(page: str) -> list[tuple[list, dict]]:
    """Every plotly figure of a built page as ``(traces, layout)``: those in the page's HTML
    and those inside its widgets' saved state (the live widgets' last output)."""
    html = (HTML / page).read_text()
    sources = [html]
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup.select('script[type="application/vnd.jupyter.widget-state+json"]'):
        stack = [json.loads(tag.string or "{}")]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, str) and "Plotly.newPlot" in item:
                sources.append(item)
    decoder, out = json.JSONDecoder(), []
    for text in sources:
        for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', text):
            traces, end = decoder.raw_decode(text, m.end())
            end = text.index(",", end) + 1
            while text[end].isspace():
                end += 1
            out.append((traces, decoder.raw_decode(text, end)[0]))
    return out


def _text(title) -> str:
    return (title.get("text") if isinstance(title, dict) else title) or ""


FIGURE_PAGES = [p for p in PAGES if "Plotly.newPlot" in (HTML / p).read_text()]


@pytest.mark.parametrize("page", FIGURE_PAGES)
def test_every_trace_type_is_in_the_sites_plotly(page):
    """The site's plotly.js holds only the trace types in widget_js.PLOTLY_TRACES: a figure
    of another type would draw empty, so each one drawn must be one of them."""
    allowed = set(widget_js().PLOTLY_TRACES)
    for traces, layout in figures(page):
        kinds = {t.get("type", "scatter") for t in traces}
        assert kinds <= allowed, f"{page}: {_text(layout.get('title'))!r} draws {kinds - allowed}," \
            " which the site's plotly.js lacks: add it to PLOTLY_TRACES in book/_ext/widget_js.py"


@pytest.mark.parametrize("page", FIGURE_PAGES)
def test_every_figure_has_a_title_and_axis_titles(page):
    """Accessible figures: each says what it shows, and what each axis measures."""
    found = figures(page)
    assert found, f"{page}: no figure found"
    for traces, layout in found:
        title = _text(layout.get("title"))
        assert title, f"{page}: a figure without a title ({[t.get('name') for t in traces][:4]})"
        if "scene" in layout or all(t.get("type") in ("surface", "contour") for t in traces) \
                and "xaxis" not in layout:
            continue
        for axis in ("xaxis", "yaxis"):
            assert _text(layout.get(axis, {}).get("title")), f"{page}: {title!r} has no {axis} title"


@pytest.mark.parametrize("page", FIGURE_PAGES)
def test_each_method_has_one_colour_on_every_page(page):
    """A trace named after a method (lowbit.plots.method_of) is drawn in that method's colour
    (lowbit.plots.METHOD_COLORS), the same in every part."""
    from lowbit import plots
    for traces, layout in figures(page):
        for t in traces:
            method = plots.method_of(t.get("name"))
            if method is None:
                continue
            color = (t.get("line") or {}).get("color") or (t.get("marker") or {}).get("color")
            expected = plots.METHOD_COLORS[method]
            colors = set(color) if isinstance(color, list) else {color}
            assert colors == {expected}, \
                f"{page}: {_text(layout.get('title'))!r}: {t.get('name')!r} is drawn in {color}, " \
                f"not {method}'s {expected}"


SLIDER_PAGES = [p for p in PAGES if '"sliders"' in (HTML / p).read_text()]
# Moves the last slider step of every figure that has a slider, the way a reader does:
# plotly's own slider API (the step's method and args, as a click on the rail runs them).
MOVE_SLIDERS = """() => Array.from(document.querySelectorAll('div.plotly-graph-div'))
  .filter(gd => gd.layout && gd.layout.sliders && gd.layout.sliders.length)
  .map(gd => {
    const s = gd.layout.sliders[0], before = gd.data.map(t => t.visible);
    const target = s.active === s.steps.length - 1 ? 0 : s.steps.length - 1;
    const rail = gd.querySelector('.slider-rail-touch-rect');
    return {id: gd.id, target, before, steps: s.steps.length, rail: !!rail};
  })"""


@pytest.mark.parametrize("page", SLIDER_PAGES)
def test_sliders_move(server, page):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.goto(f"{server}/{page}", wait_until="networkidle")
        count = len(BeautifulSoup((HTML / page).read_text(), "html.parser")
                    .select("div.plotly-graph-div"))
        tab.wait_for_function("n => document.querySelectorAll("
                              "'div.plotly-graph-div svg.main-svg').length >= n",
                              arg=count, timeout=30_000)  # every figure has drawn
        figures = tab.evaluate(MOVE_SLIDERS)
        assert figures, f"{page}: no figure with a slider drew"
        for fig in figures:
            gd = tab.locator(f"[id='{fig['id']}']")
            gd.scroll_into_view_if_needed()
            rail = gd.locator(".slider-rail-touch-rect").first
            box = rail.bounding_box()
            assert box, f"{page}: figure {fig['id']} has no slider rail"
            x = box["x"] + (box["width"] - 3 if fig["target"] else 3)
            tab.mouse.click(x, box["y"] + box["height"] / 2)
            tab.wait_for_timeout(300)
            after = tab.evaluate(f"() => document.getElementById('{fig['id']}').data.map(t => t.visible)")
            active = tab.evaluate(f"() => document.getElementById('{fig['id']}').layout.sliders[0].active")
            assert active == fig["target"], f"{page}: slider of {fig['id']} did not move"
            assert after != fig["before"], f"{page}: moving the slider of {fig['id']} changed nothing"
        browser.close()


def test_api_page_lists_every_public_name():
    """book/api.md documents every name in each lowbit module's ``__all__`` (autodoc)."""
    import importlib

    from lowbit import book

    page = BeautifulSoup((HTML / "book" / "api.html").read_text(), "html.parser")
    documented = {dt.get("id") for dt in page.select("dt[id]")}
    missing = [f"{m}.{name}" for m in book.API_MODULES
               for name in importlib.import_module(m).__all__ if f"{m}.{name}" not in documented]
    assert not missing, f"public names missing from the API page: {missing}"
    # and every link from a chapter's show_source block lands on an entry
    for page_path in PAGES:
        for a in BeautifulSoup((HTML / page_path).read_text(), "html.parser").select(
                'a[href*="api.html#"]'):
            target = a["href"].split("#", 1)[1]
            assert target in documented, f"{page_path}: API link to {target} has no entry"


def test_intro_links_its_downloads():
    """The wheel and the notebooks' bundle are linked from the intro and served by the site;
    so is the PDF, when the book was built with it (bash .ci/book; the tests skip it)."""
    intro = HTML / "book" / "intro.html"
    links = [a.get("href", "") for a in BeautifulSoup(intro.read_text(), "html.parser").select("a")]
    for name in ("lowbit-course.zip", "lowbit-0.1.0-py3-none-any.whl"):
        found = [h for h in links if h.endswith(name)]
        assert found, f"the intro does not link {name}"
        assert all((intro.parent / h).resolve().is_file() for h in found), f"{name}: {found}"
    pdf = [h for h in links if h.endswith("lowbit-book.pdf")]
    assert pdf, "the intro does not link the PDF"
    if (HTML / "lowbit-book.pdf").exists():
        assert all((intro.parent / h).resolve() == (HTML / "lowbit-book.pdf").resolve() for h in pdf)
