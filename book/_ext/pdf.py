"""Print the book to one PDF: ``python book/_ext/pdf.py SINGLEHTML_DIR OUT.pdf``.

``bash .ci/pdf`` builds the book as one HTML page (Sphinx's ``singlehtml`` builder, from the
executed notebooks that ``bash .ci/book`` cached) and this script prints that page with the
Chromium the browser test uses (Debian's package, driven by playwright), the way Jupyter
Book's ``pdfhtml`` builder does with a Chromium of its own (which it would download). The
page is laid out at the printed width before the figures draw, every plotly figure and
has drawn, and then Chromium prints it: each figure appears as the vector image
it drew. The PDF is written next to its final name and moved there once complete.

It is also a Sphinx extension (``_config.yml``): for the one-page build it gives the
``singlehtml`` builder every node visitor the extensions registered for ``html`` (Sphinx
uses a builder's own visitors, once any extension registers one, instead of its format's;
myst-nb's folded code cells have only ``html`` ones).
"""
from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import threading
from pathlib import Path

#: A4 at 96 px per inch, less the margins: the width the figures are laid out at.
A4_WIDTH_PX = 794
MARGIN_MM = 14
#: What the printed page hides or opens beyond the theme's own print style: the navigation
#: that has no use on paper, and the folded code of figures (its output stays). Shadows go
#: too: Chromium prints each one as a 300 dpi greyscale image, which made 7.6 MB of the PDF
#: (the theme's own shadows are !important, hence the id selector that outranks them).
PRINT_CSS = """
:not(#no-shadow), :not(#no-shadow)::before, :not(#no-shadow)::after
  { box-shadow: none !important; text-shadow: none !important; filter: none !important; }
.bd-header, .bd-sidebar-primary, .bd-sidebar-secondary, .header-article, .prev-next-area,
.bd-footer, .bd-footer-content, .headerlink, details.hide.above-input
  { display: none !important; }
.bd-main .bd-content .bd-article-container { max-width: 100% !important; }
.js-plotly-plot, .jp-OutputArea-output, .cell_output { break-inside: avoid; }
h1, h2 { break-after: avoid; }
"""
#: Every figure has drawn (plotly adds its SVG). The ipywidgets controls are left out: they
#: are for the live notebook, and their figures are the pages' own figures with sliders.
READY_JS = """() => [...document.querySelectorAll('.plotly-graph-div')]
  .every(f => f.querySelector('.main-svg'))"""


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def print_pdf(site: Path, out: Path, chromium: str | None = None, timeout_s: float = 600) -> Path:
    """Print the one page of a ``singlehtml`` build in ``site`` to ``out``; return ``out``."""
    from playwright.sync_api import sync_playwright
    site, out = Path(site), Path(out)
    # Jupyter Book's root page is book/intro (index.html only redirects to it), and the
    # singlehtml builder writes its links as if the page sat at the site's root: put it there
    page = site / "book" / "intro.html"
    if not page.is_file():
        raise FileNotFoundError(f"no {page}: build the one-page book first "
                                "(jupyter-book build . --builder singlehtml)")
    page_path = "print.html"
    shutil.copy(page, site / page_path)
    chromium = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    httpd, base = _serve(site)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": A4_WIDTH_PX - 2 * 53, "height": 1100})
            page.emulate_media(media="print")
            page.goto(f"{base}/{page_path}", wait_until="load", timeout=timeout_s * 1000)
            page.add_style_tag(content=PRINT_CSS)
            page.wait_for_function(READY_JS, timeout=timeout_s * 1000, polling=1000)
            page.evaluate("document.fonts.ready")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.pdf(path=str(tmp), format="A4", print_background=True,
                     margin={side: f"{MARGIN_MM}mm" for side in ("top", "bottom", "left", "right")},
                     display_header_footer=True, header_template="<span></span>",
                     footer_template='<div style="font-size:8px;width:100%;text-align:center">'
                                     '<span class="pageNumber"></span> / <span class="totalPages">'
                                     '</span></div>')
            browser.close()
        tmp.replace(out)
    finally:
        httpd.shutdown()
        tmp.unlink(missing_ok=True)
    return out


def share_html_visitors(app) -> None:
    """Give the singlehtml builder the html visitors it lacks (see the module's docstring)."""
    if app.builder.name == "singlehtml":
        handlers = app.registry.translation_handlers
        own = handlers.setdefault("singlehtml", {})
        for node, visitors in handlers.get("html", {}).items():
            own.setdefault(node, visitors)


def setup(app) -> dict:
    app.connect("builder-inited", share_html_visitors)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the singlehtml build (its index.html)")
    parser.add_argument("out", type=Path, help="the PDF to write")
    args = parser.parse_args()
    path = print_pdf(args.site, args.out)
    print(f"== PDF: {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
