"""The book's downloads: the ``lowbit`` wheel and the course bundle (every notebook, the
wheel, the notebooks' pinned requirements and a README), made by ``lowbit.course.bundle``
into ``_build/downloads`` before Sphinx reads the pages, so that the intro's ``{download}``
links find them (a missing file is a build error, like any broken link)."""
from __future__ import annotations

from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util import logging

logger = logging.getLogger(__name__)


def make_downloads(app: Sphinx, config: Config) -> None:
    from lowbit import course
    made = course.bundle(Path(app.confdir) / "_build" / "downloads", root=Path(app.confdir))
    logger.info("downloads: " + ", ".join(p.name for p in made.values()))


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", make_downloads)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
