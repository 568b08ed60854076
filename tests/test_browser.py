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
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

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
