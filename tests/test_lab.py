"""The book's notebooks live in JupyterLab (the README's third command, ``bash .ci/lab``).

Starts JupyterLab from this environment on a free local port with a token, over a copy of
``book/`` (so the run leaves no outputs in the committed notebooks), and drives it in
headless Chromium (playwright): for one chapter of each part it runs every cell, checks that
no cell raised and that the plotly figures and widgets drew, moves the chapter's live control
and checks that the widget's output changed. Then it shuts the server down.

Needs ``chromium`` on the PATH and playwright; skipped when either is missing, except under
CI (``CI=true``). Run it after the notebooks have run once (nbval or ``bash .ci/book``): the
trained models then come from the cache and each chapter runs in seconds.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import book_extension

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: one chapter per part, each with a live ipywidgets control under a figure
CHAPTERS = ["basics/grid", "psgd/warping", "slb/distributions", "fqt/quantizers",
            "compare/frontier"]

pytestmark = pytest.mark.browser
if not os.environ.get("CI"):
    pytestmark = [pytest.mark.browser,
                  pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A running JupyterLab over a copy of the notebooks: ``(base_url, token)``."""
    tmp = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "book", tmp / "book", ignore=shutil.ignore_patterns("_ext", "*.md",
                                                                               "*.bib"))
    # every cell in the page, not only those scrolled into view (JupyterLab's windowing)
    settings = tmp / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
           # the build's thread count, so that the kernels find its models in the cache
           "LOWBIT_THREADS": book_extension("execution").notebook_threads()}
    log = open(tmp / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError("JupyterLab did not start:\n" +
                                   (tmp / "jupyterlab.log").read_text()[-3000:])
            time.sleep(0.5)
        yield base, token
    finally:
        try:  # the server's own shutdown, as a user's "File > Shut Down" does
            urllib.request.urlopen(urllib.request.Request(
                f"{base}/api/shutdown?token={token}", method="POST"), timeout=10)
            server.wait(timeout=30)
        except Exception:
            server.kill()
        log.close()
    assert server.returncode is not None


# The open notebook (JupyterLab's panel for the path, kept as window.__panel) once its kernel
# is connected.
FIND_PANEL_JS = """path => {
  const app = window.jupyterapp;
  if (!app) return false;
  for (const w of app.shell.widgets('main')) {
    const s = w.sessionContext && w.sessionContext.session;
    if (w.context && w.context.path === path && s && s.kernel &&
        s.kernel.connectionStatus === 'connected') { window.__panel = w; return true; }
  }
  return false;
}"""
# The notebook's cells from JupyterLab's own model: execution counts, and any error output.
CELLS_JS = """() => {
  const nb = window.__panel.content;
  return nb.widgets.filter(c => c.model.type === 'code').map(c => ({
    count: c.model.executionCount,
    errors: c.model.outputs.toJSON().filter(o => o.output_type === 'error')
                                  .map(o => o.ename + ': ' + o.evalue)}));
}"""


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_runs_and_its_widget_is_live(lab, chapter):
    playwright = pytest.importorskip("playwright.sync_api")
    base, token = lab
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        path = f"book/{chapter}.ipynb"
        # ?reset: a fresh workspace, not the notebooks the previous chapter left open
        page.goto(f"{base}/lab/tree/{path}?reset&token={token}")
        page.wait_for_function(FIND_PANEL_JS, arg=path, timeout=120_000)
        ok = page.evaluate("""async () => {
            await window.__panel.sessionContext.ready;
            window.jupyterapp.shell.activateById(window.__panel.id);
            return await window.jupyterapp.commands.execute('notebook:run-all-cells'); }""")
        # run-all resolves when the last cell has finished; wait for the kernel to go idle too
        page.wait_for_function("() => window.__panel.sessionContext.session.kernel.status === 'idle'",
                               timeout=300_000)
        cells = page.evaluate(CELLS_JS)
        errors = [e for c in cells for e in c["errors"]]
        assert not errors, f"{chapter}: {errors}"
        assert ok is not False and all(c["count"] for c in cells), \
            f"{chapter}: cells left unrun: {[i for i, c in enumerate(cells) if not c['count']]}"
        assert page.locator(".jp-Notebook .js-plotly-plot").count() > 0, \
            f"{chapter}: no plotly figure drew"
        text = page.locator(".jp-Notebook").inner_text()
        assert "Error displaying widget" not in text and "Loading widget" not in text, chapter

        live = page.locator(".widget-interact").first
        output = live.locator(".widget-output")
        before = output.inner_html()
        slider = live.locator(".noUi-handle")
        if slider.count():  # a slider: one step to the right, from the keyboard
            slider.first.focus()
            page.keyboard.press("ArrowRight")
        else:  # toggle buttons: pick the next one
            buttons = live.locator(".widget-toggle-button")
            assert buttons.count() > 1, f"{chapter}: no slider or toggle to move"
            buttons.nth(1).click()
        page.wait_for_function("([el, old]) => el.innerHTML !== old",
                               arg=[output.element_handle(), before], timeout=60_000)
        output.locator(".js-plotly-plot").first.wait_for(timeout=30_000)  # drawn again
        cells = page.evaluate(CELLS_JS)
        assert not [e for c in cells for e in c["errors"]], chapter
        if os.environ.get("LOWBIT_SCREENSHOTS"):
            out = Path(os.environ["LOWBIT_SCREENSHOTS"]) / f"lab-{chapter.replace('/', '-')}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            live.screenshot(path=str(out))
        browser.close()
