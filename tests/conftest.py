import pickle

import numpy as np
import pytest
import torch

# as the book's notebooks run (lowbit.book.setup): subnormal floats slow CPU kernels ~10x
torch.set_flush_denormal(True)


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
