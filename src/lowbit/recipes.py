"""The book's standard runs: the full-precision baseline and the straight-through
quantization-aware-training (STE-QAT) baseline every method chapter compares against.

Both go through :func:`lowbit.cache.load_or_train`, so a chapter that needs the same
baseline as another reuses its trained weights instead of training again.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from torch import nn

from . import baselines, checks, data, fqt as fqt_, models, psgd as psgd_, quant, slb as slb_
from .cache import load_or_train
from .train import History, evaluate, fit, seed_everything

__all__ = ["Recipe", "PSGDConfig", "Start", "SLBConfig", "train_slb", "fit_slb", "train_fqt",
           "loaders", "build", "train_fp", "train_qat", "finetune", "l1_penalty",
           "WEIGHT_METHODS", "LowBitConfig", "lowbit_form", "build_lowbit", "lowbit_optimizer", "train_lowbit",
           "deploy", "SideBySide", "SIDE_BY_SIDE", "SIDE_BY_SIDE_FULL", "QAT_METHODS", "prune_gradual", "train_snip", "train_bop"]

#: The QAT methods of :func:`train_qat`: the straight-through estimator on the book's grid,
#: or LSQ's learned steps.
QAT_METHODS = ("ste", "lsq")


@dataclass(frozen=True)
class Recipe:
    """Data set, model and SGD settings of a full-precision training run. ``n_train``
    trains on the first n training examples only (a seeded random subset for
    ``"fashion"``); the test set is always whole. ``test_each_epoch=False`` skips the test
    set after every epoch of :func:`train_fp`, :func:`finetune` and :func:`train_qat` (the
    history's learning curve; 10,000 test images cost as much as an epoch of 8,000 training
    images on two CPU cores): the page evaluates the models it compares itself."""
    data: str = "mnist"
    model: str = "cnn"
    epochs: int = 5
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    seed: int = 0
    n_train: int | None = None
    test_each_epoch: bool = True

    def with_(self, **changes) -> "Recipe":
        return replace(self, **changes)


def loaders(r: Recipe):
    """Train and test loaders of the recipe's data set and seed (``data="sort"``: the
    sequence-sorting task of :func:`lowbit.data.sorting_task`)."""
    if r.data == "sort":
        return data.sorting_task(seed=r.seed, batch_size=r.batch_size)
    return data.get_loaders(r.data, r.batch_size, r.seed, r.n_train)


def _curve(r: Recipe, test_loader):
    """The test loader ``fit`` evaluates after every epoch: none unless the recipe asks."""
    return test_loader if r.test_each_epoch else None


def build(r: Recipe) -> nn.Module:
    """The recipe's untrained model, initialised from its seed."""
    seed_everything(r.seed)
    if r.model == "transformer":
        return models.TinyTransformer()
    return models.build_model(r.model, tuple(loaders(r)[1].x.shape[1:]))


def train_fp(r: Recipe = Recipe(), progress: bool = True) -> tuple[nn.Module, History]:
    """Train (or load from the cache) the full-precision model of a recipe."""
    def run(model: nn.Module) -> History:
        train_loader, test_loader = loaders(r)
        opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum,
                              weight_decay=r.weight_decay)
        return fit(model, train_loader, r.epochs, opt, _curve(r, test_loader), progress=progress,
                   desc=f"{r.model} fp seed {r.seed}")

    return load_or_train({"name": "fp", **asdict(r)}, lambda: build(r), run)


def train_qat(r: Recipe, bits: int, epochs: int = 2, lr: float = 0.005,
              act_bits: int | None = None, per_channel: bool = False,
              first_last_bits: int | None = None, start: "Start | None" = None,
              from_scratch: bool = False, grid: str = "symmetric", method: str = "ste",
              quant_loss: float = 0.0, progress: bool = True) -> tuple[nn.Module, History]:
    """STE-QAT baseline: start from a trained full-precision model, fake-quantize the weights
    (and, with ``act_bits``, the activations) with the straight-through estimator, and
    fine-tune for ``epochs`` with SGD and a cosine learning rate.

    The starting model is the recipe's full-precision run, or, with ``start``, the result of
    :func:`finetune` with those settings (a PSGD model, or its SGD control). With
    ``from_scratch=True`` it starts from the recipe's random initialisation instead (the
    same budget as a method trained from scratch, such as SLB). ``grid="even"`` quantizes to
    SLB's value set instead of the symmetric grid (:func:`lowbit.quant.quantize_even`).

    ``method="lsq"`` trains LSQ instead (:func:`lowbit.baselines.prepare_lsq`: learned steps
    for the weights and the activations, starting where the paper starts them).
    ``quant_loss`` adds λ·:func:`lowbit.baselines.quantization_loss` to the loss (1 bit)."""
    checks.check_bits(bits, 1)
    if method not in QAT_METHODS:
        raise ValueError(f"method must be one of {QAT_METHODS}, got {method!r}")
    if quant_loss < 0 or (quant_loss and bits != 1):
        raise ValueError(f"quant_loss is a non-negative weight of the 1-bit quantization loss; "
                         f"got {quant_loss} at {bits} bits")
    qat_args = dict(weight_bits=bits, act_bits=act_bits, per_channel=per_channel,
                    first_last_bits=first_last_bits)
    if grid != "symmetric":  # (kept out of the dict otherwise: cache keys stay as they were)
        qat_args["grid"] = grid
    if method == "lsq":
        if per_channel or grid != "symmetric":
            raise ValueError("LSQ learns one step per tensor on its own grid: per_channel "
                             "and grid do not apply")
        qat_args = dict(weight_bits=bits, act_bits=act_bits, first_last_bits=first_last_bits)
    prepare = baselines.prepare_lsq if method == "lsq" else quant.prepare_qat

    if from_scratch and start is not None:
        raise ValueError("give either start or from_scratch=True, not both")

    def run(model: nn.Module) -> History:
        if not from_scratch:  # else build(r) already holds the recipe's initialisation
            fp, _ = train_fp(r, progress=progress) if start is None else finetune(
                r, start.epochs, start.lr, start.weight_decay, start.psgd, progress=progress)
            model.load_state_dict(prepare(fp, **qat_args).state_dict())
        train_loader, test_loader = loaders(r)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=r.momentum)
        seed_everything(r.seed)
        penalty = (lambda m: quant_loss * baselines.quantization_loss(m)) if quant_loss else None
        return fit(model, train_loader, epochs, opt, _curve(r, test_loader), progress=progress,
                   penalty=penalty,
                   desc=f"{method.upper()} W{bits}" + (f"A{act_bits}" if act_bits else ""))

    config = {"name": "qat" if method == "ste" else method, **asdict(r), "qat_epochs": epochs,
              "qat_lr": lr, **qat_args}
    if quant_loss:
        config["quant_loss"] = quant_loss
    if start is not None:
        config["start"] = asdict(start)
    if from_scratch:
        config["from_scratch"] = True
    return load_or_train(config, lambda: prepare(build(r), **qat_args), run)


@dataclass(frozen=True)
class PSGDConfig:
    """The PSGD settings of :func:`finetune` (see :class:`lowbit.psgd.PSGD`)."""
    bits: int | None = 4
    lambda_s: float = 150.0
    eps: float = 0.0
    normalized: bool = False
    first_last_bits: int | None = None
    scale_first_last: bool = True
    grid_range: str = "current"
    last_bias: bool = False


def l1_penalty(strength: float):
    """``strength · Σ|w|`` over the conv and linear weights (the L1 pruning baseline)."""
    def penalty(model: nn.Module) -> torch.Tensor:
        return strength * sum(m.weight.abs().sum() for _, m in quant.quantizable_layers(model))
    return penalty


def finetune(r: Recipe, epochs: int, lr: float = 0.01, weight_decay: float | None = None,
             psgd: PSGDConfig | None = None, l1: float = 0.0, progress: bool = True
             ) -> tuple[nn.Module, History]:
    """The official PSGD recipe: train with SGD first (the recipe's full-precision run),
    then continue for ``epochs`` with PSGD (``psgd`` given) or, as the control with the
    same total training, with plain SGD (``psgd=None``). Momentum as in the recipe,
    cosine learning rate from ``lr``, weight decay from the recipe unless given; ``l1``
    adds an L1 penalty on the conv/linear weights (the sparsity baseline)."""
    wd = r.weight_decay if weight_decay is None else weight_decay

    def run(model: nn.Module) -> History:
        fp, _ = train_fp(r, progress=progress)
        model.load_state_dict(fp.state_dict())
        if psgd is None:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=r.momentum,
                                  weight_decay=wd)
        else:
            groups = psgd_.param_groups(model, psgd.bits, psgd.first_last_bits,
                                        psgd.scale_first_last, psgd.last_bias)
            opt = psgd_.PSGD(groups, lr=lr, momentum=r.momentum, weight_decay=wd,
                             bits=psgd.bits, lambda_s=psgd.lambda_s, eps=psgd.eps,
                             normalized=psgd.normalized, grid_range=psgd.grid_range)
        train_loader, test_loader = loaders(r)
        seed_everything(r.seed)
        return fit(model, train_loader, epochs, opt, _curve(r, test_loader), progress=progress,
                   penalty=l1_penalty(l1) if l1 else None, desc="PSGD" if psgd else "SGD")

    config = {"name": "psgd" if psgd else "sgd", **asdict(r), "ft_epochs": epochs, "ft_lr": lr,
              "ft_wd": wd, "psgd": asdict(psgd) if psgd else None}
    if l1:
        config["l1"] = l1
    return load_or_train(config, lambda: build(r), run)


def prune_gradual(r: Recipe, epochs: int, sparsity: float, lr: float = 0.01,
                  weight_decay: float = 0.0, progress: bool = True) -> tuple[nn.Module, History]:
    """Gradual magnitude pruning (:class:`lowbit.baselines.GradualPruner`): continue the
    recipe's SGD model for ``epochs`` as :func:`finetune` does, the sparsity rising to
    ``sparsity`` over the first three quarters of the run, the last quarter fine-tuning."""
    sparsity = baselines.check_sparsity(sparsity)

    def run(model: nn.Module) -> History:
        fp, _ = train_fp(r, progress=progress)
        model.load_state_dict(fp.state_dict())
        train_loader, test_loader = loaders(r)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=r.momentum,
                              weight_decay=weight_decay)
        pruner = baselines.GradualPruner(model, sparsity, epochs * len(train_loader))
        seed_everything(r.seed)
        h = fit(model, train_loader, epochs, opt, on_step=pruner.step, progress=progress,
                desc=f"GMP {sparsity:.0%}")
        h.log(test_acc=evaluate(model, test_loader)[1])  # the end only: the run's cost is training
        return h

    config = {"name": "gmp", **asdict(r), "ft_epochs": epochs, "ft_lr": lr,
              "ft_wd": weight_decay, "sparsity": sparsity}
    return load_or_train(config, lambda: build(r), run)


def train_snip(r: Recipe, epochs: int, sparsity: float, progress: bool = True
               ) -> tuple[nn.Module, History]:
    """SNIP: prune the recipe's initialisation by connection sensitivity on one training
    batch (:func:`lowbit.baselines.snip_masks`), then train it with the recipe's SGD settings
    for ``epochs``, the mask fixed (applied after every step)."""
    sparsity = baselines.check_sparsity(sparsity)

    def run(model: nn.Module) -> History:
        train_loader, test_loader = loaders(r)
        x, y = next(iter(train_loader))
        masks = baselines.snip_masks(model, x, y, sparsity)
        baselines.apply_masks(model, masks)
        opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum,
                              weight_decay=r.weight_decay)
        seed_everything(r.seed)
        h = fit(model, train_loader, epochs, opt, progress=progress,
                on_step=lambda _: baselines.apply_masks(model, masks), desc=f"SNIP {sparsity:.0%}")
        h.log(test_acc=evaluate(model, test_loader)[1])
        return h

    config = {"name": "snip", **{**asdict(r), "epochs": epochs}, "sparsity": sparsity}
    return load_or_train(config, lambda: build(r), run)


def _other_parameters(model: nn.Module, taken: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters of ``model`` that are not in ``taken`` (by identity): those a second
    optimizer trains (BatchNorm, biases)."""
    ids = {id(p) for p in taken}
    return [p for p in model.parameters() if id(p) not in ids]


def train_bop(r: Recipe, epochs: int, gamma: float = 1e-3, threshold: float = 1e-6,
              lr: float = 0.01, progress: bool = True) -> tuple[nn.Module, History]:
    """A 1-bit network trained from the recipe's initialisation with Bop
    (:class:`lowbit.baselines.Bop`): conv and linear weights set to ±α and flipped by Bop,
    BatchNorm and biases trained with Adam (``lr``, cosine), as Helwegen et al. do. The
    history's ``extra["flips"]`` holds the flips per weight in each epoch."""

    def run(model: nn.Module) -> History:
        weights = baselines.binary_weights(model)
        bop = baselines.Bop(weights, gamma, threshold)
        rest = _other_parameters(model, weights)
        adam = torch.optim.Adam(rest, lr=lr)
        train_loader, test_loader = loaders(r)
        n, flipped = sum(w.numel() for w in weights), [0]

        def count(_: int) -> None:
            flipped[0] += bop.flips

        def per_epoch(_: int, h: History) -> None:  # flips per weight in the epoch
            h.log(flips=flipped[0] / n)
            flipped[0] = 0

        seed_everything(r.seed)
        return fit(model, train_loader, epochs, _Both(bop, adam), test_loader,
                   on_step=count, on_epoch=per_epoch, progress=progress, desc="Bop W1")

    config = {"name": "bop", **{**asdict(r), "epochs": epochs}, "gamma": gamma,
              "threshold": threshold, "adam_lr": lr}
    return load_or_train(config, lambda: build(r), run)


class _Both(torch.optim.Optimizer):
    """Two optimizers stepped as one (Bop for the binary weights, Adam for the rest); the
    learning-rate schedule acts on Adam, the only one with a learning rate."""

    def __init__(self, flips: torch.optim.Optimizer, rest: torch.optim.Optimizer) -> None:
        self.flips, self.rest = flips, rest
        self.param_groups = rest.param_groups  # what fit's cosine schedule anneals
        self.defaults, self.state = rest.defaults, rest.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.flips.zero_grad(set_to_none)
        self.rest.zero_grad(set_to_none)

    def step(self, closure=None):
        self.flips.step()
        return self.rest.step(closure)


@dataclass(frozen=True)
class Start:
    """Where :func:`train_qat` starts: :func:`finetune` with these settings."""
    epochs: int = 8
    lr: float = 0.01
    weight_decay: float = 0.0
    psgd: PSGDConfig | None = None


@dataclass(frozen=True)
class SLBConfig:
    """The settings of an SLB run (:func:`train_slb`; see :mod:`lowbit.slb`).

    The logits are trained with Adam (``lr``, cosine to zero); the temperature follows
    ``schedule`` (a :class:`lowbit.slb.TemperatureSchedule` of the clock, or a
    :class:`lowbit.slb.GapSchedule` that sets τ from the model's gap), stepped every iteration
    (``per="step"``) or every epoch. ``sbn=False``
    keeps plain BatchNorm (its statistics then come from the continuous network);
    ``recalibrate`` re-estimates the BN statistics of the discrete network after training
    from that many training batches.
    """
    bits: int = 2
    act_bits: int | None = None
    epochs: int = 5
    lr: float = 0.05
    schedule: slb_.TemperatureSchedule | slb_.GapSchedule = slb_.TemperatureSchedule()
    per: str = "step"
    sbn: bool = True
    recalibrate: int = 0
    init: str = "random"
    alpha: str = "learned"
    values: str = "even"


def _start_temperature(cfg: SLBConfig) -> float:
    s = cfg.schedule
    return s.tau_max if isinstance(s, slb_.GapSchedule) else s.start


def train_slb(r: Recipe, cfg: SLBConfig = SLBConfig(), progress: bool = True,
              track_every: int = 0) -> tuple[nn.Module, History]:
    """Train (or load from the cache) an SLB model of the recipe's architecture.

    The history records, per epoch, the discrete model's accuracy (``test_acc``: evaluation
    mode, argmax weights, discrete statistics), the continuous model's
    (``extra["test_acc_continuous"]``), the quantization gap (``extra["gap"]``) and the
    temperature (``extra["temperature"]``). With ``track_every`` > 0 an
    :class:`lowbit.slb.ArgmaxTracker` records every weight's argmax that often (in steps);
    its log is in ``extra`` under ``track_tau``, ``track_flips``, ``track_committed`` and
    ``track_switched``."""
    if cfg.per not in ("step", "epoch"):
        raise ValueError(f"per must be 'step' or 'epoch', got {cfg.per!r}")

    def make() -> nn.Module:
        return slb_.convert(build(r), cfg.bits, cfg.act_bits, sbn=cfg.sbn, alpha=cfg.alpha,
                            temperature=_start_temperature(cfg), init="random", seed=r.seed,
                            values=cfg.values)

    def run(model: nn.Module) -> History:
        if cfg.init == "nearest":
            fp, _ = train_fp(r, progress=progress)
            start = slb_.convert(fp, cfg.bits, cfg.act_bits, sbn=cfg.sbn, alpha=cfg.alpha,
                                 temperature=_start_temperature(cfg), init="nearest", seed=r.seed,
                                 values=cfg.values)
            model.load_state_dict(start.state_dict())
        tracker = slb_.ArgmaxTracker(model, track_every) if track_every else None
        h = fit_slb(model, r, cfg, progress, on_step=tracker)
        if tracker is not None:
            h.extra.update({f"track_{k}": v for k, v in tracker.log.items()})
        return h

    config = {"name": "slb", **asdict(r), "slb": asdict(cfg)}
    if track_every:
        config["track_every"] = track_every
    return load_or_train(config, make, run)


def fit_slb(model: nn.Module, r: Recipe, cfg: SLBConfig, progress: bool = True,
            on_step: Callable[[int], None] | None = None) -> History:
    """SLB's training loop on an SLB model (:func:`lowbit.slb.convert`): Adam on the logits,
    the temperature annealed along ``cfg.schedule``, the discrete statistics of state BN
    collected by a second pass of each batch. ``on_step(step)`` runs after each step's
    temperature update (an :class:`lowbit.slb.ArgmaxTracker`, say)."""
    train_loader, test_loader = loaders(r)
    total = cfg.epochs * (len(train_loader) if cfg.per == "step" else 1)
    annealer = (slb_.GapAnnealer if isinstance(cfg.schedule, slb_.GapSchedule)
                else slb_.Annealer)(model, cfg.schedule, total)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fused: 1.4x faster step

    def on_epoch(epoch: int, h: History) -> None:
        if cfg.per == "epoch":
            annealer.step()
        with slb_.use_state(model, "continuous"):
            h.log(test_acc_continuous=evaluate(model, test_loader)[1])
        h.log(gap=slb_.model_gap(model), temperature=annealer.temperature)

    def on_batch(x: torch.Tensor, y: torch.Tensor) -> None:
        if cfg.sbn:
            slb_.update_discrete_stats(model, x)

    def after_step(step: int) -> None:
        if cfg.per == "step":
            annealer.step()
        if on_step is not None:
            on_step(step)

    seed_everything(r.seed)
    h = fit(model, train_loader, cfg.epochs, opt, test_loader, progress=progress,
            on_step=after_step, on_epoch=on_epoch,
            on_batch=on_batch, desc=f"SLB W{cfg.bits}" + (f"A{cfg.act_bits}" if cfg.act_bits else ""))
    if cfg.recalibrate:
        slb_.recalibrate_bn(model, train_loader, "discrete", cfg.recalibrate)
        h.log(test_acc_recalibrated=evaluate(model, test_loader)[1])
    return h


def train_fqt(r: Recipe, mode: str = "fqt", quantizer: str = "psq", grad_bits: int = 8,
              optimizer: str = "sgd", weight_bits: int | None = None,
              weight_rounding: str = "stochastic", progress: bool = True
              ) -> tuple[nn.Module, History]:
    """Train (or load from the cache) the recipe's model from scratch with quantized
    training: ``mode="qat"`` (8-bit forward, full-precision backward), ``"fqt"`` (also the
    output gradients quantized by ``quantizer`` at ``grad_bits``), or ``"fp"`` (no
    quantization at all, the baseline a reviewer asked for). ``optimizer``: SGD with the
    recipe's momentum and weight decay, or Adam (for the transformer); cosine learning rate.
    Stochastic rounding draws from a generator seeded with the recipe's seed.

    With ``weight_bits`` there are no shadow weights: the conv and linear weights are stored
    on a ``weight_bits`` grid and every update is rounded onto it
    (:class:`lowbit.fqt.GridSGD`, ``weight_rounding``); the recipe's momentum must be 0."""
    if weight_bits is not None:
        if optimizer != "sgd" or r.momentum != 0:
            raise ValueError("weights stored on a grid train with plain SGD (GridSGD keeps no "
                             f"momentum buffer): use optimizer='sgd' and a recipe with "
                             f"momentum=0, got {optimizer!r} and momentum={r.momentum}")
        weight_bits = checks.check_bits(weight_bits, 2, 16, "weight_bits")
    if mode not in ("fp", "qat", "fqt"):
        raise ValueError(f"mode must be 'fp', 'qat' or 'fqt', got {mode!r}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    settings = {"mode": mode, "optimizer": optimizer}
    if mode == "fqt":
        settings.update(quantizer=quantizer, grad_bits=checks.check_bits(grad_bits, 1, 32),
                        dither_bits=quant.DITHER_BITS)  # the rounding's random numbers

    def make() -> nn.Module:
        m = build(r)
        return m if mode == "fp" else fqt_.convert(m, mode, quantizer, grad_bits)

    def run(model: nn.Module) -> History:
        device = next(model.parameters()).device
        fqt_.configure(model, generator=torch.Generator(device=device).manual_seed(r.seed))
        if weight_bits is not None:
            weights = [m.weight for _, m in quant.quantizable_layers(model)]
            rest = _other_parameters(model, weights)
            opt = fqt_.GridSGD([{"params": weights}, {"params": rest, "bits": None}], lr=r.lr,
                               bits=weight_bits, weight_decay=r.weight_decay,
                               rounding=weight_rounding,
                               generator=torch.Generator(device=device).manual_seed(r.seed + 1))
            opt.snap()
        else:
            opt = (torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum,
                                   weight_decay=r.weight_decay) if optimizer == "sgd"
                   else torch.optim.Adam(model.parameters(), lr=r.lr))
        train_loader, test_loader = loaders(r)
        seed_everything(r.seed)
        name = mode.upper() + (f" {quantizer.upper()} {grad_bits}-bit" if mode == "fqt" else "")
        h = fit(model, train_loader, r.epochs, opt, test_loader, progress=progress, desc=name)
        if weight_bits is not None:
            h.log(small_updates=opt.small_updates / max(opt.updates, 1))
        return h

    if weight_bits is not None:
        settings.update(weight_bits=weight_bits, weight_rounding=weight_rounding)
    return load_or_train({"name": "fqt", **asdict(r), **settings}, make, run)


# ----------------------------------------------------------------------------- Part IV
#: How Part IV's runs make their weights low-bit (``fp`` keeps them in full precision).
WEIGHT_METHODS = ("fp", "sgd", "ste", "psgd", "slb")


@dataclass(frozen=True)
class LowBitConfig:
    """One run of Part IV: how the weights are made low-bit, and the activation and
    gradient bits, on one budget of ``epochs`` (:func:`train_lowbit`).

    ``weights``: ``"fp"`` (no quantization), ``"sgd"`` (SGD, then data-free post-training
    quantization), ``"ste"`` (SGD for ``start_epochs``, then straight-through QAT),
    ``"psgd"`` (SGD for ``start_epochs``, then PSGD aimed at the ``weight_bits`` grid, then
    data-free quantization) or ``"slb"`` (SLB from scratch). ``act_bits``: activations
    quantized while training (STE, SLB) or, data-free from BatchNorm, afterwards (SGD,
    PSGD). ``grad_quantizer``: None, or the FQT quantizer of every layer's output gradient
    at ``grad_bits``, for any weight method (:func:`lowbit.fqt.wrap`)."""
    weights: str = "ste"
    weight_bits: int | None = 4
    act_bits: int | None = None
    grad_quantizer: str | None = None
    grad_bits: int = 8
    epochs: int = 3
    start_epochs: int = 2

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_METHODS:
            raise ValueError(f"weights must be one of {WEIGHT_METHODS}, got {self.weights!r}")
        if self.weights != "fp":
            if self.weight_bits is None:
                raise ValueError(f"weights={self.weights!r} needs weight_bits")
            checks.check_bits(self.weight_bits, 2 if self.weights == "psgd" else 1, 8,
                             f"weight_bits for {self.weights}")
        if self.act_bits is not None:
            checks.check_bits(self.act_bits, 1, 32, "act_bits")
            if self.weights == "fp":
                raise ValueError("weights='fp' quantizes nothing: give act_bits=None")
        if self.grad_quantizer is not None:
            fqt_.check_settings("fqt", self.grad_quantizer, self.grad_bits)
        if not 0 < self.start_epochs < self.epochs and self.weights in ("ste", "psgd"):
            raise ValueError(f"start_epochs must be between 0 and epochs={self.epochs}, "
                             f"got {self.start_epochs}")

    @property
    def name(self) -> str:
        """A ``W2A4G8``-style name — weight, activation and gradient bits (32 = full precision)."""
        w = 32 if self.weights == "fp" else self.weight_bits
        g = self.grad_bits if self.grad_quantizer else 32
        return f"W{w}A{self.act_bits or 32}G{g}"


@dataclass(frozen=True)
class SideBySide:
    """Part IV's one setting for every method: the model, the batch size and the budget
    (``epochs`` in all; ``start_epochs`` of SGD before STE-QAT or PSGD take over)."""
    model: str = "cnn8"
    batch_size: int = 64
    epochs: int = 3
    start_epochs: int = 2

    def recipe(self, seed: int) -> Recipe:
        """The data set, model and batch size of the setting, at ``seed``."""
        return Recipe(model=self.model, batch_size=self.batch_size, seed=seed)

    def config(self, weights: str, weight_bits: int | None = None, act_bits: int | None = None,
               grad_quantizer: str | None = None, grad_bits: int = 8) -> LowBitConfig:
        """A :class:`LowBitConfig` on the setting's budget."""
        return LowBitConfig(weights, weight_bits, act_bits, grad_quantizer, grad_bits,
                            epochs=self.epochs, start_epochs=self.start_epochs)


#: Part IV's setting on two CPU cores (each page in about a minute) …
SIDE_BY_SIDE = SideBySide()
#: … and at full size (``LOWBIT_FULL=1``, for a GPU): the book's CNN, ten epochs.
SIDE_BY_SIDE_FULL = SideBySide("cnn", 32, 10, 7)


def deploy(model: nn.Module, cfg: LowBitConfig) -> nn.Module:
    """The low-bit model a trained :func:`train_lowbit` model stands for: data-free
    quantization of the weights (and, from BatchNorm, the activations) for SGD and PSGD;
    the model itself, in evaluation mode, for the STE (fake-quantized weights) and SLB
    (argmax weights, discrete statistics)."""
    if cfg.weights in ("sgd", "psgd"):
        has_act = any(isinstance(m, quant.ActQuant) for m in model.modules())
        return quant.quantize_model(model, cfg.weight_bits,
                                    act_bits=None if has_act else cfg.act_bits)
    return copy.deepcopy(model).eval()


def lowbit_form(model: nn.Module, cfg: LowBitConfig, seed: int) -> nn.Module:
    """``model`` in the form ``cfg`` trains: STE-QAT layers, SLB layers (with state BN,
    initialised from ``seed``), or plain; each layer wrapped for quantized gradients if
    asked (their random generator is not set: :func:`lowbit.fqt.configure`)."""
    if cfg.weights == "ste":
        model = quant.prepare_qat(model, cfg.weight_bits, cfg.act_bits)
    elif cfg.weights == "slb":
        model = slb_.convert(model, cfg.weight_bits, cfg.act_bits, seed=seed)
    if cfg.grad_quantizer is not None:
        model = fqt_.wrap(model, cfg.grad_quantizer, cfg.grad_bits)
    return model


def build_lowbit(r: Recipe, cfg: LowBitConfig) -> nn.Module:
    """The recipe's untrained model in the form ``cfg`` trains (:func:`lowbit_form`), its
    quantized gradients drawn from a generator seeded with the recipe's seed."""
    m = lowbit_form(build(r), cfg, r.seed)
    if cfg.grad_quantizer is not None:
        device = next(m.parameters()).device
        fqt_.configure(m, generator=torch.Generator(device=device).manual_seed(r.seed))
    return m


def lowbit_optimizer(model: nn.Module, r: Recipe, cfg: LowBitConfig
                     ) -> tuple[torch.optim.Optimizer, Callable | None]:
    """The optimizer of ``cfg``'s low-bit phase for a :func:`build_lowbit` model, and what
    runs after each step on the batch (SLB's second pass for the discrete statistics):
    SGD with the recipe's settings (full precision, SGD), SGD at lr 0.005 (STE-QAT), PSGD
    aimed at the weight grid (lr 0.01, no weight decay), Adam (SLB, as
    :func:`fit_slb`)."""
    if cfg.weights == "slb":
        opt = torch.optim.Adam(model.parameters(), lr=SLBConfig.lr, fused=True)
        return opt, lambda x: slb_.update_discrete_stats(model, x)
    if cfg.weights == "ste":
        return torch.optim.SGD(model.parameters(), lr=0.005, momentum=r.momentum), None
    if cfg.weights == "psgd":
        return psgd_.PSGD(psgd_.param_groups(model, cfg.weight_bits), lr=0.01,
                          momentum=r.momentum, weight_decay=0.0, bits=cfg.weight_bits), None
    return torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum,
                           weight_decay=r.weight_decay), None


def train_lowbit(r: Recipe, cfg: LowBitConfig, progress: bool = True
                 ) -> tuple[nn.Module, History]:
    """Train (or load from the cache) one Part IV run; :func:`deploy` gives its low-bit
    model. The recipe supplies the data, the architecture, SGD's settings and the seed; the
    budget is ``cfg.epochs`` in total for every method. The history's ``test_acc`` is the
    trained model's accuracy per epoch (full precision for SGD and PSGD); its
    ``extra["deployed_acc"]`` holds the deployed model's final accuracy."""
    r_budget = r.with_(epochs=cfg.epochs)
    r_start = r.with_(epochs=cfg.start_epochs)

    def make() -> nn.Module:
        return build_lowbit(r, cfg)

    def run(model: nn.Module) -> History:
        train_loader, test_loader = loaders(r)
        rest = cfg.epochs - cfg.start_epochs
        if cfg.weights in ("fp", "sgd", "psgd") and (cfg.act_bits is not None
                                                    or cfg.weights == "sgd"):
            # their training does not depend on the bits quantized afterwards: share it
            shared = replace(cfg, act_bits=None, **({"weights": "fp", "weight_bits": None}
                                                    if cfg.weights == "sgd" else {}))
            base, h = train_lowbit(r, shared, progress)
            model.load_state_dict(base.state_dict())
            h = History.from_dict(h.to_dict())
            h.extra.pop("deployed_acc", None)
        elif cfg.weights == "slb":
            h = fit_slb(model, r, SLBConfig(bits=cfg.weight_bits, act_bits=cfg.act_bits,
                                            epochs=cfg.epochs), progress)
        elif cfg.weights == "fp" and cfg.grad_quantizer is None:  # the book's fp run
            fp, h = train_fp(r_budget, progress=progress)
            model.load_state_dict(fp.state_dict())
            h = History.from_dict(h.to_dict())
        elif cfg.weights == "fp":
            opt, _ = lowbit_optimizer(model, r, cfg)
            seed_everything(r.seed)
            h = fit(model, train_loader, cfg.epochs, opt, test_loader, progress=progress,
                    desc=f"SGD {cfg.name}")
        else:  # SGD first, then the STE or PSGD, on the same model
            fp, h = train_fp(r_start, progress=progress)
            start = quant.prepare_qat(fp, cfg.weight_bits, cfg.act_bits) \
                if cfg.weights == "ste" else fp
            load_unwrapped(model, start.state_dict())
            opt, _ = lowbit_optimizer(model, r, cfg)
            seed_everything(r.seed)
            h = fit(model, train_loader, rest, opt, test_loader, progress=progress,
                    history=History.from_dict(h.to_dict()), desc=f"{cfg.weights} {cfg.name}")
        h.log(deployed_acc=evaluate(deploy(model, cfg), test_loader)[1])
        return h

    config = {"name": "lowbit", **asdict(r), "lowbit": asdict(cfg)}
    return load_or_train(config, make, run)


def load_unwrapped(model: nn.Module, state: dict) -> None:
    """Load ``state``, saved from the same model without :class:`lowbit.fqt.QuantizedBackward`
    wrappers, into ``model``: a wrapped layer's entries live under ``….layer.``; the
    wrappers' own settings (their extra state) stay as they are."""
    wrappers = {n for n, m in model.named_modules() if isinstance(m, fqt_.QuantizedBackward)}
    mapped = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in wrappers:  # a wrapper's own entry (its extra state)
            mapped[key] = value
            continue
        for w in wrappers:  # "features.0.layer.weight" was "features.0.weight"
            if key.startswith(w + ".layer."):
                key_before = w + "." + key[len(w) + len(".layer."):]
                break
        else:
            key_before = key
        mapped[key] = state[key_before]
    model.load_state_dict(mapped)
