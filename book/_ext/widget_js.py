"""Serve the book's third-party JavaScript from its own files instead of CDNs.

At build time, ``npm pack`` fetches require.js, @jupyter-widgets/html-manager (the
ipywidgets embedder) and MathJax 3 from the npm registry into ``_build/.jsdeps/vendor``
(never committed); that folder is copied to the site root (``html_extra_path``) and
myst-nb and Sphinx load the scripts from there. If npm is missing or fails, the build
keeps the CDN defaults and says so.

plotly.js is served once for the whole site, from the same folder, and loaded by every page
with a figure (the notebooks embed no copy of their own: ``lowbit.plots.BookRenderer``). It is
plotly's own partial bundle of the trace types the book draws (``PLOTLY_TRACES``), built the
way plotly.js documents custom bundles (its ``lib/core`` plus one ``lib/<trace>`` module each,
bundled by esbuild with plotly's own esbuild settings) from the npm release that matches the
installed plotly package: 1.8 MB instead of the full 4.9 MB. Without npm, the full copy that
the plotly package ships is served instead.

Two fixes for what the pages load:

- html-manager 1.x typesets widget labels with MathJax 2's ``MathJax.Hub.Queue``, which
  MathJax 3 no longer has (ipywidgets issue 3829): a small shim forwards it to MathJax 3.
- sphinx-thebe adds its configuration script once per read of the sources, so a page can
  carry it twice and the browser stops at the second ``const``: identical script entries
  are dropped per page.
"""
from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util import logging

logger = logging.getLogger(__name__)

FOLDER = "vendor"
PLOTLY_JS = "plotly.min.js"
#: The plotly trace types the book draws (scatter is in plotly.js's core); the browser test
#: checks that every figure of the built book uses only these.
PLOTLY_TRACES = ("scatter", "bar", "contour", "surface")
#: The bundler and the plugins plotly.js's own build uses (its esbuild-config.js).
BUNDLER = {"esbuild": "0.28.2", "esbuild-plugin-glsl": "1.4.2",
           "esbuild-plugin-inline-css": "0.0.1", "esbuild-plugin-environment": "0.5.0"}
PLOTLY_BUILD_JS = """
const esbuild = require("esbuild");
const { environmentPlugin } = require("esbuild-plugin-environment");
const { glsl } = require("esbuild-plugin-glsl");
const InlineCSSPlugin = require("esbuild-plugin-inline-css");
esbuild.build({
  entryPoints: ["entry.js"], outfile: process.argv[2], bundle: true, minify: true,
  format: "iife", globalName: "Plotly", target: "es2016", logLevel: "warning",
  banner: {js: process.argv[3]},
  plugins: [InlineCSSPlugin(), glsl({minify: true}), environmentPlugin({NODE_DEBUG: false})],
  alias: {stream: "stream-browserify"}, define: {global: "window", "define.amd": "false"},
}).catch(() => process.exit(1));
"""
# package -> (version, {path inside the package: path under vendor/})
PACKAGES = {
    "requirejs": ("2.3.7", {"require.js": "require.js"}),
    # the widget icons' font as WOFF2 and WOFF, which every browser the book supports reads
    # first; the legacy TTF, EOT and SVG copies (2 MB) are left out
    "@jupyter-widgets/html-manager": ("1.0.15", {"dist/embed-amd.js": "embed-amd.js",
                                                 "dist/*.woff*": ""}),
    "mathjax": ("3.2.2", {"es5/tex-mml-chtml.js": "mathjax/tex-mml-chtml.js",
                          "es5/output/chtml/fonts/woff-v2/*":
                              "mathjax/output/chtml/fonts/woff-v2/"}),
}
MATHJAX_HUB_SHIM = """
window.addEventListener("load", function () {
  var mj = window.MathJax;
  if (mj && !mj.Hub) {
    mj.Hub = {Queue: function (job) {
      if (mj.typesetPromise && job && job[2]) { mj.typesetPromise([job[2]]).catch(function () {}); }
    }};
  }
});
"""


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tarball into ``dest``, refusing members that would land outside it, links
    and device files. Uses tarfile's ``filter="data"`` where the running Python has it
    (3.11.4+, 3.10.12+) and the same checks by hand where it does not (Debian's 3.11.2)."""
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(dest, filter="data")
            return
        members = [(m, (dest / m.name).resolve()) for m in t.getmembers()]
        for m, target in members:
            if not (m.isfile() or m.isdir()):
                raise RuntimeError(f"{archive.name}: refusing {m.name!r} (not a plain file "
                                   "or folder)")
            if target != dest and dest not in target.parents:
                raise RuntimeError(f"{archive.name}: refusing {m.name!r} (outside {dest})")
        for m, target in members:
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with t.extractfile(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            target.chmod(0o644)


def _fetch(dest: Path) -> None:
    """Unpack the files named in PACKAGES into ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for name, (version, files) in PACKAGES.items():
            out = subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination",
                                  tmp, "--silent"], check=True, capture_output=True,
                                 text=True, timeout=300)
            tgz = tmp_path / out.stdout.strip().splitlines()[-1]
            unpacked = tmp_path / tgz.stem
            safe_extract(tgz, unpacked)
            pkg = unpacked / "package"
            for pattern, target in files.items():
                matches = sorted(pkg.glob(pattern))
                if not matches:
                    raise RuntimeError(f"{name}@{version} has no {pattern}")
                for src in matches:
                    to = tmp_path / "out" / (target + src.name if target.endswith("/") or
                                             not target else target)
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, to)
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp_path / "out", dest)


def plotly_banner() -> str:
    """The first line of the site's plotly.js: the release and the trace types it holds."""
    from plotly.offline import get_plotlyjs_version
    return (f"/* plotly.js v{get_plotlyjs_version()}, partial bundle for the lowbit book: "
            f"{', '.join(PLOTLY_TRACES)} */")


def _bundle_plotly(out: Path, banner: str) -> None:
    """Build plotly's partial bundle of PLOTLY_TRACES into ``out`` with npm and esbuild."""
    from plotly.offline import get_plotlyjs_version
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "package.json").write_text('{"name": "plotly-book", "private": true}')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent",
                        f"plotly.js@{get_plotlyjs_version()}",
                        *(f"{name}@{version}" for name, version in BUNDLER.items())],
                       cwd=work, check=True, capture_output=True, text=True, timeout=600)
        traces = ", ".join(f"require('plotly.js/lib/{t}')" for t in PLOTLY_TRACES if t != "scatter")
        (work / "entry.js").write_text("var Plotly = require('plotly.js/lib/core');\n"
                                       f"Plotly.register([{traces}]);\nmodule.exports = Plotly;\n")
        (work / "build.js").write_text(PLOTLY_BUILD_JS)
        subprocess.run(["node", "build.js", str(work / PLOTLY_JS), banner], cwd=work, check=True,
                       capture_output=True, text=True, timeout=300)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / PLOTLY_JS, out.with_suffix(".tmp"))
        out.with_suffix(".tmp").replace(out)


def serve_plotly(extra: Path) -> None:
    """Put the site's plotly.js in ``extra/vendor``; pages with a figure load it from there
    (:func:`add_plotly`): plotly's partial bundle of the book's traces, built once and kept
    until the plotly package or the trace list changes, or, without npm, the full copy the
    plotly package ships (no download)."""
    import plotly
    dest = extra / FOLDER / PLOTLY_JS
    banner = plotly_banner()
    if dest.exists():
        with open(dest) as f:
            if f.readline().strip() == banner:
                return
    if shutil.which("npm") and shutil.which("node"):
        try:
            _bundle_plotly(dest, banner)
            logger.info(f"plotly.js: serving a partial bundle ({', '.join(PLOTLY_TRACES)}, "
                        f"{dest.stat().st_size / 1e6:.1f} MB)")
            return
        except (subprocess.SubprocessError, OSError) as e:
            detail = getattr(e, "stderr", "") or e
            logger.info(f"plotly.js: building the partial bundle failed ({detail}); "
                        "serving the full copy the plotly package ships")
    src = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not dest.exists() or dest.stat().st_size != src.stat().st_size:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)


def configure(app: Sphinx, config: Config) -> None:
    extra = Path(app.confdir) / "_build" / ".jsdeps"
    if _vendor_npm(extra / FOLDER):
        # Sphinx puts relative script paths under _static/, so step out of it.
        config.nb_ipywidgets_js = {f"../{FOLDER}/require.js": {},
                                   f"../{FOLDER}/embed-amd.js": {}}
        config.mathjax_path = f"../{FOLDER}/mathjax/tex-mml-chtml.js"
        logger.info(f"vendor JS: serving require.js, html-manager and MathJax from {FOLDER}/")
    serve_plotly(extra)
    config.html_extra_path = list(config.html_extra_path) + [str(extra)]


def _vendor_npm(dest: Path) -> bool:
    """The npm packages in ``dest``, fetched if missing; False (CDN fallback) without npm."""
    if (dest / "embed-amd.js").exists() and (dest / "mathjax").exists():
        return True
    if shutil.which("npm") is None:
        logger.info("vendor JS: npm not found, so widgets and math load their JavaScript "
                    "from CDNs (install Node.js/npm for a self-contained book)")
        return False
    try:
        _fetch(dest)
    except Exception as e:  # any failure here takes the CDN fallback, never stops the build
        logger.info(f"vendor JS: fetching with npm failed ({e}); widgets and math load "
                    "their JavaScript from CDNs instead")
        return False
    return True


def add_plotly(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Pages that draw a plotly figure load the site's one copy of plotly.js, before
    require.js (priority 200 < 500), so that its UMD header defines the global ``Plotly``
    the figures call instead of an anonymous require.js module."""
    if "plotly-graph-div" in context.get("body", ""):
        app.add_js_file(f"../{FOLDER}/{PLOTLY_JS}", priority=200)


def drop_unused_assets(app: Sphinx, exception) -> None:
    """Files the theme copies that no reader's browser fetches are not published: the
    JavaScript and CSS source maps (3.5 MB, read only by developer tools) and the icon fonts'
    TrueType copies (0.7 MB; the theme's CSS names the WOFF2 copies first, which every browser
    the book supports reads)."""
    if exception is None and app.builder.format == "html":
        static = Path(app.outdir, "_static")
        for f in [*static.rglob("*.map"), *static.glob("vendor/fontawesome/webfonts/*.ttf")]:
            f.unlink()


def drop_duplicate_scripts(app: Sphinx, pagename: str, templatename: str, context: dict,
                           doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        # inline scripts come with filename None or '' depending on who added them
        key = (getattr(js, "filename", str(js)) or "",
               tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", configure, priority=100)
    app.connect("html-page-context", add_plotly)
    # last, after the themes have added their scripts
    app.connect("html-page-context", drop_duplicate_scripts, priority=900)
    app.connect("build-finished", drop_unused_assets)
    app.add_js_file(None, body=MATHJAX_HUB_SHIM, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
