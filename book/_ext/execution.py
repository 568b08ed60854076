"""Keep the book build's notebook execution from stalling on a lost ZeroMQ wake-up.

What it fixes, measured here: a cell that runs ``ipywidgets.interact`` sometimes kept
nbclient waiting for exactly the cell timeout (300 s, or 40 s with ``timeout=40``), with the
kernel idle, and then the build went on without an error (2 runs in 6 of ``basics/grid`` in
one test; 0 in 14 with this patch). While nbclient waits for the cell's ``execute_reply``
on the shell socket, its Output-widget support sends the widget's new state to the kernel
on that same socket. A ZeroMQ socket's file descriptor signals readability by edge, and a
``send`` can consume the edge of a reply that has just arrived, so the asyncio poll
(``zmq.asyncio.Socket.poll``) is never woken; only its timeout ends the wait, and then the
reply is found waiting.

The patch makes ``jupyter_client``'s asynchronous ``get_msg`` poll in slices of at most one
second until its own deadline (or forever, for no timeout). Each new poll checks the socket
afresh, so a lost wake-up costs at most a second, and the timeouts mean what they meant.
It is applied when Sphinx loads the extension, so it acts in the book build only; nbval's
client is synchronous and does not have the problem.
"""
from __future__ import annotations

import time
from queue import Empty

from jupyter_client.channels import AsyncZMQSocketChannel

SLICE = 1.0  # seconds

_original_get_msg = getattr(AsyncZMQSocketChannel.get_msg, "__wrapped__",
                            AsyncZMQSocketChannel.get_msg)


async def get_msg(self, timeout: float | None = None):
    """``AsyncZMQSocketChannel.get_msg``, polling at most ``SLICE`` seconds at a time."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = SLICE if deadline is None else max(0.0, min(SLICE, deadline - time.monotonic()))
        try:
            return await _original_get_msg(self, step)
        except Empty:
            if deadline is not None and time.monotonic() >= deadline:
                raise


get_msg.__wrapped__ = _original_get_msg


def setup(app) -> dict:
    AsyncZMQSocketChannel.get_msg = get_msg
    return {"parallel_read_safe": True, "parallel_write_safe": True}
