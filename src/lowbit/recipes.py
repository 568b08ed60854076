"""The book's standard runs: the full-precision baseline and the straight-through
quantization-aware-training (STE-QAT) baseline every method chapter compares against.

Both go through :func:`lowbit.train.load_or_train`, so a chapter that needs the same
baseline as another reuses its trained weights instead of training again.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from . import data, models, psgd as psgd_, quant
from .train import History, fit, load_or_train, seed_everything

__all__ = ["Recipe", "PSGDConfig", "Start", "loaders", "build", "train_fp", "train_qat", "finetune",
           "l1_penalty"]


@dataclass(frozen=True)
class Recipe:
    """Data set, model and SGD settings of a full-precision training run."""
    data: str = "mnist"
    model: str = "cnn"
    epochs: int = 5
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    seed: int = 0

    def with_(self, **changes) -> "Recipe":
        return replace(self, **changes)


def loaders(r: Recipe):
    """Train and test loaders of the recipe's data set and seed."""
    return data.get_loaders(r.data, r.batch_size, r.seed)


def build(r: Recipe) -> nn.Module:
    """The recipe's untrained model, initialised from its seed."""
    seed_everything(r.seed)
    return models.build_model(r.model, data.load_arrays(r.data, r.seed).input_shape)


def train_fp(r: Recipe = Recipe(), progress: bool = True) -> tuple[nn.Module, History]:
    """Train (or load from the cache) the full-precision model of a recipe."""
    def run(model: nn.Module) -> History:
        train_loader, test_loader = loaders(r)
        opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum,
                              weight_decay=r.weight_decay)
        return fit(model, train_loader, r.epochs, opt, test_loader, progress=progress,
                   desc=f"{r.model} fp seed {r.seed}")

    return load_or_train({"name": "fp", **asdict(r)}, lambda: build(r), run)


def train_qat(r: Recipe, bits: int, epochs: int = 2, lr: float = 0.005,
              act_bits: int | None = None, per_channel: bool = False,
              first_last_bits: int | None = None, start: "Start | None" = None,
              progress: bool = True) -> tuple[nn.Module, History]:
    """STE-QAT baseline: start from a trained full-precision model, fake-quantize the weights
    (and, with ``act_bits``, the activations) with the straight-through estimator, and
    fine-tune for ``epochs`` with SGD and a cosine learning rate.

    The starting model is the recipe's full-precision run, or, with ``start``, the result of
    :func:`finetune` with those settings (a PSGD model, or its SGD control)."""
    quant.check_bits(bits)
    qat_args = dict(weight_bits=bits, act_bits=act_bits, per_channel=per_channel,
                    first_last_bits=first_last_bits)

    def run(model: nn.Module) -> History:
        if start is None:
            fp, _ = train_fp(r, progress=progress)
        else:
            fp, _ = finetune(r, start.epochs, start.lr, start.weight_decay, start.psgd,
                             progress=progress)
        model.load_state_dict(quant.prepare_qat(fp, **qat_args).state_dict())
        train_loader, test_loader = loaders(r)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=r.momentum)
        seed_everything(r.seed)
        return fit(model, train_loader, epochs, opt, test_loader, progress=progress,
                   desc=f"QAT W{bits}" + (f"A{act_bits}" if act_bits else ""))

    config = {"name": "qat", **asdict(r), "qat_epochs": epochs, "qat_lr": lr, **qat_args}
    if start is not None:
        config["start"] = asdict(start)
    return load_or_train(config, lambda: quant.prepare_qat(build(r), **qat_args), run)


@dataclass(frozen=True)
class PSGDConfig:
    """The PSGD settings of :func:`finetune` (see :class:`lowbit.psgd.PSGD`)."""
    bits: int | None = 4
    lambda_s: float = 150.0
    eps: float = 0.0
    normalized: bool = False
    first_last_bits: int | None = None
    scale_first_last: bool = True


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
                                        psgd.scale_first_last)
            opt = psgd_.PSGD(groups, lr=lr, momentum=r.momentum, weight_decay=wd,
                             bits=psgd.bits, lambda_s=psgd.lambda_s, eps=psgd.eps,
                             normalized=psgd.normalized)
        train_loader, test_loader = loaders(r)
        seed_everything(r.seed)
        return fit(model, train_loader, epochs, opt, test_loader, progress=progress,
                   penalty=l1_penalty(l1) if l1 else None, desc="PSGD" if psgd else "SGD")

    config = {"name": "psgd" if psgd else "sgd", **asdict(r), "ft_epochs": epochs, "ft_lr": lr,
              "ft_wd": wd, "psgd": asdict(psgd) if psgd else None}
    if l1:
        config["l1"] = l1
    return load_or_train(config, lambda: build(r), run)


@dataclass(frozen=True)
class Start:
    """Where :func:`train_qat` starts: :func:`finetune` with these settings."""
    epochs: int = 8
    lr: float = 0.01
    weight_decay: float = 0.0
    psgd: PSGDConfig | None = None
