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
It is applied when Sphinx loads the extension, and in the processes below, so it acts in the
book build only; nbval's client is synchronous and does not have the problem.

Run as a script (``.ci/book`` does, before ``jupyter-book build``), the module executes the
book's notebooks one per CPU core into the jupyter-cache the build reads, so the build only
renders them (:func:`main`).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
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


# --- Executing the book's notebooks two (or more) at a time, before the build ------------

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "_build" / ".jupyter_cache"  # where myst-nb looks (the build's parent folder)


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """The notebooks of ``_toc.yml``, in its order."""
    import yaml
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for e in entries or []:
            if "file" in e:
                files.append(e["file"])
            walk(e.get("sections"))
            walk(e.get("chapters"))

    walk(toc.get("parts"))
    return [root / (f + ".ipynb") for f in files if (root / (f + ".ipynb")).exists()]


def _execute_one(src: Path, dest: Path, timeout: int) -> int:
    """Child process: execute ``src`` as myst-nb's cache mode does, write it to ``dest``.
    Exit status 0 (ran), 1 (a cell raised), 3 (a cell timed out)."""
    import traceback

    import nbclient
    import nbformat
    from nbclient.exceptions import CellExecutionError, CellTimeoutError
    AsyncZMQSocketChannel.get_msg = get_msg
    nb = nbformat.read(src, as_version=4)
    # what jupyter-cache's single_nb_execution does for myst-nb (a notebook's own
    # execution metadata may change the timeout), without needing jupyter-cache
    timeout = nb.metadata.get("execution", {}).get("timeout", timeout)
    try:
        nbclient.execute(nb, cwd=str(src.parent), timeout=timeout, allow_errors=False,
                         record_timing=False)
    except (CellExecutionError, CellTimeoutError) as error:
        traceback.print_exc()
        return 3 if isinstance(error, CellTimeoutError) else 1
    nbformat.write(nb, dest)
    return 0


def execute_all(jobs: int, timeout: int, root: Path = ROOT) -> int:
    """Execute every notebook whose current source jupyter-cache does not hold, ``jobs`` at
    a time, and store each in the cache as soon as it has run (the build then reads it from
    there). The notebooks of one folder (one part of the book) run one after another, in
    the book's order, because they share trained models; the parts go to the free worker in
    that order too. Two notebooks that need the same untrained model still train it once
    (:func:`lowbit.cache.load_or_train` locks it). Returns 1 if a cell raised (its
    traceback is printed), else 0; a notebook that timed out is left to the build, which
    runs it again."""
    import queue
    import subprocess
    import tempfile
    import threading

    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(str(CACHE))  # one for the whole run (written under the lock below)
    todo: dict[Path, list[Path]] = {}
    for path in toc_notebooks(root):
        nb = nbformat.read(path, as_version=4)
        try:
            cache.match_cache_notebook(nb)
        except KeyError:
            todo.setdefault(path.parent, []).append(path)
    parts: queue.Queue = queue.Queue()
    for part in todo.values():  # in the book's order: Foundations and Part I, the
        parts.put(part)          # biggest, start at once, side by side
    total = sum(len(p) for p in todo.values())
    print(f"== executing {total} notebooks, {jobs} at a time "
          f"({os.environ.get('LOWBIT_THREADS', '2')} thread(s) each)", flush=True)
    lock = threading.Lock()
    failed: list[str] = []
    done = [0]

    def worker(tmp: Path) -> None:
        while True:
            try:
                part = parts.get_nowait()
            except queue.Empty:
                return
            for path in part:
                name = path.relative_to(root).as_posix()
                dest = tmp / path.name
                start = time.monotonic()
                child = subprocess.run(
                    [sys.executable, __file__, "--one", str(path), str(dest), str(timeout)],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                seconds = time.monotonic() - start
                with lock:
                    done[0] += 1
                    if child.returncode == 0:
                        nb = nbformat.read(dest, as_version=4)
                        cache.cache_notebook_bundle(
                            CacheBundleIn(nb, str(path), data={"execution_seconds": seconds}),
                            check_validity=False, overwrite=True)
                        print(f"[{done[0]}/{total}] {name}: {seconds:.0f} s", flush=True)
                    elif child.returncode == 3:
                        print(f"[{done[0]}/{total}] {name}: a cell timed out after "
                              f"{timeout} s; the build runs it again", flush=True)
                    else:
                        failed.append(name)
                        print(f"[{done[0]}/{total}] {name} FAILED:\n{child.stdout}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        threads = [threading.Thread(target=worker, args=(Path(tmp) / str(i),))
                   for i in range(jobs)]
        for i, t in enumerate(threads):
            (Path(tmp) / str(i)).mkdir()
            t.start()
        for t in threads:
            t.join()
    if failed:
        print(f"== {len(failed)} notebook(s) failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


def notebook_threads(jobs: int | None = None) -> str:
    """The ``LOWBIT_THREADS`` each notebook of the build runs with, ``jobs`` at a time
    (default: one per CPU core this process may use): as set, else 1 when more than one runs
    at a time, else the book's default, 2. (The JupyterLab test runs its kernels with it too,
    so that they find the build's trained models in the cache.)"""
    jobs = jobs or len(os.sched_getaffinity(0))
    return os.environ.get("LOWBIT_THREADS") or ("1" if jobs > 1 else "2")


def main(argv: list[str]) -> int:
    """``python book/_ext/execution.py [JOBS]``: execute the book's notebooks before the
    build, ``JOBS`` at a time (default: the CPU cores this process may use). Each notebook
    gets ``LOWBIT_THREADS`` threads: as set, else 1 when more than one runs at a time (two
    notebooks at one thread each ran 1.7 times as many notebooks per second as one at two
    threads, here on 2 cores)."""
    if argv[:1] == ["--one"]:
        return _execute_one(Path(argv[1]), Path(argv[2]), int(argv[3]))
    import yaml
    jobs = int(argv[0]) if argv else len(os.sched_getaffinity(0))
    if jobs < 1:
        raise SystemExit(f"JOBS must be at least 1, not {jobs}")
    os.environ["LOWBIT_THREADS"] = notebook_threads(jobs)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    return execute_all(jobs, int(config["execute"]["timeout"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
