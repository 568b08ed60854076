"""The models the chapters train: a small CNN and an MLP for the packaged digit data
sets, and ResNet-20 (He et al., 2016) for CIFAR-10."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["SmallCNN", "MaxPool2d", "tile_max", "MLP", "ResNet20", "resnet20", "TinyTransformer", "build_model"]


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a CPU tensor in the channels-last layout and hands the
    result back in the usual one: the same output and the same gradient, bit for bit (a max
    is exact, and a tie sends the gradient to the same element in both layouts; a test
    checks), in a quarter of the time for the book's CNN on a CPU, where PyTorch's kernel
    for the usual layout is the slow one (1 ms of a 7 ms training step, measured by
    ``python -m lowbit.bench``). Elsewhere it is ``nn.MaxPool2d``.

    Without autograd (evaluation, SLB's discrete pass), windows that tile the input
    (kernel = stride, no padding) are pooled by :func:`tile_max` instead: no indices to
    keep, and a third of the time again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or self.return_indices:
            return super().forward(x)
        k = nn.modules.utils._pair(self.kernel_size)
        if not (x.requires_grad and torch.is_grad_enabled()) and self._tiles() \
                and x.shape[2] >= k[0] and x.shape[3] >= k[1]:  # (else torch's error)
            return tile_max(x, *k)
        return super().forward(_ChannelsLast.apply(x)).contiguous()

    def _tiles(self) -> bool:
        """Whether the windows tile the input: kernel = stride (2 or more), no padding."""
        k, s = nn.modules.utils._pair(self.kernel_size), nn.modules.utils._pair(self.stride)
        return (k == s and min(k) > 1 and nn.modules.utils._pair(self.padding) == (0, 0)
                and nn.modules.utils._pair(self.dilation) == (1, 1) and not self.ceil_mode)


def tile_max(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Max-pooling of ``x`` (N, C, H, W) over kh x kw windows that tile it (stride = kernel,
    the last rows and columns that fill no window dropped), as elementwise maxima of strided
    views: ``F.max_pool2d``'s values, NaN included, without its indices."""
    oh, ow = x.shape[2] // kh, x.shape[3] // kw
    rows = x[:, :, :oh * kh].unflatten(2, (oh, kh))          # (N, C, oh, kh, W)
    r = torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1])
    for i in range(2, kh):
        torch.maximum(r, rows[:, :, :, i], out=r)
    cols = r[..., :ow * kw].unflatten(3, (ow, kw))            # (N, C, oh, ow, kw)
    out = torch.maximum(cols[..., 0], cols[..., 1])
    for i in range(2, kw):
        torch.maximum(out, cols[..., i], out=out)
    return out


class _ChannelsLast(torch.autograd.Function):
    """``x`` in the channels-last layout; its gradient goes back in the usual one (an
    elementwise backward such as ReLU's runs 30x slower on a CPU when its two tensors
    differ in layout)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks with max-pooling, then one linear classifier.

    ``widths=(16, 32)`` on 28x28 MNIST has about 20k parameters and trains an
    epoch of 4,000 images in about a second on two CPU cores.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 widths: tuple[int, ...] = (16, 32), image_size: int = 28) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for w in widths:
            layers += _conv_bn_relu(c, w) + [MaxPool2d(2)]
            c, size = w, size // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """Fully connected network with BatchNorm and ReLU between the layers."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (128, 64),
                 num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(in_features, h, bias=False), nn.BatchNorm1d(h), nn.ReLU()]
            in_features = h
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut; when the shape changes, the
    shortcut subsamples and pads channels with zeros ("option A" of He et al.)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 images: 3 stages of 3 basic blocks, 16/32/64 channels (0.27M)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        blocks, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                blocks.append(BasicBlock(c, c_out, 2 if stage > 0 and i == 0 else 1))
                c = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Block(nn.Module):
    """Pre-norm transformer block; attention written with nn.Linear projections so that
    every matrix product is a layer the quantizers can replace."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A small bidirectional transformer encoder that maps a token sequence to one
    prediction per position (N, T) -> (N, T, vocab): nanoGPT's block without the mask."""

    def __init__(self, vocab: int = 10, length: int = 12, dim: int = 32, heads: int = 4,
                 layers: int = 2, out_vocab: int | None = None) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(length, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_vocab or vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"expected token ids of shape (N, T ≤ {self.pos.shape[0]}), "
                             f"got {tuple(x.shape)}")
        h = self.tok(x) + self.pos[: x.shape[1]]
        return self.head(self.ln(self.blocks(h)))


def resnet20(num_classes: int = 10) -> ResNet20:
    """ResNet-20 for CIFAR-10 (He et al. 2016), the papers' model."""
    return ResNet20(num_classes)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int = 10,
                **kw) -> nn.Module:
    """A model by name sized for ``input_shape``: ``"cnn"`` (SmallCNN, widths 16 and 32),
    ``"cnn8"`` (SmallCNN at half the width, 8 and 16: four times cheaper, for chapters that
    train many models), ``"cnn_w1_w2_…"`` (SmallCNN with those block widths: one conv block
    per width, at most as many as halvings of the image leave it at least 1 pixel wide),
    ``"mlp"``, ``"resnet20"``."""
    if name == "cnn8":
        kw.setdefault("widths", (8, 16))
        name = "cnn"
    if name.startswith("cnn_"):
        parts = name[4:].split("_")
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a 'cnn_…' model names its block widths as positive integers "
                             f"joined by '_' (e.g. 'cnn_8_16_32'), got {name!r}")
        widths = tuple(int(p) for p in parts)
        if len(input_shape) == 3 and input_shape[-1] >> len(widths) < 1:
            raise ValueError(f"{name!r} has {len(widths)} blocks, each halving the image; "
                             f"a {input_shape[-1]}-pixel image allows at most "
                             f"{input_shape[-1].bit_length() - 1}")
        kw["widths"] = widths
        name = "cnn"
    if name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"'cnn' needs image inputs (C, H, W), got shape {input_shape}")
        return SmallCNN(input_shape[0], num_classes, image_size=input_shape[-1], **kw)
    if name == "mlp":
        n = 1
        for s in input_shape:
            n *= s
        return MLP(n, num_classes=num_classes, **kw)
    if name == "resnet20":
        return ResNet20(num_classes, in_channels=input_shape[0], **kw)
    raise ValueError(f"unknown model {name!r}; choose 'cnn', 'cnn8', 'mlp' or 'resnet20'")
