"""Training and evaluation: seeding, the GPU when present, a ``tqdm.auto`` progress bar,
a per-epoch history, and a checksummed cache of trained models keyed by their config."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import atomic_save, data_dir, verified

__all__ = ["seed_everything", "get_device", "History", "evaluate", "fit", "load_or_train",
           "loss_and_correct",
           "config_key"]


def seed_everything(seed: int = 0) -> int:
    """Seed Python, NumPy and PyTorch; returns the seed so a notebook can print it."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def get_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class History:
    """Per-epoch training record."""
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def log(self, **values: float) -> None:
        for k, v in values.items():
            target = getattr(self, k) if k in ("train_loss", "train_acc", "test_loss",
                                                "test_acc") else self.extra.setdefault(k, [])
            target.append(float(v))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**d)


def loss_and_correct(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy and number of correct predictions; (N, T, C) sequence outputs
    count every position."""
    if out.dim() == 3:
        out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    return F.cross_entropy(out, y), int((out.argmax(1) == y).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | None = None
             ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (in %) of ``model`` in evaluation mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        batch_loss, batch_correct = loss_and_correct(model(x), y)
        loss += batch_loss.item() * y.numel()
        correct += batch_correct
        n += y.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got an empty loader")
    return loss / n, 100.0 * correct / n


def fit(model: nn.Module, train_loader: Iterable, epochs: int,
        optimizer: torch.optim.Optimizer, test_loader: Iterable | None = None,
        lr_schedule: str | None = "cosine", history: History | None = None,
        on_step: Callable[[int], None] | None = None,
        on_epoch: Callable[[int, History], None] | None = None,
        on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        penalty: Callable[[nn.Module], torch.Tensor] | None = None,
        progress: bool = True, desc: str = "train") -> History:
    """Train ``model`` for ``epochs`` with ``optimizer`` and return its :class:`History`.

    ``lr_schedule="cosine"`` anneals the learning rate to zero over the run;
    ``None`` keeps it fixed. ``on_step(step)`` runs after every optimizer step and
    ``on_epoch(epoch, history)`` after every epoch (temperature schedules use them);
    ``on_batch(x, y)`` gets each training batch after its step (SLB's second pass).
    ``penalty(model)`` is added to the loss (an L1 penalty, say); the history records the
    cross-entropy alone.
    Pass ``history`` to continue a record across phases (SGD, then PSGD).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}")
    if lr_schedule not in (None, "cosine"):
        raise ValueError(f"lr_schedule must be 'cosine' or None, got {lr_schedule!r}")
    device = next(model.parameters()).device
    history = history or History()
    steps = epochs * len(train_loader)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
             if lr_schedule == "cosine" else None)
    step = 0
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=True)
    for epoch in bar:
        model.train()
        total, correct, n = 0.0, 0, 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            loss, batch_correct = loss_and_correct(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged at epoch {epoch}, step {step}: loss is {loss.item()}; "
                    "lower the learning rate (or the scale λ_s)")
            optimizer.zero_grad(set_to_none=True)
            (loss + penalty(model) if penalty is not None else loss).backward()
            optimizer.step()
            if sched is not None:
                sched.step()
            step += 1
            if on_batch is not None:
                on_batch(x, y)
            if on_step is not None:
                on_step(step)
            total += loss.item() * y.numel()
            correct += batch_correct
            n += y.numel()
        history.log(train_loss=total / n, train_acc=100.0 * correct / n)
        if test_loader is not None:
            tl, ta = evaluate(model, test_loader, device)
            history.log(test_loss=tl, test_acc=ta)
            bar.set_postfix(loss=f"{total / n:.3f}", test_acc=f"{ta:.1f}")
        if on_epoch is not None:
            on_epoch(epoch, history)
    return history


#: Modules that never touch a model's training (figures, the notebooks' helpers, timing,
#: landscape plots): left out of the cache key, so that editing them keeps trained models.
NOT_TRAINING = ("bench.py", "book.py", "landscape.py", "plots.py")


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    """SHA-256 of the package's source files, all but :data:`NOT_TRAINING` (any change to
    code that can change a trained model makes a new cache key). Read once per process:
    the code that trains is the code that was imported."""
    from pathlib import Path
    h = hashlib.sha256()
    for f in sorted(Path(__file__).resolve().parent.glob("*.py")):
        if f.name in NOT_TRAINING:
            continue
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def config_key(config: dict) -> str:
    """A short, stable hash of a JSON-serializable config and of everything else that
    changes a trained model: the package source, torch's version, the device and the
    CPU thread count (the order of floating-point sums)."""
    from . import __version__
    blob = json.dumps({"config": config, "lowbit": __version__, "source": _source_hash(),
                       "torch": torch.__version__, "device": str(get_device()),
                       "threads": torch.get_num_threads()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_train(config: dict, build: Callable[[], nn.Module],
                  train: Callable[[nn.Module], History], cache: bool | None = None
                  ) -> tuple[nn.Module, History]:
    """Return a trained model and its history, from the cache when it holds this config.

    ``build()`` makes the untrained model (same architecture every time);
    ``train(model)`` trains it in place and returns its :class:`History`. The cache
    lives in ``data_dir()/models`` (outside git), keyed by :func:`config_key`, with a
    SHA-256 beside each file; it is read with ``weights_only=True``. A corrupt entry
    is retrained. ``cache=False`` (or ``LOWBIT_NO_CACHE=1``) always trains.
    """
    if cache is None:
        cache = os.environ.get("LOWBIT_NO_CACHE", "") in ("", "0")
    path = data_dir() / "models" / f"{config.get('name', 'model')}-{config_key(config)}.pt"
    model = build()
    if cache and path.exists():
        if verified(path):
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["state_dict"])
            return model.to(get_device()), History.from_dict(blob["history"])
        warnings.warn(f"cached model {path} fails its checksum; training it again")
    model = model.to(get_device())
    history = train(model)
    if cache:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_save(path, lambda tmp: torch.save(
            {"state_dict": state, "history": history.to_dict(),
             "config": json.dumps(config, sort_keys=True, default=str)}, tmp))
    return model, history
