"""The project's benchmark: ``python -m lowbit.bench`` prints one ``name: value`` line
per figure. Every figure is a ratio of two timings taken in the same process, so it
compares like with like on whatever machine runs it.

Timings are taken after a warm-up, in pairs of back-to-back calls (see :func:`ratio`).
Each benchmark runs in fresh processes (``--processes``, 3 by default) and a figure is
the median of theirs, as pyperf runs its worker processes: on the book's machine one
process's figure moved by up to ±0.05 from the next process's (the heap's history decides
which steps take page faults), more than the pairs' own spread. Each process's figures go
to standard error.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from .quant import quantize_symmetric

__all__ = ["median_time", "ratio", "train_step", "bench_fake_quant", "bench_cli", "BENCHMARKS",
           "run_benchmarks", "median_of", "main"]


def _sync() -> None:
    """Wait for queued CUDA work, so that a timing covers it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int = 15, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA work is synchronized)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ratio(fn: Callable[[], object], baseline: Callable[[], object], repeats: int = 15) -> float:
    """time(fn) / time(baseline), measured in one run: the median over ``repeats`` pairs of
    back-to-back calls (in alternating order) of the ratio within the pair, after a warm-up
    and with the garbage collector off, as in ``timeit``. A pair shares the machine's
    momentary load, so the ratio is steadier than the ratio of two separate medians."""
    for _ in range(3):
        fn()
        baseline()
    _sync()
    ratios = []
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            times = {}
            for f in ((fn, baseline) if i % 2 == 0 else (baseline, fn)):
                t0 = time.perf_counter()
                f()
                _sync()
                times[f] = time.perf_counter() - t0
            ratios.append(times[fn] / times[baseline])
    finally:
        if gc_was_on:
            gc.enable()
    return statistics.median(ratios)


def bench_fake_quant(n: int = 16 * 2 ** 20, bits: int = 4) -> dict[str, float]:
    """Per-tensor fake-quantize of an n-element tensor against ``x.clone()``."""
    x = torch.randn(n, device="cuda" if torch.cuda.is_available() else "cpu")
    return {"fake_quant_per_tensor_vs_clone":
            ratio(lambda: quantize_symmetric(x, bits), lambda: x.clone(), repeats=60)}


#: Pairs of training steps per figure. A step of the book's CNN takes 5-9 ms on two CPU
#: cores, and its time moves with the machine's load: the median of 60 pairs moved by up
#: to ±0.04 between runs on the book's machine, the median of 200 by about half that.
STEP_PAIRS = 200


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, after: Callable[[], None] | None = None) -> Callable[[], None]:
    """A function that runs one training step (forward, cross-entropy, backward, optimizer)
    on the batch (x, y), then ``after()`` if given (SLB's second pass, say): what the
    benchmarks and the chapters' timings time."""
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if after is not None:
            after()
    return step


def training_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a training run keeps from step to step: the trainable parameters and the
    optimizer's state (momentum, Adam's moments; run one step first so that it exists).
    Activations and gradients, which every method needs alike, are left out."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                for v in s.values() if isinstance(v, torch.Tensor))
    return params + state


def bench_psgd() -> dict[str, float]:
    """A full training step (forward, backward, optimizer) with PSGD against the same
    step with ``torch.optim.SGD``, on the book's CNN (MNIST-sized batch of 32) and on
    ResNet-20 (CIFAR-sized batch of 32). Both optimizers train the same model, so the
    steps differ in the optimizer alone: two copies of a model, alike in every weight, can
    differ by a few per cent in speed where their tensors lie in memory."""
    from .models import SmallCNN, resnet20
    from .psgd import PSGD, param_groups
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, make, shape in [("cnn", SmallCNN, (32, 1, 28, 28)),
                              ("resnet20", resnet20, (32, 3, 32, 32))]:
        torch.manual_seed(0)
        x, y = torch.randn(shape, device=device), torch.randint(0, 10, (shape[0],), device=device)
        model = make().to(device)
        sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        ps = PSGD(param_groups(model, bits=4), lr=0.01, momentum=0.9, weight_decay=5e-4)
        out[f"psgd_step_vs_sgd_{name}"] = ratio(train_step(model, ps, x, y),
                                                train_step(model, sgd, x, y), repeats=STEP_PAIRS)
    return out


#: The book's CNN and the half-width one that Parts II and III train, by bench name.
CNNS = [("cnn", (16, 32)), ("cnn8", (8, 16))]


def _mnist_batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch of 32 MNIST-shaped images and labels."""
    torch.manual_seed(0)
    return (torch.randn(32, 1, 28, 28, device=device),
            torch.randint(0, 10, (32,), device=device))


def bench_slb(bits: int = 2) -> dict[str, float]:
    """An SLB training step (expectation forward, backward, Adam on the logits, and the
    state-BN pass of the discrete network) against an STE-QAT step (SGD) at ``bits`` on the
    book's CNN and its half-width version used by Part II; and the ratio of trainable
    parameter memory."""
    from .models import SmallCNN
    from .quant import prepare_qat
    from .slb import convert, parameter_memory, update_discrete_stats
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, widths in CNNS:
        x, y = _mnist_batch(device)
        base = SmallCNN(widths=widths).to(device)
        qat, s = prepare_qat(base, bits), convert(base, bits)
        sgd = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9)
        adam = torch.optim.Adam(s.parameters(), lr=0.01, fused=True)  # as recipes.train_slb
        step = train_step(s, adam, x, y, after=lambda: update_discrete_stats(s, x))
        out[f"slb_step_vs_ste_qat_{name}_w{bits}"] = ratio(step, train_step(qat, sgd, x, y),
                                                           repeats=STEP_PAIRS)
        out[f"slb_param_memory_vs_ste_qat_{name}_w{bits}"] = (parameter_memory(s) /
                                                              parameter_memory(qat))
    return out


def bench_fqt(grad_bits: int = 4) -> dict[str, float]:
    """A training step with FQT (PT, PSQ or BHQ gradients at ``grad_bits``, weight gradients
    at 8 bits) against the same step with QAT (8-bit forward, full-precision backward), on
    the book's CNN and on the half-width one Part III trains. SGD, batch of 32 images."""
    from .fqt import configure, convert
    from .models import SmallCNN
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, widths in CNNS:
        x, y = _mnist_batch(device)
        qat = convert(SmallCNN(widths=widths).to(device), "qat")
        base = train_step(qat, torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9), x, y)
        for q in ("pt", "psq", "bhq"):
            m = convert(SmallCNN(widths=widths).to(device), "fqt", q, grad_bits)
            configure(m, generator=torch.Generator(device=device).manual_seed(0))
            step = train_step(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), x, y)
            out[f"fqt_{q}_step_vs_qat_{name}"] = ratio(step, base, repeats=STEP_PAIRS)
    return out


def _bare_loop(input_shape: tuple[int, ...], phases: list[tuple[bool, int]],
               x_all: torch.Tensor, y_all: torch.Tensor, cfg) -> float:
    """Images per second of a bare PyTorch loop training the book's CNN on ``x_all``,
    ``y_all`` with ``cfg``'s batch and SGD settings, through ``phases`` of (STE-QAT at 4
    bits?, epochs): the loop :func:`bench_cli` holds the command line against."""
    from .models import build_model
    from .quant import prepare_qat
    torch.manual_seed(0)
    model = build_model("cnn", input_shape).to(x_all.device)
    seen, seconds = 0, 0.0
    for qat, epochs in phases:
        if qat:
            model = prepare_qat(model, 4)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        for _ in range(epochs):
            t0 = time.perf_counter()
            order = torch.randperm(len(y_all), device=x_all.device)
            for i in range(0, len(y_all), cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            _sync()
            seconds += time.perf_counter() - t0
            seen += len(y_all)
    return seen / seconds


def bench_cli(epochs: int = 2, pairs: int = 5) -> dict[str, float]:
    """The command line's training throughput (the images per second of ``python -m
    lowbit.run``'s training steps, as its result reports them: a run of ``epochs``, its
    evaluation and checkpoints after each epoch not counted) over a bare PyTorch loop's
    (``for x, y in batches: loss.backward(); opt.step()``) on the same model, data, batch
    and optimizer, at full precision and with STE-QAT (4-bit weights, after an epoch of
    SGD) on the book's CNN and its MNIST digits. 1.0: the command line's loop costs nothing
    over the bare one."""
    import contextlib
    import io
    import tempfile

    from . import run
    if epochs < 2:
        raise ValueError(f"epochs must be at least 2 (STE-QAT starts after SGD), got {epochs}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for method in ("fp", "ste"):
            # STE-QAT: one epoch of SGD, then STE-QAT from there (as the command line runs)
            cfg = run.RunConfig(method=method, weight_bits=4, data="mnist", model="cnn",
                                epochs=epochs, start_epochs=epochs // 2, batch_size=64,
                                out=folder, device=device, progress=False, restart=True)
            phases = [(False, epochs)] if method == "fp" else \
                [(False, epochs // 2), (True, epochs - epochs // 2)]
            data = run.load_data(cfg)
            x_all, y_all = (t.to(device) for t in data.train)

            def cli() -> float:
                with contextlib.redirect_stdout(io.StringIO()):  # its closing line
                    return run.train(cfg)["train_images_per_second"]

            def bare() -> float:
                return _bare_loop(data.input_shape, phases, x_all, y_all, cfg)

            # the command line's images per second over the loop's: each pair run back to
            # back, in alternating order, after one run of each (as :func:`ratio` does)
            cli(), bare()
            pairs_ = [(cli(), bare()) if i % 2 == 0 else tuple(reversed((bare(), cli())))
                      for i in range(pairs)]
            out[f"cli_throughput_vs_loop_{method}"] = statistics.median(
                c / b for c, b in pairs_)
    return out


#: The benchmarks by name, each returning its ratios (``python -m lowbit.bench NAME``).
BENCHMARKS: dict[str, Callable[[], dict[str, float]]] = {
    "fake_quant": bench_fake_quant, "psgd": bench_psgd, "slb": bench_slb, "fqt": bench_fqt,
    "cli": bench_cli}


def run_benchmarks(names: list[str]) -> dict[str, float]:
    """The figures of the benchmarks ``names``, measured in this process."""
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # as the book's notebooks run (lowbit.book.setup)
    out: dict[str, float] = {}
    for name in names:
        out.update(BENCHMARKS[name]())
    return out


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the processes' ``runs`` (figures in the first run's order)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _worker(name: str) -> dict[str, float]:
    """Run benchmark ``name`` in a fresh Python process and read back its figures."""
    done = subprocess.run([sys.executable, "-m", "lowbit.bench", "--worker", name],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark {name!r} failed in its process:\n{done.stderr[-4000:]}")
    figures = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(": ")
        figures[key] = float(value)
    return figures


def main(argv: list[str] | None = None) -> None:
    """``python -m lowbit.bench [names] [--processes N]``: run the benchmarks, each in N
    fresh processes, and print each figure's median."""
    p = argparse.ArgumentParser(prog="python -m lowbit.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("only", nargs="*", help=f"benchmarks to run (default all): {list(BENCHMARKS)}")
    p.add_argument("--processes", type=int, default=3,
                   help="fresh processes per benchmark; a figure is their median (default 3)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [n for n in args.only if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if args.processes < 1:
        p.error(f"--processes must be at least 1, got {args.processes}")
    names = args.only or list(BENCHMARKS)
    if args.worker:  # one process's figures, in full, for the parent
        for key, value in run_benchmarks(names).items():
            print(f"{key}: {value!r}", flush=True)
        return
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}"
          f" ({torch.get_num_threads()} threads; {args.processes} processes per benchmark)",
          flush=True)
    for name in names:
        runs = [_worker(name) for _ in range(args.processes)]
        for key, value in median_of(runs).items():
            print(f"{key}: {value:.3f}", flush=True)
            print(f"  {key} per process: " + " ".join(f"{r[key]:.3f}" for r in runs),
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
