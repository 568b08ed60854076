"""The claims ledger: every claim the book's pages assert, with its test, n and p-value.

``lowbit.book.claim`` shows each claim as an HTML ``<details>`` line that carries the
claim's record (statement, test, n, p-value, summary) as JSON in a ``data-lowbit-claim``
attribute. When Sphinx reads a page (an executed notebook, fresh or from jupyter-cache),
this extension collects those records from the page's raw HTML; the ``claims-ledger``
directive (on ``book/appendix/ledger``) becomes a table of all of them, page by page, and the
ledger page is written again whenever any page is read again.
"""
from __future__ import annotations

import html
import json
import re

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

_RECORD = re.compile(r'data-lowbit-claim="([^"]*)"')
LEDGER = "book/appendix/ledger"


class ledger_node(nodes.General, nodes.Element):
    """Where the ledger's table goes (filled in when the doctree is resolved)."""


class ClaimsLedger(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        return [ledger_node()]


def records(page: str) -> list[dict]:
    """The claim records in a piece of HTML (a notebook output or a page's raw node)."""
    return [json.loads(html.unescape(m)) for m in _RECORD.findall(page)]


def collect(app, doctree) -> None:
    """Store the claim records of the page just read."""
    env = app.env
    if not hasattr(env, "lowbit_claims"):
        env.lowbit_claims = {}
    found = [rec for raw in doctree.findall(nodes.raw) for rec in records(raw.astext())]
    if found:
        env.lowbit_claims[env.docname] = found
    else:
        env.lowbit_claims.pop(env.docname, None)


def purge(app, env, docname) -> None:
    getattr(env, "lowbit_claims", {}).pop(docname, None)


def merge(app, env, docnames, other) -> None:
    if not hasattr(env, "lowbit_claims"):
        env.lowbit_claims = {}
    env.lowbit_claims.update(getattr(other, "lowbit_claims", {}))


def outdated(app, env, added, changed, removed) -> list[str]:
    """The ledger is read again whenever a page with claims may have changed."""
    return [LEDGER] if (added or changed or removed) and LEDGER in env.found_docs else []


def _p(record: dict) -> str:
    p = record.get("p")
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def _row(cells: list[nodes.Node | str]) -> nodes.row:
    row = nodes.row()
    for c in cells:
        entry = nodes.entry()
        entry += c if isinstance(c, nodes.Node) else nodes.paragraph(text=c)
        row += entry
    return row


def fill(app, doctree, docname) -> None:
    """Replace the ledger directive by a table of every page's claims, in the order of the
    table of contents."""
    claims = getattr(app.env, "lowbit_claims", {})
    order = {d: i for i, d in enumerate(_toc_order(app))}
    for node in doctree.findall(ledger_node):
        table, group = nodes.table(classes=["lowbit-ledger"]), nodes.tgroup(cols=6)
        for width in (14, 40, 16, 5, 7, 18):
            group += nodes.colspec(colwidth=width)
        head, body = nodes.thead(), nodes.tbody()
        head += _row(["page", "claim", "test", "n", "p", "data"])
        total = old = 0
        for page in sorted(claims, key=lambda d: (order.get(d, len(order)), d)):
            title = app.env.titles.get(page)
            for rec in claims[page]:
                ref = nodes.reference("", "", refuri=app.builder.get_relative_uri(docname, page))
                ref += nodes.Text(title.astext() if title is not None else page)
                para = nodes.paragraph()
                para += ref
                n = rec.get("n")
                body += _row([para, ("✓ " if rec.get("holds") else "✗ ") + rec["claim"],
                              rec.get("test", ""), "—" if n is None else str(n), _p(rec),
                              rec.get("summary", "")])
                total += 1
                old += rec.get("test") == "margin (older form)"
        group += head
        group += body
        table += group
        summary = nodes.paragraph(text=f"{total} claims on {len(claims)} pages; {old} of them "
                                       "still in the older margin form (pages not yet moved "
                                       "to the tests).")
        node.replace_self([summary, table])


def _toc_order(app) -> list[str]:
    env = app.env
    seen: list[str] = []

    def walk(doc: str) -> None:
        if doc in seen:
            return
        seen.append(doc)
        for child in env.toctree_includes.get(doc, []):
            walk(child)

    walk(app.config.root_doc)
    return seen


def setup(app) -> dict:
    app.add_node(ledger_node)
    app.add_directive("claims-ledger", ClaimsLedger)
    app.connect("doctree-read", collect)
    app.connect("env-purge-doc", purge)
    app.connect("env-merge-info", merge)
    app.connect("env-get-outdated", outdated)
    app.connect("doctree-resolved", fill)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
