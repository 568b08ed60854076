"""Properties of the uniform quantizers (METHODS.md "Common ground")."""
import copy
import math

import pytest
import torch
from torch import nn

from lowbit import quant as Q
from lowbit.baselines.lsq import lsq_quantize
from lowbit.psgd import sparsity
from lowbit.models import SmallCNN


@pytest.fixture
def w():
    return torch.randn(64, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_number_of_levels_and_zero(w, bits):
    q = Q.quantize_symmetric(torch.linspace(-1, 1, 100_001), bits)
    assert q.unique().numel() == 2 ** bits - 1
    assert Q.quantize_symmetric(torch.tensor([0.0, 1.0, -0.3]), bits)[0] == 0.0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_formula_idempotent_and_error_bound(w, bits, per_channel):
    qmax = 2 ** (bits - 1) - 1
    q = Q.quantize_symmetric(w, bits, per_channel)
    delta = (w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()) / qmax
    expected = delta * torch.round(torch.clamp(w / delta, -qmax, qmax))
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(Q.quantize_symmetric(q, bits, per_channel), q)  # Q(Q(w)) = Q(w)
    assert ((w - q).abs() <= delta / 2 + 1e-6).all()  # error at most Δ/2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_per_channel_error_at_most_per_tensor(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 50, generator=g) * torch.logspace(-2, 0, 16)[:, None]
    assert Q.quantization_mse(w, bits, per_channel=True) <= Q.quantization_mse(w, bits)


def test_stochastic_rounding_unbiased():
    # 200k draws of a value 0.3 grid steps above a level: the mean of SR is unbiased.
    # Each draw has variance p(1-p) = 0.21 (grid units), so the standard error of the
    # mean is sqrt(0.21/2e5) ≈ 1e-3; we allow 5 standard errors.
    n = 200_000
    y = torch.full((n,), 2.3)
    r = Q.round_stochastic(y, torch.Generator().manual_seed(0))
    assert set(r.unique().tolist()) == {2.0, 3.0}
    assert abs(r.mean().item() - 2.3) < 5 * math.sqrt(0.21 / n)
    assert torch.round(y).mean().item() == 2.0  # nearest rounding is biased here
    # the same through the quantizer, with Δ = 1
    q = Q.quantize_symmetric(y, 4, rounding="stochastic", delta=torch.tensor(1.0),
                             generator=torch.Generator().manual_seed(1))
    assert abs(q.mean().item() - 2.3) < 5 * math.sqrt(0.21 / n)


def test_unsigned_and_asymmetric():
    x = torch.linspace(-1, 5, 1001)
    q = Q.quantize_unsigned(x, 3, x_max=4.0)
    assert q.min() == 0 and q.max() == 4.0 and q.unique().numel() == 8
    a = Q.quantize_asymmetric(x, 4)
    assert a.unique().numel() <= 16 and (a == 0).any()
    assert ((x - a).abs() <= 6 / 15 / 2 + 1e-6).all()
    rows = torch.stack([torch.linspace(-1, 1, 50), 100 * torch.linspace(-1, 1, 50)])
    per_row = Q.quantize_asymmetric(rows, 4, dim=0)
    assert (rows[0] - per_row[0]).abs().max() < 2 / 15  # row 0 keeps its own small range


@pytest.mark.parametrize("bad", [0, 33, -1, 2.5, "4", None, True])
def test_bad_bits(bad, w):
    with pytest.raises(ValueError, match=r"bits.*(from 2 to 32|whole number)") as e:
        Q.quantize_symmetric(w, bad)
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected(w, value):
    w = w.clone()
    w[3, 4] = value
    for fn in (lambda: Q.quantize_symmetric(w, 4), lambda: Q.quantize_symmetric(w, 4, True),
               lambda: Q.quantize_asymmetric(w, 4), lambda: Q.quantize_unsigned(w, 4, 1.0)):
        with pytest.raises(ValueError, match="1 non-finite value"):
            fn()


def test_empty_and_wrong_inputs():
    with pytest.raises(ValueError, match="empty"):
        Q.quantize_symmetric(torch.empty(0), 4)
    with pytest.raises(ValueError, match="floating-point"):
        Q.quantize_symmetric(torch.arange(5), 4)
    with pytest.raises(ValueError, match="torch.Tensor"):
        Q.quantize_symmetric([1.0, 2.0], 4)
    with pytest.raises(ValueError, match="no dimension 3"):
        Q.quantize_symmetric(torch.randn(4, 4), 4, per_channel=True, axis=3)
    with pytest.raises(ValueError, match="rounding"):
        Q.quantize_symmetric(torch.randn(4), 4, rounding="up")
    with pytest.raises(ValueError, match="x_max"):
        Q.quantize_unsigned(torch.rand(4), 4, x_max=0.0)


def test_all_zero_tensor_quantizes_to_zero():
    assert (Q.quantize_symmetric(torch.zeros(3, 3), 4, per_channel=True) == 0).all()


def test_ste_gradient_is_identity():
    w = torch.randn(10, requires_grad=True)
    Q.fake_quantize_ste(w, 3).mul(torch.arange(10.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(10.0))


def _net():
    torch.manual_seed(0)
    net = SmallCNN()
    with torch.no_grad():  # give BN non-trivial statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def test_quantize_model_copies_and_quantizes():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = Q.quantize_model(net, 3, act_bits=4)
    for k, v in net.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    for _, m in Q.quantizable_layers(q):
        assert m.weight.unique().numel() <= 7 and m.weight_bits == 3
    acts = [m for m in q.modules() if isinstance(m, Q.ActQuant)]
    assert len(acts) == 2 and all(a.x_max > 0 for a in acts)
    x = torch.randn(8, 1, 28, 28)
    assert q(x).shape == (8, 10)
    fl = Q.quantize_model(net, 2, first_last_bits=8)
    bits = [m.weight_bits for _, m in Q.quantizable_layers(fl)]
    assert bits == [8, 2, 8]


def test_calibrated_activation_range():
    net = _net()
    data = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    q = Q.quantize_model(net, 8, act_bits=8, act_range="calibrate", calib_data=data)
    acts = [a for a in q.modules() if isinstance(a, Q.ActQuant)]
    # each range is the largest unquantized activation seen at that ReLU (of the
    # model with quantized weights): recompute it with the quantizers passing through
    ref = copy.deepcopy(q)
    for a in ref.modules():
        if isinstance(a, Q.ActQuant):
            a.calibrating = True
    with torch.no_grad():
        first = max(ref.features[:3](x).max() for x in data)
        second = max(ref.features[:7](x).max() for x in data)
    torch.testing.assert_close(acts[0].x_max, first)
    torch.testing.assert_close(acts[1].x_max, second)
    with pytest.raises(ValueError, match="calib_data"):
        Q.quantize_model(net, 8, act_bits=8, act_range="calibrate")


def test_act_quant_without_gradient_gives_the_ste_paths_values_bit_for_bit():
    aq = Q.ActQuant(4, x_max=2.5).eval()
    x = (torch.randn(64, 8, 7, 7, generator=torch.Generator().manual_seed(0)) * 2).relu()
    with_grad = aq(x.clone().requires_grad_()).detach()
    with torch.no_grad():
        assert torch.equal(aq(x), with_grad)


def test_model_size_bits():
    net = _net()
    n_w = sum(m.weight.numel() for _, m in Q.quantizable_layers(net))
    n_all = sum(p.numel() for p in net.parameters())
    assert Q.model_size_bits(net) == 32 * n_all
    assert Q.model_size_bits(Q.quantize_model(net, 4)) == 4 * n_w + 32 * (n_all - n_w)


def test_prepare_qat_trains_through_ste():
    net = _net().train()
    qat = Q.prepare_qat(net, 2, act_bits=4)
    assert isinstance(qat.features[0], Q.QuantConv2d)
    out = qat(torch.randn(4, 1, 28, 28))
    out.sum().backward()
    assert qat.features[0].weight.grad is not None
    assert qat.features[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- edge cases
# Each was once silently wrong (issue 30): now the right answer or an error naming the value.
EDGE_ERRORS = [
    ("a boolean is not a bit-width", lambda w: Q.fake_quantize_ste(w, True), "got True"),
    ("unknown grid", lambda w: Q.fake_quantize_ste(w, 4, grid="odd"), "grid must be one of"),
    ("a step of 0", lambda w: Q.quantize_symmetric(w, 4, delta=0), r"delta must be finite and positive, got \[0.0\]"),
    ("a NaN step", lambda w: Q.quantize_symmetric(w, 4, delta=float("nan")), r"got \[nan\]"),
    ("a negative step", lambda w: Q.quantize_symmetric(w, 4, delta=-0.5), r"got \[-0.5\]"),
    ("one bad step per channel", lambda w: Q.quantize_symmetric(w, 4, delta=torch.tensor([[1.0], [0.0], [1.0], [1.0]])), "delta must be finite and positive"),
    ("32-bit codes in float16", lambda w: Q.quantize_symmetric(w.half(), 32), "more than torch.float16 holds.*at most 16 bits"),
    ("ActQuant's -inf", lambda w: Q.ActQuant(4, x_max=1.0)(torch.tensor([-float("inf"), 0.5])), "1 non-finite activation"),
    ("ActQuant's negative range", lambda w: Q.ActQuant(4, x_max=-1.0), r"x_max must be a finite number ≥ 0 .*got -1.0"),
    ("ActQuant's momentum above 1", lambda w: Q.ActQuant(4, momentum=5), r"momentum must be a number in \(0, 1\], got 5"),
    ("ActQuant's momentum of 0", lambda w: Q.ActQuant(4, momentum=0), "momentum"),
    ("ActQuant on nothing", lambda w: Q.ActQuant(4)(torch.empty(0, 3)), r"empty tensor \(shape \(0, 3\)\)"),
    ("ActQuant on a meta tensor", lambda w: Q.ActQuant(4)(torch.empty(3, device="meta")), "meta tensor"),
    ("negative default bits", lambda w: Q.model_size_bits(torch.nn.Linear(2, 2), default_bits=-1), "default_bits must be from 1 to 64, got -1"),
    ("LSQ on NaN", lambda w: lsq_quantize(torch.tensor([float("nan"), 1.0]), torch.tensor([0.5]), 4), "1 non-finite"),
    ("LSQ's step of 0", lambda w: lsq_quantize(w, torch.tensor([0.0]), 4), r"step\) must be finite and positive, got \[0.0\]"),
    ("LSQ's NaN step", lambda w: lsq_quantize(w, torch.tensor([float("nan")]), 4), "finite and positive"),
    ("LSQ's negative step", lambda w: lsq_quantize(w, torch.tensor([-0.1]), 4), "finite and positive"),
    ("sparsity of a model without weights", lambda w: sparsity(torch.nn.ReLU()), "no conv or linear weights"),
]


@pytest.mark.parametrize("case", EDGE_ERRORS, ids=[c[0] for c in EDGE_ERRORS])
def test_edge_cases_are_clear_errors(case):
    _, call, message = case
    with pytest.raises(ValueError, match=message):
        call(torch.randn(4, 3))


def test_edge_cases_with_right_answers():
    # binarize's scale is mean|w| without overflow: 2e38 for (1e38, 3e38, -2e38)
    assert torch.equal(Q.binarize(torch.tensor([1e38, 3e38, -2e38])), torch.tensor([2e38, 2e38, -2e38]))
    # 16-bit codes fit float16 (32,767 ≤ 65,504): finite, within float16's own spacing
    w = torch.randn(64).half()
    q = Q.quantize_symmetric(w, 16)
    assert q.dtype == torch.float16 and torch.isfinite(q).all() and (q - w).abs().max() < 0.01
    # a one-element tensor is a range; 0 is one (a ReLU that never fires)
    assert float(Q.ActQuant(4, x_max=torch.tensor(2.0)).x_max) == 2.0
    assert torch.equal(Q.ActQuant(4, x_max=0.0).eval()(torch.ones(3)), torch.zeros(3))


def test_clone_layer_keeps_the_shape_and_settings_of_the_layer():
    """clone_layer rebuilds a conv or linear layer in another form (QAT, LSQ, FQT, SLB, and
    back): every setting that shapes its output kept, the padding mode included, and a
    layer it cannot rebuild named."""
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=False,
                           padding_mode="reflect")
    new = Q.clone_layer(conv, Q.QuantConv2d, weight_bits=3)
    assert isinstance(new, Q.QuantConv2d) and new.weight_bits == 3
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):
        assert getattr(new, name) == getattr(conv, name), name
    assert new.bias is None and new.weight.shape == conv.weight.shape
    lin = Q.clone_layer(torch.nn.Linear(5, 3), linear=Q.QuantLinear, weight_bits=2)
    assert isinstance(lin, Q.QuantLinear) and lin.weight.shape == (3, 5) and lin.bias is not None
    with pytest.raises(TypeError, match="conv or a linear layer, got BatchNorm2d"):
        Q.clone_layer(torch.nn.BatchNorm2d(3))
