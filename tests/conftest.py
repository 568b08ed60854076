import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

# as the book's notebooks run (lowbit.book.setup): subnormal floats slow CPU kernels ~10x
torch.set_flush_denormal(True)


def book_extension(name: str):
    """The book's Sphinx extension book/_ext/``name``.py, imported from its file (book/_ext
    is not a package)."""
    path = Path(__file__).resolve().parents[1] / "book" / "_ext" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def widget_js():
    """book/_ext/widget_js.py, which serves the book's JavaScript."""
    return book_extension("widget_js")


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """A private data/model cache, so tests never touch the book's cache."""
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def write_fake_cifar(root, n=20, corrupt=None, seed=0):
    """A CIFAR-10 folder in the python format (data_batch_1..5, test_batch) of ``n`` random
    images each; ``corrupt`` names a batch to overwrite with garbage."""
    from lowbit import data
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in data.CIFAR_TRAIN + data.CIFAR_TEST:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n))}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    if corrupt:
        (root / corrupt).write_bytes(b"not a pickle")
