"""The package's caches: prepared data sets and trained models, under :func:`data_dir`.

Each entry is one file: a header line with the SHA-256 of the payload, then the payload
(``np.savez`` arrays, or a ``torch.save`` blob read back with ``weights_only=True``). It is
written to a temporary file and renamed into place, so the checksum and the data become
visible together, a reader never sees half an entry, and an interrupted write leaves no
stray file. A failed write (a read-only folder, a full disk) warns and loses nothing: the
data or the trained model is returned all the same.

A model's key is a hash of its configuration and of everything else that changes the
trained weights (:func:`config_key`), so a model trained by other code, another torch, on
another device, with another thread count or seed offset is never handed back.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = ["data_dir", "write_entry", "read_entry", "config_key", "source_hash",
           "load_or_train", "NOT_TRAINING"]

_MAGIC = b"lowbit-cache sha256="


def data_dir() -> Path:
    """Where prepared data and cached models live: ``$LOWBIT_DATA``, else the repository's
    ``data/`` folder (for a source checkout), else ``~/.cache/lowbit``."""
    if os.environ.get("LOWBIT_DATA"):
        d = Path(os.environ["LOWBIT_DATA"])
    else:
        repo = Path(__file__).resolve().parents[2]
        d = repo / "data" if (repo / "_toc.yml").exists() else Path.home() / ".cache" / "lowbit"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only place: reads may still work, writes warn
        pass
    return d


def write_entry(path: Path, payload: bytes, strict: bool = False) -> bool:
    """Write ``payload`` with its checksum to ``path`` atomically. Returns False, with a
    warning, when the file cannot be written (nothing else is lost, no file is left);
    ``strict=True`` raises an OSError naming the file instead (the file that was there
    before is kept whole)."""
    path = Path(path)
    digest = hashlib.sha256(payload).hexdigest().encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(_MAGIC + digest + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as e:
        if strict:
            raise OSError(f"could not write {path} ({type(e).__name__}: {e}); "
                          f"the file that was there before is kept") from e
        warnings.warn(f"could not write the cache entry {path} ({type(e).__name__}: {e}); "
                      "the result is returned but not cached")
        return False
    finally:  # an interrupt or a failure leaves no temporary file behind
        try:
            tmp.unlink()
        except OSError:
            pass


def read_entry(path: Path, strict: bool = False) -> bytes | None:
    """The payload of the entry at ``path``: None when there is none; a warning and None
    when it cannot be read or fails its checksum (a truncated or edited file), so that it
    is made again. ``strict=True`` raises a ValueError naming the file instead (for what
    cannot be made again for free: a run's checkpoint)."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        if strict:
            raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e})") from e
        warnings.warn(f"cache entry {path} cannot be read ({type(e).__name__}: {e}); "
                      "making it again")
        return None
    head, sep, payload = blob.partition(b"\n")
    if not (sep and head.startswith(_MAGIC)
            and hashlib.sha256(payload).hexdigest().encode() == head[len(_MAGIC):]):
        if strict:
            raise ValueError(f"{path} fails its checksum (a truncated or edited file)")
        warnings.warn(f"cache entry {path} fails its checksum; making it again")
        return None
    return payload


#: Modules that never touch a model's training (figures, the notebooks' helpers, timing,
#: landscape plots, this cache, the course release, the command line, through which no
#: notebook trains): left out of the source hash, so that editing them keeps trained models.
NOT_TRAINING = ("bench.py", "book.py", "landscape.py", "plots.py", "cache.py", "course.py",
                "run.py")


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 of the package's source files (subpackages included), all but
    :data:`NOT_TRAINING`. Read once per process: the code that trains is the code that was
    imported."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        if f.parent == root and f.name in NOT_TRAINING:
            continue
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def config_key(config: dict) -> str:
    """A short, stable hash of a JSON-serializable config and of everything else that
    changes a trained model: the package source, torch's version, the device, the CPU
    thread count (the order of floating-point sums) and ``LOWBIT_SEED``."""
    from .train import get_device
    blob = json.dumps({"config": config, "source": source_hash(),
                       "torch": torch.__version__, "device": str(get_device()),
                       "threads": torch.get_num_threads(),
                       "seed_offset": os.environ.get("LOWBIT_SEED", "0")},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for the entry at ``path`` (a hidden ``.lock`` file beside it),
    so that two processes that need the same model (two notebooks run at once, as nbval
    under xdist runs them) train it once: the second waits, then reads it. Where there is
    no ``fcntl`` (Windows) or the folder is read-only, nothing is locked."""
    try:
        import fcntl
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_name(f".{path.name}.lock"), "ab")
    except (ImportError, OSError):
        yield
        return
    with f:  # closing the file releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def load_or_train(config: dict, build: Callable[[], nn.Module],
                  train: Callable[[nn.Module], "History"], cache: bool | None = None
                  ) -> tuple[nn.Module, "History"]:
    """Return a trained model and its history, from the cache when it holds this config.

    ``build()`` makes the untrained model (same architecture every time);
    ``train(model)`` trains it in place and returns its :class:`lowbit.train.History`.
    Entries live in ``data_dir()/models``, keyed by :func:`config_key`; one that fails its
    checksum or no longer loads is trained again. ``cache=False`` (or
    ``LOWBIT_NO_CACHE=1``) always trains.
    """
    from .train import History, get_device
    if cache is None:
        cache = os.environ.get("LOWBIT_NO_CACHE", "") in ("", "0")
    path = data_dir() / "models" / f"{config.get('name', 'model')}-{config_key(config)}.pt"
    if not cache:
        model = build().to(get_device())
        return model, train(model)
    with _locked(path):
        model = build()
        payload = read_entry(path)
        if payload is not None:
            try:
                blob = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
                bad = [k for k, v in blob["state_dict"].items() if isinstance(v, torch.Tensor)
                       and v.is_floating_point() and not bool(torch.isfinite(v).all())]
                if bad:  # training never saves one: an edited or a foreign entry
                    raise ValueError(f"non-finite values in {', '.join(bad[:3])}")
                model.load_state_dict(blob["state_dict"])
                return model.to(get_device()), History.from_dict(blob["history"])
            except Exception as e:  # a blob from other code: train again
                warnings.warn(f"cached model {path} does not load ({type(e).__name__}: {e}); "
                              "training it again")
                model = build()
        model = model.to(get_device())
        history = train(model)
        buf = io.BytesIO()
        torch.save({"state_dict": {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                                   for k, v in model.state_dict().items()},
                    "history": history.to_dict(),
                    "config": json.dumps(config, sort_keys=True, default=str)}, buf)
        write_entry(path, buf.getvalue())
    return model, history
