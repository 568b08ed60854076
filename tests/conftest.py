import pytest
import torch

# as the book's notebooks run (lowbit.book.setup): subnormal floats slow CPU kernels ~10x
torch.set_flush_denormal(True)


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """A private data/model cache, so tests never touch the book's cache."""
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "data"))
    return tmp_path / "data"
