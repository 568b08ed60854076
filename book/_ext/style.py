"""The book's own style sheet, ``book/_static/lowbit.css``, on every page."""
from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).resolve().parents[1] / "_static"


def add_static(app, config) -> None:
    config.html_static_path.append(str(STATIC))


def setup(app) -> dict:
    app.connect("config-inited", add_static)
    app.add_css_file("lowbit.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
