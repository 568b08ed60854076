"""FQT: unbiased gradient quantizers, the BHQ transform, QAT/FQT layers, bad input."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from lowbit import fqt, quant
from lowbit.models import SmallCNN


def _gradient(n=16, d=40, seed=0):
    g = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    g[2] *= 30.0  # one sample with a large gradient, as in real batches
    g[5] *= 8.0
    return g


@pytest.mark.parametrize("quantizer", fqt.QUANTIZERS)
@pytest.mark.parametrize("bits", [2, 4])
def test_quantizers_are_unbiased(quantizer, bits):
    # K draws: each entry's mean error must be within 5 standard errors (sd/√K) of zero,
    # plus float rounding; with 640 entries a correct quantizer fails with prob ~ 4e-4.
    g, k = _gradient(), 3000
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([fqt.quantize_gradient(g, bits, quantizer, gen) for _ in range(k)])
    err = (draws.mean(0) - g).abs()
    se = draws.std(0) / math.sqrt(k)
    # an entry a fraction f < 25/K of a step from a code may never round away in K draws
    # (its error f·Δ is then below 25·Δ/K): the per-tensor step bounds Δ
    step = float(fqt.grid(g, "tensor", bits)[1]) / (2 ** bits - 1)
    assert bool((err <= 5 * se + 25 * step / k + 1e-4 * g.abs().max()).all())
    # and nearest rounding on the same grid would be biased: the test can fail
    assert float(draws.std(0).max()) > 0


def test_nearest_rounding_is_biased_where_stochastic_is_not():
    x = torch.full((1, 1000), 0.3)
    x[0, 0], x[0, 1] = 0.0, 1.0  # range [0, 1], 1 bit: codes 0 and 1
    near = quant.quantize_asymmetric(x, 1)
    sr = torch.stack([fqt.quantize_pt(x, 1, torch.Generator().manual_seed(s)) for s in range(400)])
    assert float(near[0, 5]) == 0.0  # nearest always rounds 0.3 down
    assert abs(float(sr[:, 0, 5:].mean()) - 0.3) < 0.01


def test_dither_is_uniform_on_the_midpoints_of_2_16_levels():
    u = quant.dither(torch.empty(64, 1000), torch.Generator().manual_seed(0))
    k = u * 2 ** quant.DITHER_BITS - 0.5  # the level of each draw
    assert bool((k == k.round()).all()) and float(k.min()) >= 0 and float(k.max()) < 2 ** 16
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())  # 5 standard errors
    # every one of the 16 bits of a level is a fair coin (the top ones included)
    bits = torch.stack([(k.long() >> i) & 1 for i in range(16)]).float().mean((1, 2))
    assert bool(((bits - 0.5).abs() < 0.01).all()), bits


def test_dither_bad_input():
    with pytest.raises(ValueError, match="floating-point"):
        quant.dither(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="floating-point"):
        quant.dither("x")
    with pytest.raises(ValueError, match="at least 3 entries"):
        quant.dither(torch.empty(10), random=torch.empty(1, dtype=torch.int64))


@pytest.mark.parametrize("frac", [0.3, 1 / 3, 0.999])
def test_rounding_up_probability_is_the_fractional_part(frac):
    # exactly: over all 2^16 levels, floor(t + u) rounds up for a share of them within
    # 2^-17 of frac (the midpoint dither's worst case)
    levels = (torch.arange(2 ** quant.DITHER_BITS, dtype=torch.float64) + 0.5) / 2 ** 16
    share = float((torch.floor(3 + frac + levels) > 3).double().mean())
    assert abs(share - frac) <= 2.0 ** -17


@pytest.mark.skipif(fqt.compiled is None, reason="numba is not installed")
@pytest.mark.parametrize("copies", [((4, "pt"), (8, "pt")), ((8, "psq"),), ((8, "column"),),
                                    ((2, "psq"), (8, "column")), ((4, "pt_minmax"), (8, "pt_minmax")),
                                    ((4, "bhq"), (8, "column")), ((2, "bhq"),),
                                    ((4, "row"),)])
@pytest.mark.parametrize("columns", [500, 1100])
def test_compiled_loop_gives_the_numbers_of_the_torch_operations(copies, columns):
    """The compiled loop's numbers are the torch operations', on one thread (16,000 values)
    and in parallel (35,200: above fqt.kernel.SERIAL_BELOW)."""
    from lowbit.fqt import kernel
    assert (32 * columns < kernel.SERIAL_BELOW) == (columns == 500)
    x = torch.randn(32, columns, generator=torch.Generator().manual_seed(0))
    x *= torch.logspace(-8, 3, 32).unsqueeze(1)  # rows from tiny to large ranges
    x[3] = 0.5  # and an empty one
    fused = fqt.quantize_copies_compiled(x, copies, torch.Generator().manual_seed(1),
                                         fqt.Workspace(x))
    ops = fqt.quantize_copies(x, copies, torch.Generator().manual_seed(1))
    for a, b in zip(fused, ops):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["compiled loop", "torch operations"])
@pytest.mark.parametrize("quantizer", ["pt", "psq", "bhq"])
def test_layer_workspace_gives_the_same_gradients_as_fresh_memory(monkeypatch, path, quantizer):
    if path == "torch operations":
        from lowbit.fqt import layers
        monkeypatch.setattr(layers, "can_compile", lambda *a: False)
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    base = SmallCNN(widths=(4, 8))
    grads = []
    for use_workspace in (True, False):
        m = fqt.convert(base, "fqt", quantizer, 4)
        if not use_workspace:
            for layer in m.modules():
                if isinstance(layer, (fqt.FQTConv2d, fqt.FQTLinear)):
                    monkeypatch.setattr(layer, "_work", lambda rows: None)
        fqt.configure(m, generator=torch.Generator().manual_seed(3))
        for _ in range(2):  # the second step reuses the workspace
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_weight_gradient_copy_is_per_column_with_the_per_sample_quantizers():
    assert fqt.backward_copies("psq", 4, True) == ((4, "psq"), (8, "column"))
    assert fqt.backward_copies("bhq", 2, False) == ((8, "column"),)
    assert fqt.backward_copies("pt", 4, True) == ((4, "pt"), (8, "pt"))
    # a column with a tiny range keeps its resolution in the 8-bit copy
    g = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 1e-4
    q = fqt.quantize_copies(g, ((8, "column"),), torch.Generator().manual_seed(1))[0]
    span0 = float(g[:, 0].max() - g[:, 0].min())
    assert float((q[:, 0] - g[:, 0]).abs().max()) <= span0 / 255 * 1.0001


def test_per_tensor_grid_holds_zero_as_in_the_official_code():
    gen = torch.Generator().manual_seed(0)
    for lo, hi in [(-1.0, 3.0), (-0.013, 5.0), (-2.0, 0.001), (0.5, 2.0), (-3.0, -1.0)]:
        for bits in (2, 4, 8):
            g = torch.cat([torch.tensor([lo, hi]), lo + (hi - lo) * torch.rand(98, generator=gen)])
            q = fqt.quantize_pt(g.reshape(4, 25), bits, gen)
            low, span = fqt.grid(g.reshape(4, 25), "tensor", bits)
            step = float(span) / (2 ** bits - 1)
            z = -float(low) / step  # the code of zero: a whole number in 0 … B
            assert abs(z - round(z)) < 1e-4 and 0 <= round(z) <= 2 ** bits - 1, (lo, hi, bits, z)
            assert float(low) <= min(lo, 0) and float(low) + float(span) >= max(hi, 0) - 1e-6
            # the official rule moves only the top, unless it would divide by zero
            if lo < 0 and math.floor(-lo * (2 ** bits - 1) / (max(hi, 0) - lo)) >= 1:
                assert float(low) == pytest.approx(lo)
                # an exact zero is never moved (to float precision): it sits on a code
            g0 = g.clone()
            g0[5] = 0.0
            q0 = float(fqt.quantize_pt(g0.reshape(4, 25), bits, gen).reshape(-1)[5])
            assert abs(q0) <= 1e-6 * float(span), (lo, hi, bits, q0)


def test_zero_code_cuts_the_variance_of_a_mostly_small_gradient():
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 1e-3
    g[:4] *= 1000  # four large rows: the rest round around zero
    var = {}
    for q in ("pt", "pt_minmax"):
        gen = torch.Generator().manual_seed(1)
        var[q] = float(torch.stack([fqt.quantize_gradient(g, 4, q, gen)
                                    for _ in range(100)]).var(0).sum())
    assert var["pt"] < var["pt_minmax"] / 2


def test_bhq_groups_follow_the_official_rule():
    values = np.array([10.0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    # z small rows: stop at the first z whose smallest leader gets a whole row
    assert fqt.quantizers._official_leaders(values) == 1
    assert fqt.quantizers._official_leaders(np.ones(8)) == 4  # equal rows pair up
    assert fqt.quantizers._official_leaders(np.zeros(8)) == 8  # constant rows: no groups
    assert fqt.quantizers._official_leaders(np.array([3.0])) == 1
    g = torch.distributions.StudentT(2.0).sample((64, 256))
    assert fqt.bhq_groups(g) > 0
    # the second scale carries the official max|H| factor
    plan = fqt.bhq_plan(torch.stack([torch.linspace(-5, 5, 8)] + [torch.linspace(-1, 1, 8)] * 3))
    s1 = (10 / 2) ** (-1 / 3)
    s2 = (2 * fqt.householder_max(4) / 3) ** (-1 / 3)
    torch.testing.assert_close(plan.scale, torch.tensor([s1, s2, s2, s2]))


@pytest.mark.parametrize("quantizer", ["pt", "psq", "bhq"])
@pytest.mark.parametrize("value", [0.0, 0.25])
def test_zero_or_constant_gradient_is_quantized_exactly(quantizer, value):
    g = torch.full((8, 5), value)
    q = fqt.quantize_gradient(g, 4, quantizer, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q, g)
    # and a layer whose loss gradient is exactly zero trains on
    lin = fqt.convert(nn.Sequential(nn.Linear(3, 2)), "fqt", quantizer, 4)
    lin(torch.randn(4, 3)).mul(0).sum().backward()
    assert float(lin[0].weight.grad.abs().sum()) == 0.0


def test_half_precision_is_unbiased():
    g = (1e-3 * torch.randn(16, 64, generator=torch.Generator().manual_seed(0))).half()
    gen = torch.Generator().manual_seed(1)
    mean = torch.stack([fqt.quantize_psq(g, 8, gen).float() for _ in range(400)]).mean(0)
    ratio = float((mean * g.float()).sum() / (g.float() ** 2).sum())
    assert abs(ratio - 1) < 0.01, ratio
    assert fqt.quantize_psq(g, 8, gen).dtype == torch.float16


def test_obscure_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="meta"):
        fqt.quantize_psq(torch.empty(4, 3, device="meta"), 4)
    with pytest.raises(ValueError, match="sparse"):
        fqt.quantize_psq(torch.eye(3).to_sparse(), 4)
    with pytest.raises(ValueError, match="overflows"):
        fqt.quantize_pt(torch.tensor([[3e38, -3e38]]), 4)


def test_psq_uses_per_row_ranges():
    g = torch.tensor([[0.0, 1.0, 0.5], [0.0, 100.0, 50.0]])
    q = fqt.quantize_psq(g, 8, torch.Generator().manual_seed(0))
    # row 0 has its own step 1/255, so 0.5 lands within one step of 0.5
    assert abs(float(q[0, 2]) - 0.5) <= 1 / 255 + 1e-6
    assert fqt.variance_bound(g, 8, "psq") < fqt.variance_bound(g, 8, "pt")
    assert fqt.bins_used(g, 2, "psq") >= fqt.bins_used(g, 2, "pt")


@pytest.mark.parametrize("size", [1, 2, 3, 8, 17])
def test_householder_blocks_are_orthogonal_and_spread_the_first_row(size):
    h = fqt.householder(size, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(size, dtype=torch.float64))
    torch.testing.assert_close(h @ torch.eye(size, dtype=torch.float64)[:, 0],
                               torch.full((size,), 1 / math.sqrt(size), dtype=torch.float64))


@pytest.mark.parametrize("n_groups", [None, 1, 3, 16])
def test_bhq_transform_inverts_exactly(n_groups):
    g = _gradient().double()
    t, t_inv = fqt.bhq_transform(g, n_groups)
    torch.testing.assert_close(t_inv @ t, torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(t_inv @ (t @ g), g)
    # with 32-bit codes quantization is (almost) the identity: the whole BHQ round trip returns g
    q = fqt.quantize_bhq(g, 32, torch.Generator().manual_seed(0), n_groups)
    torch.testing.assert_close(q, g, rtol=1e-6, atol=1e-6)


def test_bhq_and_psq_cut_variance_on_a_spiky_gradient():
    g = _gradient()
    var = {}
    for q in fqt.QUANTIZERS:
        gen = torch.Generator().manual_seed(2)
        var[q] = float(torch.stack([fqt.quantize_gradient(g, 4, q, gen) for _ in range(300)]).var(0).sum())
    assert var["bhq"] < var["psq"] < var["pt"]
    assert var["pt"] <= fqt.variance_bound(g, 4, "pt")
    assert var["psq"] <= fqt.variance_bound(g, 4, "psq")


@pytest.mark.parametrize("mode", ["qat", "fqt"])
def test_fqt_forward_equals_qat_forward(mode):
    torch.manual_seed(0)
    base = SmallCNN()
    x = torch.randn(4, 1, 28, 28)
    qat, f = fqt.convert(base, "qat"), fqt.convert(base, mode, "bhq", 4)
    torch.testing.assert_close(f(x), qat(x))
    # and the forward is the 8-bit quantized one, not full precision
    lin = f.classifier
    h = torch.randn(3, lin.in_features)
    ref = nn.functional.linear(quant.quantize_asymmetric(h, 8), quant.quantize_symmetric(lin.weight, 8),
                               lin.bias)
    torch.testing.assert_close(lin(h), ref)


def test_qat_backward_is_the_straight_through_gradient():
    torch.manual_seed(1)
    lin = nn.Linear(6, 3)
    q = fqt.convert(nn.Sequential(lin), "qat")[0]
    x = torch.randn(5, 6, requires_grad=True)
    q(x).pow(2).sum().backward()
    xq, wq = quant.quantize_asymmetric(x.detach(), 8), quant.quantize_symmetric(lin.weight.detach(), 8)
    x2, w2 = xq.clone().requires_grad_(), wq.clone().requires_grad_()
    b2 = lin.bias.detach().clone().requires_grad_()
    nn.functional.linear(x2, w2, b2).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(q.weight.grad, w2.grad)
    torch.testing.assert_close(q.bias.grad, b2.grad)


def test_fqt_backward_in_expectation_equals_qat_backward():
    torch.manual_seed(2)
    model = fqt.convert(SmallCNN(widths=(4, 8)), "fqt", "psq", 4)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    stats = fqt.gradient_statistics(model, x, y, "psq", 4, draws=200)
    for name, s in stats.items():
        assert s["variance"] > 0, name
        assert s["bias"] < 5 * s["bias_se"] + 1e-6, (name, s)
    assert all(m.mode == "fqt" for m in model.modules() if isinstance(m, fqt.FQTLinear))


@pytest.mark.parametrize("bits", [0, 33, 1.5, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        fqt.quantize_psq(torch.randn(4, 3), bits)
    with pytest.raises(ValueError, match="bits"):
        fqt.configure(fqt.convert(SmallCNN()), grad_bits=bits)


@pytest.mark.parametrize("quantizer", fqt.QUANTIZERS)
def test_bad_gradients(quantizer):
    g = torch.randn(4, 3)
    g[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fqt.quantize_gradient(g, 4, quantizer)
    with pytest.raises(ValueError, match="empty"):
        fqt.quantize_gradient(torch.empty(0, 3), 4, quantizer)
    with pytest.raises(ValueError, match="floating-point"):
        fqt.quantize_gradient(torch.ones(2, 2, dtype=torch.long), 4, quantizer)


def test_bad_settings():
    with pytest.raises(ValueError, match="quantizer"):
        fqt.quantize_gradient(torch.randn(2, 2), 4, "per-channel")
    with pytest.raises(ValueError, match="mode"):
        fqt.convert(SmallCNN(), "fp")
    with pytest.raises(ValueError, match="n_groups"):
        fqt.bhq_transform(torch.randn(4, 3), 9)
    with pytest.raises(ValueError, match="quantizer"):  # checked before anything is copied
        fqt.convert(SmallCNN(), "fqt", "per-channel")
    with pytest.raises(ValueError, match="draws"):
        fqt.gradient_statistics(fqt.convert(SmallCNN()), torch.randn(2, 1, 28, 28),
                                torch.tensor([0, 1]), "pt", 4, draws=1)


def test_fqt_linear_on_sequences_matches_qat_gradients_in_qat_mode():
    from lowbit.models import TinyTransformer
    torch.manual_seed(3)
    base = TinyTransformer(vocab=5, length=6, dim=8, heads=2, layers=1)
    x = torch.randint(0, 5, (4, 6))
    q = fqt.convert(base, "qat")
    q(x).sum().backward()
    assert all(m.weight.grad is not None and m.bias.grad.shape == m.bias.shape
               for m in q.modules() if isinstance(m, fqt.FQTLinear))


def _official_transform(g: torch.Tensor) -> torch.Tensor:
    """The official BHQ transform, written out as StatQuant's algorithm builds it: ranges
    sorted, leaders chosen by the share rule, rounded cumulative shares, a dense matrix of
    Householder blocks times the two scales (with the official normalisation of s, which
    per-row quantization does not see), rows put back in their order."""
    n = g.shape[0]
    mvec = (g.amax(1) - g.amin(1)).double()
    rank = torch.argsort(-mvec, stable=True)
    values = mvec[rank]
    zeros, total = 0, float(values.sum())
    while True:
        zeros += 1
        total -= float(values[n - zeros])
        if zeros * float(values[n - zeros - 1]) / total >= 1:
            break
    lead = n - zeros
    nums = torch.round(torch.cumsum(zeros * values[:lead] / total, 0)).long()
    t = torch.zeros(n, n, dtype=torch.float64)
    order, at, nxt = [], 0, lead
    for i in range(lead):
        members = [i] + list(range(nxt, lead + int(nums[i])))
        nxt = lead + int(nums[i])
        size = len(members)
        h = fqt.householder(size, torch.float64)
        if size > 1:
            w1 = float(values[i]) / math.sqrt(size)
            w2 = float(values[members[1]]) * float(h.abs().max())
            s = torch.tensor([w1 ** (-1 / 3)] + [(w2 / (size - 1)) ** (-1 / 3)] * (size - 1),
                             dtype=torch.float64)
            s = s * (1 / s).norm()
        else:
            s = torch.ones(1, dtype=torch.float64)
        t[at:at + size, at:at + size] = h * s  # H · diag(s)
        order += members
        at += size
    rows = rank[torch.tensor(order)]
    inv = torch.empty(n, dtype=torch.long)
    inv[rows] = torch.arange(n)
    return t[inv][:, inv]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bhq_matches_the_official_transform(seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.distributions.StudentT(2.0).sample((64, 256)).double()
    g *= torch.logspace(-2, 1, 64, dtype=torch.float64)[torch.randperm(64, generator=gen)].unsqueeze(1)
    t_ref = _official_transform(g)
    t, _ = fqt.bhq_transform(g)
    # the same blocks and the same scales, up to one positive factor per group (the
    # official normalisation), which per-row quantization cancels
    y, y_ref = t @ g, t_ref @ g
    factor = (y.norm(dim=1) / y_ref.norm(dim=1))
    torch.testing.assert_close(y, y_ref * factor.unsqueeze(1))
    lo, hi = y.amin(1), y.amax(1)
    lo_r, hi_r = y_ref.amin(1), y_ref.amax(1)
    torch.testing.assert_close(lo / (hi - lo), lo_r / (hi_r - lo_r))  # the same codes


def test_quantized_backward_keeps_the_forward_and_is_unbiased():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    w = fqt.wrap(net, "psq", 2)
    torch.testing.assert_close(w(x), net(x))  # the forward is the wrapped layers'
    nn.functional.cross_entropy(net(x), y).backward()
    ref = net[0].weight.grad.clone()
    fqt.configure(w, generator=torch.Generator().manual_seed(0))
    draws = []
    for _ in range(400):
        w.zero_grad()
        nn.functional.cross_entropy(w(x), y).backward()
        draws.append(w[0].layer.weight.grad.clone())
    d = torch.stack(draws)
    assert float(d.var(0).sum()) > 0  # the gradient is quantized
    err = (d.mean(0) - ref).abs()
    assert bool((err <= 5 * d.std(0) / 20 + 1e-6).all())  # and unbiased
    assert net[0].weight.grad is not None and w[0].layer is not net[0]  # a copy


def test_quantized_backward_reaches_slb_logits_and_ste_weights():
    from lowbit import slb
    torch.manual_seed(5)
    base = SmallCNN(widths=(2, 4))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for model in (slb.convert(base, 2), quant.prepare_qat(base, 2, act_bits=4)):
        w = fqt.wrap(model, "bhq", 4)
        assert sum(isinstance(m, fqt.QuantizedBackward) for m in w.modules()) == 3
        nn.functional.cross_entropy(w(x), y).backward()
        grads = [p.grad for p in w.parameters() if p.requires_grad]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    with pytest.raises(ValueError, match="wraps a conv or linear"):
        fqt.QuantizedBackward(nn.ReLU())


# --------------------------------------------------------------------------- no shadow weights
def test_grid_sgd_keeps_weights_on_the_grid_and_is_unbiased():
    from lowbit.fqt import GridSGD, on_grid
    from lowbit.quant import signed_levels
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(torch.randn(32))
    opt = GridSGD([{"params": [w]}, {"params": [b], "bits": None}], lr=0.01, bits=4,
                  generator=torch.Generator().manual_seed(1))
    opt.snap()
    assert on_grid(w, opt.state[w]["delta"], 4)
    for _ in range(5):
        opt.zero_grad()
        (w.sum(0) * b).sum().backward()
        opt.step()
        assert on_grid(w, opt.state[w]["delta"], 4)
    assert opt.small_updates <= opt.updates == 5 * w.numel()
    # one update of a tiny gradient, averaged over many draws, is the SGD update
    start = w.detach().clone()
    delta = float(start.abs().max()) / signed_levels(4)
    grad = torch.full_like(start, 0.1 * delta / 0.01)       # a tenth of a step
    grad[start.abs() == start.abs().max()] = 0.0            # keep the range, and so Δ, fixed
    mean = torch.zeros_like(start)
    n = 400
    for _ in range(n):
        w.data.copy_(start)
        w.grad = grad.clone()
        opt.param_groups[1]["params"][0].grad = None
        opt.step()
        mean += w.detach() / n
    inside = start.abs() < start.abs().max() - delta
    err = (mean - (start - 0.01 * grad))[inside]
    assert err.abs().mean() < 0.02 * delta


def test_grid_sgd_nearest_drops_small_updates_and_bad_input():
    from lowbit.fqt import GridSGD
    w = torch.nn.Parameter(torch.tensor([1.0, 0.5, -0.25, 0.0]))
    opt = GridSGD([w], lr=1.0, bits=4, rounding="nearest")
    opt.snap()
    before = w.detach().clone()
    w.grad = torch.tensor([0.0, 1e-3, 1e-3, 1e-3])
    opt.step()
    torch.testing.assert_close(w.detach(), before)
    with pytest.raises(ValueError, match="lr"):
        GridSGD([w], lr=0.0)
    with pytest.raises(ValueError, match="rounding"):
        GridSGD([w], rounding="up")
    with pytest.raises(ValueError, match="bits"):
        GridSGD([w], bits=1)
    from lowbit import recipes
    with pytest.raises(ValueError, match="momentum=0"):
        recipes.train_fqt(recipes.Recipe(model="cnn8"), weight_bits=4)


# --------------------------------------------------------------------------- Theorem 2, whole network
def _tiny():
    torch.manual_seed(0)
    m = fqt.convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)), "qat")
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    return m, x, y


def test_propagation_gain_is_the_largest_eigenvalue_of_the_jacobian():
    m, x, y = _tiny()
    # the map from the last layer's output gradient (8 x 4) to both weight gradients,
    # written out column by column with ordinary backward passes
    h = {}
    hook = m[2].register_forward_hook(lambda mod, i, o: h.__setitem__("h", o))
    out = m(x)
    hook.remove()
    cols = []
    for k in range(h["h"].numel()):
        e = torch.zeros(h["h"].numel())
        e[k] = 1.0
        g = torch.autograd.grad(h["h"], [m[0].weight, m[2].weight], e.reshape(h["h"].shape), retain_graph=True)
        cols.append(torch.cat([t.flatten() for t in g]))
    J = torch.stack(cols, 1).double()
    expected = float(torch.linalg.eigvalsh(J.T @ J).max())
    assert fqt.propagation_gain(m, x, y, "2", iters=200) == pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="no FQT layer"):
        fqt.propagation_gain(m, x, y, "7")


def test_network_variance_adds_up_and_is_zero_without_quantization():
    m, x, y = _tiny()
    assert fqt.network_variance(m, x, y, "psq", 4, draws=5, only=[]) == 0.0
    one = fqt.network_variance(m, x, y, "psq", 4, draws=200, only=["2"])
    both = fqt.network_variance(m, x, y, "psq", 4, draws=200)
    assert one > 0 and both >= one * 0.8
    assert m[0].mode == "qat"      # settings restored
    with pytest.raises(ValueError, match="no FQT layer"):
        fqt.network_variance(m, x, y, "psq", 4, only=["x"])
    with pytest.raises(ValueError, match="draws"):
        fqt.network_variance(m, x, y, "psq", 4, draws=1)
    vb, v8 = fqt.output_noise(m, x, y, "0", "psq", 4, draws=20)
    assert vb == 0.0 and v8 > 0     # the first layer sends no gradient down
    with pytest.raises(ValueError, match="at least 2 batches"):
        fqt.sampling_variance(m, [(x, y)])
    assert fqt.sampling_variance(m, [(x, y), (x[:4], y[:4])]) > 0


def test_unknown_quantizer_is_named_and_the_papers_name_explained():
    g = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'pt' here"):
        fqt.quantize_gradient(g, 4, "ptq")
    with pytest.raises(ValueError, match="'nope'"):
        fqt.quantize_gradient(g, 4, "nope")


@pytest.mark.skipif(fqt.compiled is None, reason="numba is not installed")
@pytest.mark.parametrize("bits", [1, 3, 5, 6, 7, 12, 16])
def test_compiled_loop_matches_at_every_width(bits):
    # the grid's scales (1/span·B and span·(1/B)) in the loop round as torch's do
    # (2501 columns: column ranges in three blocks, rows that start inside a random word)
    for width in (300, 2501):
        x = torch.randn(7, width, generator=torch.Generator().manual_seed(bits))
        x *= torch.logspace(-6, 4, 7).unsqueeze(1)
        for copies in (((bits, "psq"), (8, "column")), ((bits, "pt"),), ((bits, "pt_minmax"),),
                       ((bits, "bhq"), (8, "column")), ((bits, "column"),)):
            a = fqt.quantize_copies_compiled(x, copies, torch.Generator().manual_seed(2),
                                             fqt.Workspace(x))
            b = fqt.quantize_copies(x, copies, torch.Generator().manual_seed(2))
            for p, q in zip(a, b):
                assert torch.equal(p, q), (bits, width, copies)


@pytest.mark.skipif(fqt.compiled is None, reason="numba is not installed")
@pytest.mark.parametrize("n_groups", [1, 3, 8, None])
def test_compiled_reflection_gives_the_numbers_of_the_torch_operations(monkeypatch, n_groups):
    from lowbit.fqt import quantizers
    z = torch.randn(32, 700, generator=torch.Generator().manual_seed(0))
    z *= torch.logspace(-3, 3, 32).unsqueeze(1)
    plan = fqt.bhq_plan(z, n_groups)
    fast = fqt.reflect(z, plan)
    monkeypatch.setattr(quantizers, "_reflect_compiled", None)
    assert torch.equal(fast, fqt.reflect(z, plan))
    # H is its own inverse: reflecting twice gives the rows back
    torch.testing.assert_close(fqt.reflect(fast, plan), z, rtol=1e-4, atol=1e-5 * float(z.abs().max()))


def test_random_words_are_splitmix64_on_every_path(monkeypatch):
    # the published SplitMix64 test vector: state 1234567
    words = quant._splitmix64_torch(torch.empty(5, dtype=torch.int64), torch.tensor(1234567))
    assert [int(w) % 2 ** 64 for w in words] == [
        6457827717110365317, 3203168211198807973, 9817491932198370423,
        4593380528125082431, 16408922859458223821]
    compiled = quant.random_words(100_003, torch.Generator().manual_seed(5))
    monkeypatch.setattr(quant, "_fill_loop", lambda: None)
    assert torch.equal(compiled, quant.random_words(100_003, torch.Generator().manual_seed(5)))
    # one 64-bit draw from the generator per call, whatever the size
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    quant.random_words(10 ** 6, g1)
    torch.empty(1, dtype=torch.int64).random_(-2 ** 63, None, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.skipif(fqt.compiled is None, reason="numba is not installed")
def test_parallel_and_serial_loops_are_two_compilations():
    """numba's disk cache tells functions apart by name and code, not by compile options:
    the parallel loop has a name of its own, else both dispatchers would load whichever
    compilation was saved first (and the parallel one would never run, or always)."""
    from lowbit.fqt import kernel
    assert kernel.compiled.targetoptions.get("parallel")
    assert not kernel.compiled_serial.targetoptions.get("parallel")
    assert kernel.compiled.py_func.__qualname__ != kernel.compiled_serial.py_func.__qualname__
    assert kernel.compiled.py_func.__code__ is kernel.compiled_serial.py_func.__code__


@pytest.mark.skipif(fqt.compiled is None, reason="numba is not installed")
def test_compiled_ranges_are_amin_and_amax_and_name_bad_values():
    """The compiled loop finds each row's and each column's range itself: the same numbers
    as amin/amax (exact zeros of both signs, as a ReLU's backward leaves them, included),
    and a NaN or ±inf anywhere, in any row or column, is refused with the torch path's
    message."""
    from lowbit.fqt import kernel
    x = torch.randn(32, 3000, generator=torch.Generator().manual_seed(0))
    x[x.abs() < 0.5] = 0.0
    x[::3][x[::3] == 0] = -0.0
    xn = x.numpy()
    for scope, dim, n in (("row", 1, 32), ("column", 0, 3000)):
        lo, hi = np.empty(n, np.float32), np.empty(n, np.float32)
        if scope == "row":
            kernel._row_ranges(xn.view(np.int32), lo, hi)
        else:
            kernel._column_ranges(xn, lo, hi)
        assert np.array_equal(lo, x.amin(dim).numpy()) and np.array_equal(hi, x.amax(dim).numpy())
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (17, 2999), (31, 1234)):
            g = x.clone()
            g[where] = bad
            for copies in (((4, "psq"), (8, "column")), ((8, "column"),), ((4, "psq"),)):
                with pytest.raises(ValueError, match="non-finite"):
                    fqt.quantize_copies_compiled(g, copies, torch.Generator().manual_seed(1),
                                                 fqt.Workspace(g))
    # a workspace keeps the loop's arguments after its first call: the next calls give the
    # same numbers as a fresh workspace, and a bad gradient is still named
    work = fqt.Workspace(x)
    for copies in (((4, "psq"), (8, "column")), ((8, "column"),)):
        for step in range(3):
            g = x * (step + 1)
            got = [q.clone() for q in fqt.quantize_copies_compiled(
                g, copies, torch.Generator().manual_seed(step), work)]
            want = fqt.quantize_copies_compiled(g, copies, torch.Generator().manual_seed(step),
                                                fqt.Workspace(g))
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        g[5, 7] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            fqt.quantize_copies_compiled(g, copies, None, work)


# ----------------------------------------------------------------------------- BHQ at scale
def test_householder_max_is_the_matrix_max_bit_for_bit():
    from lowbit.fqt import quantizers
    for n in list(range(1, 300)) + [1000, 4096]:
        assert quantizers.householder_max(n) == float(quantizers.householder(n, torch.float64).abs().max()), n


def test_bhq_over_32768_rows_with_one_dominant_row_stays_under_1_gb():
    # one group of 32,768 rows: its reflection matrix alone would take 8.6 GB in float64
    code = """
import resource, torch
from lowbit import fqt
g = torch.randn(32768, 64, generator=torch.Generator().manual_seed(0)).sign() * 1e-3
g[0] *= 1e6
assert fqt.bhq_groups(g) == 1
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = fqt.quantize_bhq(g, 8, generator=torch.Generator().manual_seed(1))
assert torch.isfinite(out).all()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 1024, f"BHQ added {run.stdout.split()[-1]} MB"


def test_one_thread_stays_one_thread_through_an_fqt_backward():
    # numba's threading layer must not raise torch's thread count (nor its own) behind a
    # LOWBIT_THREADS=1 run: checked in a fresh process, where the layer starts
    import os
    import subprocess
    import sys
    code = """
import torch, numba
from lowbit import book, fqt, models
book.setup(seed=0)
for quantizer in ("pt", "psq", "bhq"):
    m = fqt.wrap(models.build_model("mlp", (1, 8, 8)), quantizer, 4)
    m(torch.randn(256, 1, 8, 8)).sum().backward()
    print(quantizer, torch.get_num_threads(), numba.get_num_threads())
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "LOWBIT_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-9:] == ["pt", "1", "1", "psq", "1", "1", "bhq", "1", "1"], run.stdout
