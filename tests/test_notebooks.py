"""Every notebook of the book, as the book build executed it: one test per notebook.

``bash .ci/test`` executes each notebook once, in the book build (``.ci/book``:
``book/_ext/execution.py`` runs the notebooks one per CPU core, as myst-nb would, with their
widgets' state, and stores each result in jupyter-cache, where myst-nb finds it; a failing
cell fails the build). These tests then read that execution back instead of running the
notebooks a second time: for each notebook in the table of contents, the cache holds an
execution of exactly its current source, every code cell ran, no cell raised, and every
claim it shows holds. (To run the notebooks themselves as tests, at another seed offset or
thread count, use nbval: ``LOWBIT_SEED=3 pytest --nbval-lax -p no:xdist book``.)

Needs ``_build/.jupyter_cache``; skipped without it, except under CI (``CI=true``), where
a missing execution fails.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import book_extension

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"


# the notebooks of _toc.yml, in its order (as the build's executor lists them)
NOTEBOOKS = [p.relative_to(ROOT).as_posix()
             for p in book_extension("execution").toc_notebooks(ROOT)]

if not os.environ.get("CI"):
    pytestmark = pytest.mark.skipif(not CACHE.exists(),
                                    reason="build the book first: bash .ci/book")


def test_every_notebook_is_in_the_table_of_contents():
    on_disk = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "book").glob("*/*.ipynb"))
    assert sorted(NOTEBOOKS) == on_disk


def claims_of(nb) -> list[dict]:
    """The claim records an executed notebook shows, read as the ledger reads them."""
    records = book_extension("claims").records
    return [rec for cell in nb.cells for out in cell.get("outputs", [])
            for rec in records(out.get("data", {}).get("text/html", ""))]


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_ran_in_the_build_and_its_claims_hold(path):
    import nbformat
    from jupyter_cache import get_cache
    nb = nbformat.read(ROOT / path, as_version=4)
    try:
        record = get_cache(str(CACHE)).match_cache_notebook(nb)
    except KeyError:
        pytest.fail(f"{path}: no execution of its current source in {CACHE} "
                    "(bash .ci/book executes it)")
    executed = get_cache(str(CACHE)).get_cache_bundle(record.pk).nb
    code = [c for c in executed.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.get("execution_count") for c in code), f"{path}: a code cell did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path}: {errors[0].ename}: {errors[0].evalue}"
    failed = [c["claim"] for c in claims_of(executed) if not c["holds"]]
    assert not failed, f"{path}: claims that do not hold: {failed}"
