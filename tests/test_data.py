"""Offline data sets, the checksummed cache and the CIFAR-10 reader."""
import os
import pickle

import numpy as np
import pytest
import torch

from lowbit import cache, data
from conftest import write_fake_cifar


@pytest.mark.parametrize("name,shape,n_test", [("mnist", (1, 28, 28), 1000),
                                                ("digits", (1, 8, 8), 360)])
def test_packaged_sets(data_home, name, shape, n_test):
    s = data.load_arrays(name, seed=0)
    assert s.input_shape == shape and len(s.x_test) == n_test
    assert set(np.unique(s.y_train)) == set(range(10))
    assert abs(s.x_train.mean()) < 1e-4 and abs(s.x_train.std() - 1) < 1e-3
    again = data.load_arrays(name, seed=0)  # from the cache: identical
    np.testing.assert_array_equal(again.x_train, s.x_train)
    other = data.load_arrays(name, seed=1)  # another seed shuffles differently
    assert not np.array_equal(other.y_train, s.y_train)


def test_mnist1d_generated_locally(data_home, monkeypatch):
    import mnist1d.data
    monkeypatch.setattr(mnist1d.data, "get_dataset",  # the download path is never used
                        lambda *a, **k: pytest.fail("mnist1d download path called"))
    s = data.load_arrays("mnist1d")
    assert s.input_shape == (1, 40) and len(s.y_train) == 4000


def test_corrupt_cache_is_rebuilt(data_home):
    s = data.load_arrays("digits")
    path = data_home / "digits-seed0.npz"
    path.write_bytes(path.read_bytes()[:100])  # truncate
    with pytest.warns(UserWarning, match="fails its checksum"):
        again = data.load_arrays("digits")
    np.testing.assert_array_equal(again.x_train, s.x_train)
    assert cache.read_entry(path) is not None


def test_unknown_dataset(data_home):
    with pytest.raises(ValueError, match="unknown data set 'imagenet'.*digits"):
        data.load_arrays("imagenet")


def test_loaders_deterministic_and_complete(data_home):
    train, test = data.get_loaders("digits", batch_size=100, seed=3)
    first = [y.clone() for _, y in train]
    train2, _ = data.get_loaders("digits", batch_size=100, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, (y for _, y in train2)))
    assert sum(len(y) for y in first) == len(train.y) and len(first) == len(train)
    assert not torch.equal(torch.cat(first), torch.cat([y for _, y in train]))  # reshuffled
    with pytest.raises(ValueError, match="n_train must be from 1 to"):
        data.get_loaders("digits", n_train=0)


def test_cifar10_reads_local_batches(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    train, test = data.load_cifar10(tmp_path, batch_size=16)
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert len(train.y) == 100 and len(test.y) == 20


def test_cifar10_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*never downloads"):
        data.load_cifar10(tmp_path)
    write_fake_cifar(tmp_path / "c", corrupt="data_batch_3")
    with pytest.raises(ValueError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        data.load_cifar10(tmp_path / "c")


class _Boom:
    """A pickled global that would run code while the file is read."""
    def __reduce__(self):
        import os
        return (os.system, ("touch ran-code",))


def test_cifar10_refuses_a_crafted_pickle(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "c" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Boom(), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="data_batch_1.*refused posix.system|data_batch_1.*refused os.system"):
        data.load_cifar10(tmp_path / "c")
    assert not (tmp_path / "ran-code").exists()


def test_cache_write_failure_keeps_the_result(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setenv("LOWBIT_DATA", str(ro))
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: fail the write another way
            monkeypatch.setattr(cache.os, "replace", lambda *a: (_ for _ in ()).throw(
                OSError(28, "No space left on device")))
        with pytest.warns(UserWarning, match="could not write the cache entry"):
            s = data.load_arrays("digits")
        assert len(s.y_train) > 0
        assert not [p for p in ro.rglob("*") if p.name.endswith(".tmp")]
    finally:
        ro.chmod(0o700)


def test_cache_entry_and_checksum_appear_together(tmp_path):
    path = tmp_path / "e.bin"
    for i in range(50):
        assert cache.write_entry(path, bytes([i]) * 1000)
        assert cache.read_entry(path) == bytes([i]) * 1000  # never a mismatched pair
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.bin"]


def test_two_writers_never_leave_a_mismatched_entry(tmp_path):
    import threading
    import warnings
    path = tmp_path / "e.bin"
    payloads = [bytes([i]) * 200_000 for i in (1, 2)]

    def writer(p):
        for _ in range(40):
            cache.write_entry(path, p)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksum mismatch would warn
        for t in threads:
            t.start()
        seen = 0
        while any(t.is_alive() for t in threads):
            got = cache.read_entry(path)
            assert got is None or got in payloads
            seen += got is not None
        for t in threads:
            t.join()
    assert cache.read_entry(path) in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.bin"]


def test_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "e.bin"
    real_fsync = cache.os.fsync

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache.write_entry(path, b"x" * 100)
    monkeypatch.setattr(cache.os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)
def _write_idx(path, array, compress=False):
    import gzip
    array = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _fake_fashion(folder, n_train=30, n_test=20, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if compress else ""
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for name, a in arrays.items():
        _write_idx(folder / (name + sfx), a, compress)
    return arrays


def test_fashion_split_is_standardized_by_the_training_pixels(tmp_path, monkeypatch):
    """Every seed's split is the same images in another order, standardized by the same two
    numbers (the mean and standard deviation of all training pixels), and a training subset
    made on its own equals the full split's first rows."""
    arrays = _fake_fashion(tmp_path / "fm", n_train=40, compress=False)
    monkeypatch.setenv("LOWBIT_FASHION_MNIST", str(tmp_path / "fm"))
    data._fashion_raw.cache_clear()
    data._uncached_split.cache_clear()
    pixels = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    for seed in (0, 1):
        s = data.load_arrays("fashion", seed=seed)
        expected = (arrays["t10k-images-idx3-ubyte"] / 255 - pixels.mean()) / pixels.std()
        np.testing.assert_allclose(s.x_test[:, 0], expected, rtol=1e-5, atol=1e-5)
        assert s.x_train.dtype == np.float32 and s.x_train.shape == (40, 1, 28, 28)
        train, _ = data.get_loaders("fashion", 64, seed=seed, n_train=7)
        np.testing.assert_array_equal(train.x.numpy(), s.x_train[:7])
        np.testing.assert_array_equal(train.y.numpy(), s.y_train[:7])
    raw = data.load_arrays("fashion", seed=1, standardize=False)
    np.testing.assert_array_equal(raw.x_test[:, 0],
                                  (arrays["t10k-images-idx3-ubyte"] / np.float32(255)
                                   ).astype(np.float32))
    with pytest.raises(ValueError, match="n_train must be from 1 to 40"):
        data.get_loaders("fashion", 8, seed=0, n_train=41)
    data._fashion_raw.cache_clear()
    data._uncached_split.cache_clear()
    data._fashion_table.cache_clear()


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_reads_idx_files_from_a_named_folder(tmp_path, monkeypatch, compress):
    arrays = _fake_fashion(tmp_path / "fm", compress=compress)
    monkeypatch.setenv("LOWBIT_FASHION_MNIST", str(tmp_path / "fm"))
    data._fashion_raw.cache_clear()
    data._uncached_split.cache_clear()
    raw = data.load_fashion_mnist()
    np.testing.assert_array_equal(raw["x_test"], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(raw["y_train"], arrays["train-labels-idx1-ubyte"])
    s = data.load_arrays("fashion", seed=3)
    assert s.input_shape == (1, 28, 28) and len(s.x_test) == 20 and len(s.x_train) == 30
    # the test set keeps its order; the training set is a seeded permutation of it
    np.testing.assert_array_equal(s.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert sorted(s.y_train.tolist()) == sorted(arrays["train-labels-idx1-ubyte"].tolist())
    assert abs(s.x_train.mean()) < 1e-4 and abs(s.x_train.std() - 1) < 1e-3
    other = data.load_arrays("fashion", seed=4)
    assert not np.array_equal(other.y_train, s.y_train)
    train, test = data.get_loaders("fashion", 8, seed=3, n_train=10)
    assert sum(len(y) for _, y in train) == 10 and sum(len(y) for _, y in test) == 20
    data._fashion_raw.cache_clear()
    data._uncached_split.cache_clear()


def test_fashion_missing_files_are_named(tmp_path, monkeypatch):
    _fake_fashion(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    data._fashion_raw.cache_clear()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte .*dataset-fashion-mnist"
                                                 r".*LOWBIT_FASHION_MNIST"):
        data.load_fashion_mnist(tmp_path / "fm")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        data.load_fashion_mnist(tmp_path / "nowhere")


def test_idx_reader_refuses_bad_files(tmp_path):
    good = tmp_path / "good"
    _write_idx(good, np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(data.read_idx(good), np.arange(12).reshape(3, 4))
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x02" + b"\x00" * 20)  # float data: not unsigned bytes
    with pytest.raises(ValueError, match=r"bad is not an IDX file of unsigned bytes.*00 00 0d 02"):
        data.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"short: its header says shape \(3, 4\).*truncated"):
        data.read_idx(short)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"\x1f\x8b" + b"junk")
    with pytest.raises(ValueError, match="broken.gz cannot be read as an IDX file"):
        data.read_idx(broken)
    with pytest.raises(ValueError, match="cannot be read"):
        data.read_idx(tmp_path / "absent")


def test_fashion_mismatched_files_are_refused(tmp_path):
    _fake_fashion(tmp_path / "fm")
    _write_idx(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz", np.arange(7), compress=True)
    data._fashion_raw.cache_clear()
    with pytest.raises(ValueError, match=r"test files .* do not match"):
        data.load_fashion_mnist(tmp_path / "fm")
    data._fashion_raw.cache_clear()


# ----------------------------------------------------------------------------- edge cases
def test_a_cifar_batch_of_floats_is_refused_not_cast(tmp_path):
    import pickle
    from conftest import write_fake_cifar
    write_fake_cifar(tmp_path / "c")
    batch = {b"data": np.full((20, 3072), 1e6), b"labels": [0] * 20}
    (tmp_path / "c" / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"data_batch_2: CIFAR-10 data are bytes \(uint8, 0..255\); got float64 values from 1000000.0 to 1000000.0"):
        data.load_cifar10(tmp_path / "c")


@pytest.mark.parametrize("batch_size", [2.5, True, 0])
def test_array_loader_batch_size_must_be_an_int(batch_size):
    with pytest.raises(ValueError, match=f"batch_size must be an int ≥ 1, got {batch_size!r}"):
        data.ArrayLoader(np.zeros((4, 2)), np.zeros(4), batch_size)


def test_prepared_data_whose_arrays_disagree_are_prepared_again(data_home):
    import io
    from lowbit.cache import read_entry, write_entry
    good = data.load_arrays("digits", 0)
    path = data_home / "digits-seed0.npz"
    with np.load(io.BytesIO(read_entry(path))) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["y_train"] = arrays["y_train"][:5]              # 5 labels for all the inputs
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_entry(path, buf.getvalue())                     # a valid checksum over bad arrays
    with pytest.warns(UserWarning, match="is not usable"):
        again = data.load_arrays("digits", 0)
    assert np.array_equal(again.x_train, good.x_train) and np.array_equal(again.y_train, good.y_train)
