"""Helpers for the book's notebooks: one call to set a notebook up, and a way to show
the library's own code in the text (d2l's habit) instead of copying it."""
from __future__ import annotations

import inspect
import os
import platform

import torch

from .plots import use_notebook_renderer
from .train import get_device, seed_everything

__all__ = ["setup", "show_source", "FULL"]

#: ``LOWBIT_FULL=1`` in the environment runs the chapters at full size (for a GPU);
#: by default they use settings that run on two CPU cores in about a minute.
FULL = os.environ.get("LOWBIT_FULL", "") not in ("", "0")


#: CPU results depend on the number of threads (the order of floating-point sums), so
#: the notebooks pin it: the book's numbers, and the claims asserted on them, are
#: reproduced exactly by any CPU run with this many threads.
THREADS = 2


def setup(seed: int = 0) -> int:
    """Seed everything, pin the CPU thread count, pick the plotly renderer the book needs,
    and print all three."""
    use_notebook_renderer()
    torch.set_num_threads(THREADS)
    seed_everything(seed)
    print(f"seed {seed} · torch {torch.__version__} · device {get_device()} · "
          f"{torch.get_num_threads()} threads · python {platform.python_version()}"
          f"{' · FULL size' if FULL else ''}")
    return seed


def show_source(*objs) -> "object":
    """Display the source of functions or classes from ``lowbit`` as a code block."""
    from IPython.display import Markdown
    blocks = [inspect.getsource(o).rstrip() for o in objs]
    return Markdown("```python\n" + "\n\n\n".join(blocks) + "\n```")
