"""The reviewers' baselines (lowbit.baselines): LSQ, ACIQ, AdaptivFloat, GMP and SNIP."""
import math

import pytest
import torch
from torch import nn

from lowbit import baselines as B, quant, slb
from lowbit.models import SmallCNN


# --------------------------------------------------------------------------- LSQ
def _paper_lsq(v, s, bits, signed=True):
    """LSQ as the paper's appendix writes it: grad-scale and round-pass by detach."""
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    g = 1.0 / math.sqrt(v.numel() * qp)
    s = (s - s * g).detach() + s * g
    x = torch.clamp(v / s, -qn, qp)
    return ((x.round() - x).detach() + x) * s


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (3, False)])
def test_lsq_matches_the_papers_code(bits, signed):
    g = torch.Generator().manual_seed(bits)
    v = torch.randn(40, 30, generator=g)
    v = v if signed else v.relu()
    grad = torch.randn(40, 30, generator=g)
    outs = []
    for f in (lambda v, s: B.lsq_quantize(v, s, bits, signed), lambda v, s: _paper_lsq(v, s, bits, signed)):
        v1 = v.clone().requires_grad_()
        s1 = torch.tensor([0.3], requires_grad=True)
        y = f(v1, s1)
        (y * grad).sum().backward()
        outs.append((y.detach(), v1.grad, s1.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True)])
def test_lsq_without_gradient_gives_the_autograd_paths_values_bit_for_bit(bits, signed):
    g = torch.Generator().manual_seed(bits)
    v = torch.randn(64, 8, 7, 7, generator=g) * 3
    v = v if signed else v.relu()
    s = torch.tensor([0.17], requires_grad=True)
    with_grad = B.lsq_quantize(v, s, bits, signed).detach()
    with torch.no_grad():
        assert torch.equal(B.lsq_quantize(v, s, bits, signed), with_grad)


def test_lsq_values_on_the_grid_and_range():
    s = torch.tensor([0.1])
    y = B.lsq_quantize(torch.linspace(-1, 1, 1001), s, 3)
    codes = (y / 0.1).round()
    torch.testing.assert_close(y, codes * 0.1)
    assert codes.min() == -4 and codes.max() == 3   # two's complement: Q_N = 4, Q_P = 3
    assert B.lsq_range(2, False) == (0, 3)


def test_lsq_model_trains_steps_and_saves_settings():
    torch.manual_seed(0)
    m = B.prepare_lsq(SmallCNN(widths=(4, 4, 4)), 3, act_bits=4, first_last_bits=8)
    layers = [x for x in m.modules() if isinstance(x, (B.LSQConv2d, B.LSQLinear))]
    assert [l.weight_bits for l in layers] == [8, 3, 3, 8]
    acts = [x for x in m.modules() if isinstance(x, B.LSQAct)]
    assert acts and all(torch.isnan(a.step).all() for a in acts)
    x = torch.randn(8, 1, 28, 28)
    out = m(x)
    out.sum().backward()
    assert all(l.step.grad is not None and l.step.grad.abs() > 0 for l in layers)
    assert all(torch.isfinite(a.step).all() and a.step.grad is not None for a in acts)
    w = layers[1]
    assert w.step.item() == pytest.approx(B.initial_step(w.weight, 3), rel=1e-6)
    state = m.state_dict()
    m2 = B.prepare_lsq(SmallCNN(widths=(4, 4, 4)), 3, act_bits=4, first_last_bits=8)
    m2.load_state_dict(state)
    m.eval(), m2.eval()
    torch.testing.assert_close(m(x), m2(x))


def test_lsq_bad_input():
    with pytest.raises(ValueError, match="weight_bits"):
        B.prepare_lsq(SmallCNN(widths=(4, 4, 4)), 1)
    with pytest.raises(ValueError, match="bits"):
        B.lsq_range(40, True)
    with pytest.raises(ValueError, match="init"):
        B.initial_step(torch.ones(3), 4, init="max")
    with pytest.raises(ValueError, match="non-finite"):
        B.initial_step(torch.tensor([1.0, float("nan")]), 4)
    act = B.LSQAct(4).eval()
    with pytest.raises(RuntimeError, match="no step yet"):
        act(torch.ones(2, 3))
    with pytest.raises(ValueError, match="extra state"):
        act.set_extra_state({"bit": 4})


# --------------------------------------------------------------------------- ACIQ
def test_aciq_reproduces_the_papers_table():
    assert [round(B.laplace_clip(b, "paper"), 2) for b in (2, 3, 4)] == [2.83, 3.9, 5.03]
    ours = [B.laplace_clip(b) for b in (2, 3, 4, 8)]
    assert ours == sorted(ours)   # more bits, wider clip


def test_aciq_clips_per_channel_and_corrects_bias():
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((16, 200)) * torch.linspace(0.1, 1, 16)[:, None] + 0.05
    q = B.aciq_quantize(w, 4, correct_bias=False)
    b = (w - w.mean(1, keepdim=True)).abs().mean(1)
    assert (q.abs().amax(1) <= B.laplace_clip(4) * b * (1 + 1e-5)).all()
    qb = B.aciq_quantize(w, 4)
    mu = w.mean(1, keepdim=True) - q.mean(1, keepdim=True)
    xi = (w - w.mean(1, keepdim=True)).norm(dim=1, keepdim=True) / (q - q.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
    torch.testing.assert_close(qb, xi * (q + mu))   # the paper's formula (Sec. 5)
    torch.testing.assert_close((qb - qb.mean(1, keepdim=True)).norm(dim=1),
                               (w - w.mean(1, keepdim=True)).norm(dim=1), rtol=1e-5, atol=1e-6)
    # clipping lowers the error of heavy-tailed weights at 2 bits
    err = lambda q: float((q - w).pow(2).mean())
    assert err(B.aciq_quantize(w, 2, correct_bias=False)) < err(quant.quantize_symmetric(w, 2, per_channel=True))


def test_aciq_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        B.aciq_quantize(torch.tensor([[1.0, float("inf")]]), 4)
    with pytest.raises(ValueError, match="bits"):
        B.aciq_quantize(torch.ones(2, 2), 0)
    with pytest.raises(ValueError, match="grid"):
        B.laplace_clip(4, "log")
    assert (B.aciq_quantize(torch.zeros(3, 4), 4) == 0).all()


# --------------------------------------------------------------------------- AdaptivFloat
def test_adaptivfloat_values_and_rounding():
    v = B.adaptivfloat_values(1.0, 4, 2)   # 1 sign, 2 exponent, 1 mantissa bit
    assert v.tolist() == [0.0, 0.1875, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5]
    assert len(B.adaptivfloat_values(3.0, 6, 3)) == 2 ** 5
    w = torch.tensor([0.0, 0.05, 0.2, -0.3, 0.6, 1.0, -2.0])
    q = B.quantize_adaptivfloat(w, 4, 2)   # max|w| = 2: e_max = 1, values 2x those above
    assert q.tolist() == [0.0, 0.0, 0.375, -0.375, 0.5, 1.0, -2.0]
    grid = set((B.adaptivfloat_values(2.0, 4, 2)).tolist())
    wr = torch.randn(500)
    assert set(B.quantize_adaptivfloat(wr, 4).abs().tolist()) <= set(
        B.adaptivfloat_values(float(wr.abs().max()), 4, 1).tolist()) | set(
        B.adaptivfloat_values(float(wr.abs().max()), 4, 2).tolist()) | set(
        B.adaptivfloat_values(float(wr.abs().max()), 4, 3).tolist())
    assert grid


def test_adaptivfloat_picks_the_least_error():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    best = B.quantize_adaptivfloat(w, 4)
    errs = [float((B.quantize_adaptivfloat(w, 4, e) - w).pow(2).sum()) for e in (1, 2, 3)]
    assert float((best - w).pow(2).sum()) == pytest.approx(min(errs))


def test_adaptivfloat_bad_input():
    with pytest.raises(ValueError, match="exp_bits"):
        B.quantize_adaptivfloat(torch.ones(3), 4, 4)
    with pytest.raises(ValueError, match="non-finite"):
        B.quantize_adaptivfloat(torch.tensor([float("nan")]), 4)
    assert (B.quantize_adaptivfloat(torch.zeros(5), 4) == 0).all()


def test_quantize_model_takes_a_weight_quantizer():
    torch.manual_seed(0)
    m = SmallCNN(widths=(4, 4, 4)).eval()
    q = quant.quantize_model(m, 4, weight_quantizer=B.quantize_adaptivfloat)
    for (_, a), (_, b) in zip(quant.quantizable_layers(m), quant.quantizable_layers(q)):
        torch.testing.assert_close(b.weight, B.quantize_adaptivfloat(a.weight, 4))
    with pytest.raises(ValueError, match="weight's shape"):
        quant.quantize_model(m, 4, weight_quantizer=lambda w, b: w.flatten())


# --------------------------------------------------------------------------- pruning
def test_cubic_schedule():
    assert B.cubic_sparsity(0, 0.9, 100) == 0.0
    assert B.cubic_sparsity(100, 0.9, 100) == pytest.approx(0.9)
    assert B.cubic_sparsity(500, 0.9, 100) == pytest.approx(0.9)
    assert B.cubic_sparsity(50, 0.9, 100) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    with pytest.raises(ValueError, match="final"):
        B.cubic_sparsity(1, 1.0, 10)
    with pytest.raises(ValueError, match="end after"):
        B.cubic_sparsity(1, 0.5, 10, begin=10)


def test_gradual_pruner_reaches_and_keeps_its_sparsity():
    torch.manual_seed(0)
    m = SmallCNN(widths=(4, 4, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    pruner = B.GradualPruner(m, 0.8, total_steps=40, every=5)
    for step in range(1, 41):
        opt.zero_grad()
        nn.functional.cross_entropy(m(torch.randn(4, 1, 28, 28)), torch.randint(0, 10, (4,))).backward()
        opt.step()
        pruner.step(step)
    for _, layer in quant.quantizable_layers(m):
        frac = float((layer.weight == 0).float().mean())
        assert frac == pytest.approx(0.8, abs=1.0 / layer.weight.numel() + 1e-6)


def test_snip_masks_rank_globally_and_leave_the_model():
    torch.manual_seed(0)
    m = SmallCNN(widths=(4, 4, 4))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    masks = B.snip_masks(m, x, y, 0.9)
    kept = sum(int(k.sum()) for k in masks.values())
    total = sum(k.numel() for k in masks.values())
    assert abs(kept - 0.1 * total) <= 1
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items() if "running" not in k and "num_batches" not in k)
    assert all(p.grad is None for p in m.parameters())
    B.apply_masks(m, masks)
    assert sum(int((l.weight == 0).sum()) for _, l in quant.quantizable_layers(m)) >= total - kept


def test_pruning_bad_input():
    m = SmallCNN(widths=(4, 4, 4))
    with pytest.raises(ValueError, match="sparsity"):
        B.layer_masks(m, 1.5)
    with pytest.raises(ValueError, match="no conv/linear layer"):
        B.apply_masks(m, {"nope": torch.ones(1, dtype=torch.bool)})
    name, layer = quant.quantizable_layers(m)[0]
    with pytest.raises(ValueError, match="shape"):
        B.apply_masks(m, {name: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="end_fraction"):
        B.GradualPruner(m, 0.5, 10, end_fraction=0.0)


# --------------------------------------------------------------------------- SLB tracker
def test_argmax_tracker_counts_flips_and_switches():
    torch.manual_seed(0)
    m = slb.convert(SmallCNN(widths=(4, 4, 4)), 2)
    t = slb.ArgmaxTracker(m, every=1, threshold=0.999)
    t(1)
    assert t.log["flips"] == [0.0]
    layer = slb.slb_layers(m)[0][1]
    with torch.no_grad():
        layer.logits.zero_()
        layer.logits[0] = 10.0   # every weight of this layer commits to value 0
    t(2)
    assert t.log["flips"][-1] > 0 and t.log["switched"][-1] == 0.0
    with torch.no_grad():
        layer.logits[0] = 0.0
        layer.logits[1] = 10.0   # and switches to value 1
    t(3)
    assert t.log["switched"][-1] > 0
    with pytest.raises(ValueError, match="SLB layers"):
        slb.ArgmaxTracker(SmallCNN(widths=(4, 4, 4)))
    with pytest.raises(ValueError, match="every"):
        slb.ArgmaxTracker(m, every=0)


# --------------------------------------------------------------------------- Bop, quantization loss
def test_bop_flips_only_where_the_average_agrees_with_the_sign():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    opt = B.Bop([w], gamma=1.0, threshold=0.5)
    w.grad = torch.tensor([1.0, 1.0, 0.1, -2.0])   # pushes: down, up, weak, down
    opt.step()
    assert w.tolist() == [-1.0, -1.0, 1.0, 1.0] and opt.flips == 2
    w.grad = torch.zeros(4)
    opt.step()
    assert opt.flips == 0


def test_bop_bad_input_and_binary_weights():
    torch.manual_seed(0)
    m = SmallCNN(widths=(4, 4))
    ws = B.binary_weights(m)
    assert all(w.abs().unique().numel() == 1 for w in ws)
    with pytest.raises(ValueError, match="gamma"):
        B.Bop(ws, gamma=0.0)
    with pytest.raises(ValueError, match="threshold"):
        B.Bop(ws, threshold=-1.0)
    z = torch.nn.Parameter(torch.zeros(3))
    z.grad = torch.ones(3)
    with pytest.raises(ValueError, match="not zero"):
        B.Bop([z]).step()
    assert B.quantization_loss(m).item() == pytest.approx(0.0, abs=1e-10)
    from lowbit import recipes
    with pytest.raises(ValueError, match="quant_loss"):
        recipes.train_qat(recipes.Recipe(model="cnn8"), 2, quant_loss=0.1)


def test_new_optimizers_refuse_non_finite_gradients_and_snip_non_finite_input():
    from lowbit.fqt import GridSGD
    for opt, w in ((lambda w: B.Bop([w]), torch.nn.Parameter(torch.tensor([1.0, -1.0]))),
                   (lambda w: GridSGD([w], lr=0.1, bits=4), torch.nn.Parameter(torch.tensor([0.5, -1.0])))):
        o = opt(w)
        before = w.detach().clone()
        w.grad = torch.tensor([float("nan"), 1.0])
        with pytest.raises(ValueError, match="non-finite gradient.*no parameter was updated"):
            o.step()
        torch.testing.assert_close(w.detach(), before)
    with pytest.raises(ValueError, match="non-finite"):
        B.snip_masks(nn.Linear(2, 2), torch.tensor([[1.0, float("nan")]]), torch.tensor([0]), 0.5)
