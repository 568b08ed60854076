"""Training and evaluation: seeding, the GPU when present, a ``tqdm.auto`` progress bar and
a per-epoch history. (Trained models are cached by :func:`lowbit.cache.load_or_train`.)"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


__all__ = ["seed_everything", "get_device", "History", "evaluate", "fit", "loss_and_correct",
           "cross_entropy", "diverged", "progress_bar"]


def _bars_off() -> bool:
    """``LOWBIT_PROGRESS=0``: no progress bars (the book build sets it)."""
    return os.environ.get("LOWBIT_PROGRESS", "1") == "0"


def progress_bar(iterable, desc: str = "", total: int | None = None, enabled: bool = True):
    """``tqdm.auto`` over ``iterable`` while a person watches; the iterable itself when
    ``enabled`` is False or ``LOWBIT_PROGRESS=0`` (the book build sets it, so that no bar
    reaches the HTML)."""
    if not enabled or _bars_off():
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


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
    return cross_entropy(out, y), int((out.argmax(1) == y).sum())


def cross_entropy(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy``, with an error that names the model's outputs and the labels when
    they do not fit (a label outside 0..C−1, or a batch of another size)."""
    try:
        return F.cross_entropy(out, y, reduction=reduction)
    except (IndexError, RuntimeError, ValueError) as e:
        c = out.shape[-1] if out.dim() else 0
        labels = f"from {int(y.min())} to {int(y.max())}" if y.numel() else "none"
        raise ValueError(f"the model's outputs do not fit the labels: it gives {c} outputs per "
                         f"example (shape {tuple(out.shape)}), the labels (shape "
                         f"{tuple(y.shape)}) go {labels}; a label must be 0..{c - 1}, one per "
                         f"example ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def diverged(epoch: int, step: int, loss: torch.Tensor, x: torch.Tensor) -> Exception:
    """The error for a non-finite loss: bad input data (named) or a diverged run."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        return ValueError(f"the training batch at epoch {epoch}, step {step} holds "
                          f"{int((~torch.isfinite(x)).sum())} non-finite input value(s) "
                          "(NaN or inf): check the data")
    return FloatingPointError(
        f"training diverged at epoch {epoch}, step {step}: loss is {loss.item()}; "
        "lower the learning rate (or the scale λ_s)")


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
    bar = tqdm(range(epochs), desc=desc, leave=True,
               disable=not progress or _bars_off())
    for epoch in bar:
        model.train()
        total, correct, n = 0.0, 0, 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            loss, batch_correct = loss_and_correct(model(x), y)
            if not torch.isfinite(loss):
                raise diverged(epoch, step, loss, x)
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
