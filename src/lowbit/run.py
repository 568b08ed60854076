"""Train one of the book's recipes from the command line: ``python -m lowbit.run`` (installed
as ``lowbit``), on one process or, launched with ``torchrun --nproc_per_node=N``, on N with
DistributedDataParallel (NCCL on GPUs, gloo on CPUs). A checkpoint is written at the end of
every epoch; the same command, run again, continues from it.

The recipes are Part IV's (:class:`lowbit.recipes.LowBitConfig`): ``--method`` makes the
weights low-bit — ``fp`` (none), ``sgd`` (SGD, then data-free PTQ), ``ste`` (SGD for
``--start-epochs``, then STE-QAT), ``psgd`` (SGD, then PSGD aimed at the grid, then PTQ) or
``slb`` (SLB from scratch) — with ``--act-bits`` and, for fully quantized training,
``--grad-quantizer pt|psq|bhq`` at ``--grad-bits``. Settings come from flags or from a YAML
file (``--config run.yaml``, the flags' names as keys; a flag given too wins).

Distributed runs (the "At paper scale" page says more):

- The global batch (``--batch-size``) is the same whatever the number of processes: each
  global batch is split into one contiguous share per process, the loss is the global
  batch's mean (each process's sum over its share, scaled by N / global size), and DDP's
  average of the gradients is then the one-process gradient, up to the order of float sums.
  One process trains exactly as the book's :func:`lowbit.recipes.train_lowbit` does: the
  same data order, initialisation, phases and updates, so the same weights, bit for bit.
- What still differs with N: BatchNorm normalizes each process's share with that share's
  statistics (on GPUs ``--sync-bn`` uses SyncBatchNorm instead); its running statistics,
  and SLB's discrete ones, are rank 0's (DDP broadcasts buffers from rank 0 at every
  forward). FQT's PT and BHQ quantizers take their range and grouping over each share
  (PSQ's per-sample ranges do not change), and each process draws its own stochastic
  rounding (rank r from seed + r), which keeps the gradient unbiased. PSGD's scale and SLB's
  temperature are computed from the weights and the step count, which every process shares.
- Metrics are summed over the processes; only rank 0 writes files.

A checkpoint (``OUT/checkpoint.pt``, written atomically with its SHA-256 by
:func:`lowbit.cache.write_entry`, loaded with ``weights_only=True``) holds the model, the
optimizer, the learning-rate schedule, SLB's temperature clock, the random states, the phase
and the epoch. Each epoch's data order is a function of the seed and the epoch, so a run
killed at any point and started again with the same command ends bit-identical to one that
was never interrupted (on the same machine and thread count).

Nothing is lost: a checkpoint is never discarded (one that fails its checksum, was written
by a run of other settings or contradicts them is refused, naming the file; ``--restart``
starts over), a write that fails stops the run at once and keeps the last good checkpoint,
and every setting is checked by type and meaning where it enters.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import io
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import data as data_, fqt, models, quant, recipes, slb
from .cache import read_entry, write_entry
from .train import History, cross_entropy, diverged, seed_everything

__all__ = ["RunConfig", "METHODS", "load_data", "load_config", "build_parser",
           "config_from_args", "train", "main", "console"]

#: The weight methods of ``--method`` (Part IV's :data:`lowbit.recipes.WEIGHT_METHODS`).
METHODS = recipes.WEIGHT_METHODS
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class RunConfig:
    """One run of ``python -m lowbit.run``; each field is a flag (``--weight-bits``...)."""
    method: str = "ste"
    weight_bits: int | None = 4
    act_bits: int | None = None
    grad_quantizer: str | None = None
    grad_bits: int = 8
    data: str = "mnist"
    data_dir: str | None = None
    model: str = "cnn"
    epochs: int = 5
    start_epochs: int = 2
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    out: str = "runs/lowbit"
    device: str = "auto"
    sync_bn: bool = False
    progress: bool = True
    restart: bool = False

    def lowbit(self) -> recipes.LowBitConfig:
        """The Part IV configuration (it checks the method, bits and epochs)."""
        return recipes.LowBitConfig(self.method, None if self.method == "fp" else self.weight_bits,
                                    self.act_bits, self.grad_quantizer, self.grad_bits,
                                    self.epochs, self.start_epochs)

    def check(self) -> "RunConfig":
        """Every setting checked by type (a boolean is not a number), range and meaning,
        each error naming the setting, the value and what is allowed."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("epochs", "batch_size", "start_epochs", "grad_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name != "start_epochs"):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'start_epochs' else 'positive'} "
                                 f"integer, got {value!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("data", "model", "out"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.data_dir is not None and (not isinstance(self.data_dir, str) or not self.data_dir):
            raise ValueError(f"data_dir must be a folder's path, got {self.data_dir!r}")
        for name in ("sync_bn", "progress", "restart"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.method == "fp" and (self.weight_bits not in (None, RunConfig.weight_bits)
                                    or self.act_bits is not None):
            raise ValueError("method fp trains at full precision: it takes no weight_bits or "
                             f"act_bits (got {self.weight_bits!r} and {self.act_bits!r}); "
                             "choose sgd, ste, psgd or slb for low-bit weights")
        self.lowbit()
        return self


def _import(spec: str, what: str) -> Callable:
    """The function named by ``module:function`` (an error says which part is missing)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r} is neither a name lowbit knows nor 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


@dataclass
class _Data:
    """A train and a test set as tensors, or as map-style datasets."""
    train: Any
    test: Any
    input_shape: tuple[int, ...]

    @staticmethod
    def size(ds) -> int:
        return len(ds[1]) if isinstance(ds, tuple) else len(ds)

    @staticmethod
    def fetch(ds, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(ds, tuple):
            return ds[0][idx], ds[1][idx]
        x, y = torch.utils.data.default_collate([ds[int(i)] for i in idx])
        return torch.as_tensor(x), torch.as_tensor(y)


def load_data(cfg: RunConfig) -> _Data:
    """The run's data: a packaged data set (``mnist``, ``digits``, ``mnist1d``), ``cifar10``
    from ``--data-dir`` (your own copy), or ``module:function``, called as ``function(train=
    True)`` and ``function(train=False)``, each returning a ``torch.utils.data.Dataset`` of
    ``(input, label)`` pairs."""
    if cfg.data in data_.DATASETS:
        s = data_.load_arrays(cfg.data, cfg.seed)
        as_t = torch.as_tensor
        return _Data((as_t(s.x_train), as_t(s.y_train)), (as_t(s.x_test), as_t(s.y_test)),
                     s.input_shape)
    if cfg.data == "cifar10":
        if cfg.data_dir is None:
            raise ValueError("data 'cifar10' needs --data-dir, the folder of your copy of "
                             "cifar-10-batches-py (nothing is downloaded)")
        if not Path(cfg.data_dir).is_dir():
            raise FileNotFoundError(f"data folder {cfg.data_dir!r} does not exist")
        train_l, test_l = data_.load_cifar10(cfg.data_dir, seed=cfg.seed)
        return _Data((train_l.x, train_l.y), (test_l.x, test_l.y), tuple(train_l.x.shape[1:]))
    fn = _import(cfg.data, "data")
    sets = [fn(train=True), fn(train=False)]
    for name, ds in zip(("train", "test"), sets):
        if not isinstance(ds, torch.utils.data.Dataset):
            raise TypeError(f"data {cfg.data!r} returned {type(ds).__name__} for the {name} "
                            "set, not a torch.utils.data.Dataset")
    sets = [ds.tensors if isinstance(ds, torch.utils.data.TensorDataset) else ds for ds in sets]
    for name, ds in zip(("train", "test"), sets):
        if _Data.size(ds) == 0:
            raise ValueError(f"data {cfg.data!r} returned an empty {name} set")
    first = _Data.fetch(sets[0], torch.tensor([0]))[0]
    return _Data(sets[0], sets[1], tuple(first.shape[1:]))


def _plain_model(cfg: RunConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """The untrained full-precision model, initialised from the seed."""
    seed_everything(cfg.seed)
    if ":" in cfg.model:
        model = _import(cfg.model, "model")()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model {cfg.model!r} returned {type(model).__name__}, not an nn.Module")
        return model
    return models.build_model(cfg.model, input_shape)


def _phases(lb: recipes.LowBitConfig) -> list[tuple[str, int]]:
    """``(name, epochs)`` of each phase: STE-QAT and PSGD start with SGD, as in the book."""
    if lb.weights in ("ste", "psgd"):
        return [("start", lb.start_epochs), (lb.weights, lb.epochs - lb.start_epochs)]
    return [(lb.weights, lb.epochs)]


class _Dist:
    """This process's place in the run: rank, world size, device (one process: 0, 1)."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no GPU")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _epoch_order(n: int, seed: int, k: int) -> torch.Tensor:
    """The k-th shuffle (from 0) of a generator seeded with ``seed``: the order of the k-th
    epoch of a phase, as :class:`lowbit.data.ArrayLoader` draws it, recomputed on resume."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(k):
        torch.randperm(n, generator=g)
    return torch.randperm(n, generator=g)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(
        np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
        "numpy_pos": np.random.get_state()[2], "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Phase:
    """The model, optimizer, schedule and hooks of one phase."""

    def __init__(self, name: str, epochs: int, model: nn.Module, cfg: RunConfig,
                 lb: recipes.LowBitConfig, steps_per_epoch: int, where: _Dist) -> None:
        self.name, self.epochs = name, epochs
        r = recipes.Recipe(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           seed=cfg.seed, batch_size=cfg.batch_size)
        self.model = model.to(where.device)
        self.generator = None
        if lb.grad_quantizer is not None and name != "start":
            self.generator = torch.Generator(device=where.device).manual_seed(cfg.seed + where.rank)
            fqt.configure(self.model, generator=self.generator)
        if name == "start":
            self.optimizer, self.after = torch.optim.SGD(
                self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                weight_decay=cfg.weight_decay), None
        else:
            self.optimizer, self.after = recipes.lowbit_optimizer(self.model, r, lb)
        total = max(epochs * steps_per_epoch, 1)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total)
        self.annealer = slb.Annealer(self.model, recipes.SLBConfig.schedule, total) \
            if name == "slb" else None
        self.ddp = self.model
        if where.world > 1:
            if cfg.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[where.device.index] if where.device.type == "cuda" else None)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "annealer": self.annealer.count if self.annealer else None,
                "generator": self.generator.get_state() if self.generator is not None else None}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.annealer is not None:
            self.annealer.count = state["annealer"]
            slb.set_temperature(self.model, self.annealer.temperature)
        if self.generator is not None:
            self.generator.set_state(state["generator"])


def _make_phase(index: int, cfg: RunConfig, lb: recipes.LowBitConfig, data: _Data,
                steps: int, where: _Dist, previous: nn.Module | None) -> _Phase:
    name, epochs = _phases(lb)[index]
    base = _plain_model(cfg, data.input_shape)
    if name == "start":
        model = base
    else:
        model = recipes.lowbit_form(base, lb, cfg.seed)
        if previous is not None:  # the low-bit phase starts where SGD ended
            start = quant.prepare_qat(previous, lb.weight_bits, lb.act_bits) \
                if lb.weights == "ste" else previous
            recipes.load_unwrapped(model, start.state_dict())
    seed_everything(cfg.seed)  # as the book does before each phase's training
    return _Phase(name, epochs, model, cfg, lb, steps, where)


def _evaluate(model: nn.Module, data: _Data, where: _Dist, batch: int = 512) -> tuple[float, float]:
    """Test loss and accuracy (%), each process taking its share of the test set."""
    n = _Data.size(data.test)
    mine = torch.arange(n).tensor_split(where.world)[where.rank]
    was = model.training
    model.eval()
    loss = correct = 0.0
    with torch.no_grad():
        for idx in mine.split(batch):
            x, y = (t.to(where.device) for t in _Data.fetch(data.test, idx))
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    model.train(was)
    loss, correct = where.sum(loss, correct)
    return loss / n, 100.0 * correct / n


def _sync(where: _Dist) -> None:
    """Wait for the device's queued work, so that a timing covers it."""
    if where.device.type == "cuda":
        torch.cuda.synchronize(where.device)


def _write_csv(path: Path, history: History) -> None:
    d = history.to_dict()
    rows = {**{k: v for k, v in d.items() if k != "extra"}, **d["extra"]}
    names = [k for k, v in rows.items() if v]
    n = max(len(rows[k]) for k in names)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch"] + names)
            for i in range(n):
                w.writerow([i + 1] + [rows[k][i] if i < len(rows[k]) else "" for k in names])
        tmp.replace(path)
    except OSError as e:
        raise OSError(f"could not write {path} ({type(e).__name__}: {e}); the checkpoint "
                      "of this epoch was written") from None
    finally:
        tmp.unlink(missing_ok=True)


#: The settings that do not change what a run computes (a checkpoint of other ones resumes).
_NOT_COMPARED = ("out", "progress", "device", "restart")


def _load_checkpoint(path: Path, cfg: RunConfig, lb: recipes.LowBitConfig) -> dict | None:
    """The checkpoint at ``path`` (None when there is none). One that fails its checksum,
    was written by a run of other settings or contradicts them is refused, never discarded:
    the error names the file, what is wrong, and ``--restart``."""
    restart = "pass --restart to discard it and start again, or give another --out"
    try:
        payload = read_entry(path, strict=True)
        if payload is None:
            return None
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as e:  # a checksum, an unpickling or a format error
        raise ValueError(f"cannot resume from {path}: {e}; it was kept as it is: {restart}") from None
    if not isinstance(state, dict) or not {"config", "epoch", "phase_index", "history",
                                           "phase", "rng"} <= set(state):
        raise ValueError(f"cannot resume from {path}: it is not a lowbit run's checkpoint; {restart}")
    saved = state["config"] if isinstance(state["config"], dict) else {}
    differ = {k: (saved.get(k), v) for k, v in asdict(cfg).items()
              if k not in _NOT_COMPARED and saved.get(k) != v}
    if differ:
        raise ValueError(f"{path.parent} holds a run with other settings "
                         f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in differ.items())}): "
                         f"run with its settings to resume it, give another --out, or pass "
                         f"--restart to discard it")
    epoch, index, phases = state["epoch"], state["phase_index"], _phases(lb)
    starts = np.cumsum([0] + [e for _, e in phases])
    if (isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= lb.epochs
            or isinstance(index, bool) or not isinstance(index, int)
            or not 0 <= index < len(phases) or not starts[index] < epoch <= starts[index + 1]):
        raise ValueError(f"cannot resume from {path}: it says epoch {epoch!r} of phase "
                         f"{index!r}, but the run has {lb.epochs} epochs in {len(phases)} "
                         f"phase(s); {restart}")
    return state


def _prepare_out(out: Path, restart: bool) -> None:
    """Make the output folder and check it can be written before any training; remove the
    temporary files of runs that were killed while writing (their process is gone);
    with ``restart``, remove the run that was there (checkpoint, metrics, model)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({type(e).__name__}: {e}); "
                         "give a folder you can write to") from None
    for tmp in out.glob(".*.tmp"):
        parts = tmp.name.split(".")
        pid = next((int(p) for p in parts if p.isdigit()), None)
        if pid is None or not _alive(pid):
            tmp.unlink(missing_ok=True)
    if restart:
        for name in (CHECKPOINT, "metrics.csv", "model.pt"):
            (out / name).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` is running (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, under another user
        return True
    return True


def train(cfg: RunConfig) -> dict:
    """Run ``cfg`` to the end (resuming from ``cfg.out``'s checkpoint if there is one) and
    return the final metrics. Under torchrun every process calls this."""
    cfg.check()
    lb = cfg.lowbit()
    data = load_data(cfg)
    where = _Dist(cfg.device)
    try:
        return _train(cfg, lb, data, where)
    finally:
        where.close()


def _train(cfg: RunConfig, lb: recipes.LowBitConfig, data: _Data, where: _Dist) -> dict:
    out = Path(cfg.out)
    lead = where.rank == 0
    if lead:
        _prepare_out(out, cfg.restart)
    n = _Data.size(data.train)
    if cfg.sync_bn and where.device.type != "cuda":
        raise ValueError("--sync-bn needs GPUs (SyncBatchNorm runs on CUDA, with NCCL); on CPUs "
                         "each process normalizes its own share of the batch")
    if cfg.batch_size < where.world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {where.world} processes")
    batches = [b for b in range(0, n, cfg.batch_size) if n - b >= where.world]
    steps = len(batches)
    starts = np.cumsum([0] + [e for _, e in _phases(lb)])  # first epoch of each phase
    state = _load_checkpoint(out / CHECKPOINT, cfg, lb)
    history, epoch, index = History(), 0, 0
    if state is not None:  # the phase it was written in; the loop moves on from there
        history, epoch = History.from_dict(state["history"]), int(state["epoch"])
        index = int(state["phase_index"])
    phase = _make_phase(index, cfg, lb, data, steps, where, None)
    if state is not None:
        phase.load(state["phase"])
        _set_rng_state(state["rng"])
        if lead:
            print(f"resuming {out / CHECKPOINT}: {epoch} of {lb.epochs} epochs done")
    clock = time.perf_counter()
    speed = [0.0, 0.0]  # seconds in the training steps, and their images (this process)
    bar = tqdm(total=lb.epochs * steps, initial=epoch * steps, disable=not (lead and cfg.progress),
               desc=f"{cfg.method} {lb.name}", unit="step")
    while epoch < lb.epochs:
        if epoch == starts[index + 1]:  # the next phase begins where this one ended
            index += 1
            phase = _make_phase(index, cfg, lb, data, steps, where, phase.model)
        order = _epoch_order(n, cfg.seed, epoch - int(starts[index]))
        loss_sum, correct, seen = _train_epoch(phase, data, batches, order, cfg, where, epoch,
                                               bar, speed)
        test_loss, test_acc = _evaluate(phase.model, data, where)
        history.log(train_loss=loss_sum / seen, train_acc=100.0 * correct / seen,
                    test_loss=test_loss, test_acc=test_acc)
        if phase.annealer is not None:
            history.log(temperature=phase.annealer.temperature)
        epoch += 1
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", test_acc=f"{test_acc:.1f}")
        if lead:
            payload = io.BytesIO()
            torch.save({"config": asdict(cfg), "epoch": epoch, "phase_index": index,
                        "history": history.to_dict(), "phase": phase.state(),
                        "rng": _rng_state()}, payload)
            # a write that fails stops the run here; the last good checkpoint is kept
            write_entry(out / CHECKPOINT, payload.getvalue(), strict=True)
            _write_csv(out / "metrics.csv", history)
    bar.close()
    return _finish(phase.model, cfg, lb, data, where, history,
                   {"seconds": time.perf_counter() - clock,
                    # this process's training steps alone (no evaluation or checkpoint)
                    "train_images_per_second": speed[1] / speed[0] if speed[0] else 0.0})


def _train_epoch(phase: _Phase, data: _Data, batches: list[int], order: torch.Tensor,
                 cfg: RunConfig, where: _Dist, epoch: int, bar, speed: list[float]
                 ) -> tuple[float, float, float]:
    """One epoch of ``phase`` over the global batches starting at ``batches`` in ``order``,
    each process taking its share; the loss sum, correct count and images of every process
    (and this process's seconds and images added to ``speed``)."""
    kill_at = int(os.environ.get("LOWBIT_RUN_KILL_AT_STEP", "0"))  # tests: a kill mid-epoch
    phase.ddp.train()
    loss_sum = correct = seen = 0.0
    started = time.perf_counter()
    for i, b in enumerate(batches):
        idx = order[b:b + cfg.batch_size]
        mine = idx.tensor_split(where.world)[where.rank]
        x, y = (t.to(where.device) for t in _Data.fetch(data.train, mine))
        logits = phase.ddp(x)
        if where.world == 1:  # the mean, as lowbit.train.fit takes it: the book's run exactly
            loss = cross_entropy(logits, y)
            scaled, loss_total = loss, loss.item() * len(y)
        else:  # this share's sum, scaled so that DDP's average is the global batch's mean
            loss = cross_entropy(logits, y, reduction="sum")
            scaled, loss_total = loss * (where.world / len(idx)), loss.item()
        if not torch.isfinite(loss):
            raise diverged(epoch + 1, i, loss, x)
        phase.optimizer.zero_grad(set_to_none=True)
        scaled.backward()
        phase.optimizer.step()
        phase.schedule.step()
        if phase.after is not None:  # SLB's second pass for the discrete statistics
            phase.after(x)
        if phase.annealer is not None:
            phase.annealer.step()
        loss_sum += loss_total
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.update(1)
        if kill_at and epoch * len(batches) + i + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    _sync(where)
    speed[0] += time.perf_counter() - started
    speed[1] += seen
    return tuple(where.sum(loss_sum, correct, seen))


def _finish(model: nn.Module, cfg: RunConfig, lb: recipes.LowBitConfig, data: _Data,
            where: _Dist, history: History, timing: dict) -> dict:
    """Deploy the trained ``model`` (its low-bit form), measure it, write ``model.pt`` (rank
    0) and return the run's result."""
    out = Path(cfg.out)
    deployed = recipes.deploy(model, lb)
    _, deployed_acc = _evaluate(deployed, data, where)
    result = {"method": cfg.method, "setting": lb.name, "epochs": lb.epochs,
              "processes": where.world, "test_acc": history.test_acc[-1],
              "deployed_acc": deployed_acc, **timing}
    if where.rank == 0:
        tmp = out / f".model.pt.{os.getpid()}.tmp"  # a plain torch file, written atomically
        try:
            torch.save(deployed.state_dict(), tmp)
            tmp.replace(out / "model.pt")
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
            raise OSError(f"could not write {out / 'model.pt'} ({type(e).__name__}: {e}); the "
                          f"trained run is in {out / CHECKPOINT}: free some space and run the "
                          "same command again to write it") from None
        finally:
            tmp.unlink(missing_ok=True)
        print(f"result: {cfg.method} {lb.name}, {lb.epochs} epochs on {where.world} "
              f"process{'es' if where.world > 1 else ''}: low-bit test accuracy "
              f"{deployed_acc:.2f}% (trained model {history.test_acc[-1]:.2f}%); "
              f"metrics in {out / 'metrics.csv'}")
    return result


def load_config(path: str | os.PathLike) -> dict:
    """The settings of a YAML file: a mapping of :class:`RunConfig` field names (dashes or
    underscores) to values; an unknown key is an error that names it."""
    import yaml
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:  # one line, with the place: a syntax error or a python/ tag
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {str(p)!r}: {where}{problem} (settings are plain "
                         "YAML keys and values, no tags)") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping of settings, "
                         f"got {type(raw).__name__}")
    known = {f.name for f in fields(RunConfig)}
    settings = {}
    for k, v in raw.items():
        name = str(k).replace("-", "_")
        if name in settings:
            raise ValueError(f"config file {str(p)!r} gives {name} twice (as "
                             f"{name.replace('_', '-')} and {name}); keep one")
        settings[name] = v
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"config file {str(p)!r}: unknown setting(s) {unknown}; "
                         f"known: {sorted(known)}")
    return settings


def _bits(text: str) -> int | None:
    return None if text.lower() in ("none", "32", "fp") else int(text)


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags, one per :class:`RunConfig` field, plus ``--config``; a flag
    left out is None, so that the YAML file's value (or the default) stands."""
    p = argparse.ArgumentParser(prog="lowbit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = RunConfig()
    p.add_argument("--config", help="a YAML file of settings (flags given too win)")
    p.add_argument("--method", choices=METHODS, help=f"how the weights become low-bit (default {d.method})")
    p.add_argument("--weight-bits", type=_bits, help=f"weight bits (default {d.weight_bits})")
    p.add_argument("--act-bits", type=_bits, help="activation bits (default: full precision)")
    p.add_argument("--grad-quantizer", choices=fqt.QUANTIZERS,
                   help="quantize every layer's output gradient (FQT) with this quantizer")
    p.add_argument("--grad-bits", type=int, help=f"gradient bits (default {d.grad_bits})")
    p.add_argument("--data", help=f"mnist, digits, mnist1d, cifar10 (with --data-dir) or "
                                  f"module:function (default {d.data})")
    p.add_argument("--data-dir", help="the folder of your CIFAR-10 copy (cifar-10-batches-py)")
    p.add_argument("--model", help=f"cnn, cnn8, mlp, resnet20, or module:function (default {d.model})")
    p.add_argument("--epochs", type=int, help=f"epochs in all (default {d.epochs})")
    p.add_argument("--start-epochs", type=int,
                   help=f"SGD epochs before STE-QAT or PSGD (default {d.start_epochs})")
    p.add_argument("--batch-size", type=int,
                   help=f"global batch size, whatever the number of processes (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"SGD's learning rate (default {d.lr})")
    p.add_argument("--momentum", type=float, help=f"(default {d.momentum})")
    p.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    p.add_argument("--seed", type=int, help=f"(default {d.seed})")
    p.add_argument("--out", help=f"folder for the checkpoint, metrics.csv and model.pt (default {d.out})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="(default auto)")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="SyncBatchNorm across processes (GPUs)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    p.add_argument("--restart", action="store_true", default=None,
                   help="discard the run in --out (checkpoint, metrics, model) and start again")
    return p


def config_from_args(argv: list[str] | None = None) -> RunConfig:
    """The :class:`RunConfig` of a command line: defaults, then the YAML file, then flags.
    A bad setting exits with a message that names it (argparse's ``error``)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        path = args.pop("config")
        settings = load_config(path) if path else {}
        settings.update({k: v for k, v in args.items() if v is not None})
        return RunConfig(**settings).check()
    except (ValueError, FileNotFoundError, TypeError) as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_args(argv)
    try:
        return train(cfg)
    except (ValueError, OSError, TypeError, FloatingPointError) as e:
        # bad input found once the data or model is loaded: one line, not a traceback
        print(f"lowbit: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def console() -> int:
    """The ``lowbit`` console script (``main``'s result is printed, not returned as a status)."""
    main()
    return 0


if __name__ == "__main__":
    main()
