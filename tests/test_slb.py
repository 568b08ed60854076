"""SLB: value sets, expectation and argmax weights, schedules, state BN, export, bad input."""
import copy
import math

import pytest
import torch
from torch import nn

from lowbit import quant, slb
from lowbit.models import SmallCNN


@pytest.mark.parametrize("bits, expected", [
    (1, [-1.0, 1.0]),
    (2, [-1.0, -1 / 3, 1 / 3, 1.0]),
])
def test_value_sets_by_hand(bits, expected):
    torch.testing.assert_close(slb.value_set(bits), torch.tensor(expected))


@pytest.mark.parametrize("bits", range(1, 9))
def test_value_set_has_2b_even_values_in_unit_interval(bits):
    v = slb.value_set(bits)
    assert len(v) == 2 ** bits and v[0] == -1 and v[-1] == 1
    torch.testing.assert_close(v.diff(), torch.full((2 ** bits - 1,), 2 / (2 ** bits - 1)))


def test_expectation_is_sum_p_v_and_argmax_is_discrete():
    torch.manual_seed(0)
    layer = slb.SLBLinear(5, 3, bits=2, temperature=0.7)
    a = layer.logits.movedim(0, -1)  # one row of 4 logits per weight
    p = torch.softmax(a / 0.7, -1)
    v = slb.value_set(2)
    manual = layer.alpha * (p * v).sum(-1)
    torch.testing.assert_close(layer.expected_weight(), manual)
    torch.testing.assert_close(layer.discrete_weight(), layer.alpha * v[a.argmax(-1)])
    assert layer.expected_weight().shape == (3, 5)


def test_learned_scale_stays_positive():
    # the learned scale is exp(log_alpha): a step that would take α through zero cannot
    torch.manual_seed(0)
    layer = slb.SLBLinear(4, 2, bits=2)
    assert "log_alpha" in dict(layer.named_parameters()) and "alpha" not in layer.state_dict()
    torch.testing.assert_close(layer.alpha, torch.tensor(1 / (3 * 4) ** 0.5))
    opt = torch.optim.SGD(layer.parameters(), lr=10.0)
    layer(torch.ones(1, 4)).sum().backward()
    opt.step()
    assert layer.alpha.item() > 0
    fixed = slb.SLBLinear(4, 2, bits=2, alpha="fixed")
    assert "alpha" in fixed.state_dict() and not any("alpha" in n for n, _ in fixed.named_parameters())


def test_low_temperature_expectation_equals_argmax():
    torch.manual_seed(1)
    layer = slb.SLBConv2d(3, 4, 3, bits=3, temperature=1.0)
    gap_hot = slb.layer_gap(layer)
    layer.temperature = 1e-4
    torch.testing.assert_close(layer.expected_weight(), layer.discrete_weight())
    assert slb.layer_gap(layer) < 1e-6 < gap_hot


def test_auto_state_uses_expectation_in_training_and_argmax_in_eval():
    torch.manual_seed(2)
    layer = slb.SLBLinear(4, 2, bits=2)
    x = torch.randn(3, 4)
    out_train = layer.train()(x)
    torch.testing.assert_close(out_train, nn.functional.linear(x, layer.expected_weight(), layer.bias))
    out_eval = layer.eval()(x)
    torch.testing.assert_close(out_eval, nn.functional.linear(x, layer.discrete_weight(), layer.bias))
    with slb.use_state(layer, "continuous"):
        torch.testing.assert_close(layer(x), out_train)
    assert layer.state == "auto"


@pytest.mark.parametrize("kind", slb.TemperatureSchedule.KINDS)
def test_schedules_hit_start_and_end(kind):
    s = slb.TemperatureSchedule(kind, start=2.0, end=0.01, begin=0.2, finish=0.9, cycles=2)
    assert s(0.0) == pytest.approx(2.0) and s(0.2) == pytest.approx(2.0)
    assert s(0.9) == pytest.approx(0.01) and s(1.0) == pytest.approx(0.01)
    values = [s(p / 100) for p in range(101)]
    assert min(values) >= 0.01 - 1e-12 and max(values) <= 2.0 + 1e-12
    if kind != "restarts":
        assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))  # monotone cooling
    else:
        assert s(0.55) == pytest.approx(2.0)  # the second cycle starts hot again


def test_exp_schedule_is_geometric():
    s = slb.TemperatureSchedule("exp", start=1.0, end=0.01)
    assert s(0.5) == pytest.approx(0.1)


def test_annealer_sets_model_temperature():
    model = slb.convert(SmallCNN(), 2)
    a = slb.Annealer(model, slb.TemperatureSchedule("linear", 1.0, 0.5), total=4)
    assert all(m.temperature == 1.0 for _, m in slb.slb_layers(model))
    for _ in range(4):
        a.step()
    assert all(m.temperature == pytest.approx(0.5) for _, m in slb.slb_layers(model))
    a.step()  # past the end stays at the end
    assert a.temperature == pytest.approx(0.5)


def test_state_bn_keeps_two_sets_apart():
    bn = slb.StateBatchNorm2d(3, momentum=None)
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    with slb.use_state(bn, "continuous"):
        bn.train()(x)
    torch.testing.assert_close(bn.statistics("continuous")[0], x.mean((0, 2, 3)))
    torch.testing.assert_close(bn.statistics("discrete")[0], torch.zeros(3))
    y = torch.randn(8, 3, 4, 4) - 3
    with slb.use_state(bn, "discrete"):
        bn(y)
    torch.testing.assert_close(bn.statistics("discrete")[0], y.mean((0, 2, 3)))
    torch.testing.assert_close(bn.statistics("continuous")[0], x.mean((0, 2, 3)))
    # auto: evaluation mode normalizes with the discrete set
    out = bn.eval()(y)
    ref = nn.functional.batch_norm(y, *bn.statistics("discrete"), bn.weight, bn.bias, False)
    torch.testing.assert_close(out, ref)


def test_update_discrete_stats_touches_only_the_discrete_set():
    torch.manual_seed(3)
    model = slb.convert(SmallCNN(), 2)
    bn = next(m for m in model.modules() if isinstance(m, slb.StateBatchNorm2d))
    before_c = bn.statistics("continuous")[0].clone()
    before_d = bn.statistics("discrete")[0].clone()
    slb.update_discrete_stats(model, torch.randn(4, 1, 28, 28))
    assert torch.equal(bn.statistics("continuous")[0], before_c)
    assert not torch.equal(bn.statistics("discrete")[0], before_d)


def test_update_discrete_stats_puts_back_every_mode_and_state():
    """The discrete pass runs in training mode and the discrete state, then leaves each
    module as it found it: a module in evaluation mode inside a training model stays so."""
    torch.manual_seed(3)
    model = slb.convert(SmallCNN(), 2)
    model.features[0].state = "continuous"
    model.classifier.eval()
    modes = [(m.training, getattr(m, "state", None)) for m in model.modules()]
    seen = []
    model.features[1].register_forward_pre_hook(
        lambda m, _: seen.append((m.training, m.state, model.features[0].state)))
    slb.update_discrete_stats(model, torch.randn(4, 1, 28, 28))
    assert seen == [(True, "discrete", "discrete")]
    assert [(m.training, getattr(m, "state", None)) for m in model.modules()] == modes


class _TwiceBN(nn.Module):
    """A network that runs one state BN twice, with a stateless head after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = slb.SLBConv2d(1, 4, 3, padding=1, bits=2)
        self.bn = slb.StateBatchNorm2d(4)
        self.head = slb.SLBLinear(4, 3, bits=2)

    def forward(self, x):
        h = self.bn(self.conv(x))
        h = self.bn(torch.relu(h))  # the same BN, a second time
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("make", ["cnn", "cnn_act4", "twice"])
def test_discrete_pass_that_stops_early_keeps_every_statistic(make):
    """update_discrete_stats stops after the last module that keeps statistics; every
    buffer (state BNs, activation quantizers' running ranges, a BN run twice) ends bit for
    bit as after whole forward passes, over several batches and after the model changes."""
    torch.manual_seed(5)
    model = {"cnn": lambda: slb.convert(SmallCNN(), 2),
             "cnn_act4": lambda: slb.convert(SmallCNN(), 2, act_bits=4),
             "twice": _TwiceBN}[make]()
    if make == "cnn_act4":
        model(torch.randn(8, 1, 28, 28))  # the activation ranges start from a batch
    whole = copy.deepcopy(model)
    shape = (8, 1, 28, 28) if make != "twice" else (8, 1, 6, 6)
    for step in range(4):
        x = torch.randn(shape)
        slb.update_discrete_stats(model, x)
        with torch.no_grad(), slb.use_state(whole, "discrete"):
            whole(x)
        if step == 1 and make == "cnn":  # a new classifier: the count is made again
            for m in (model, whole):
                m.classifier = slb.SLBLinear(1568, 10, bits=2)
                m.classifier.load_state_dict(whole.classifier.state_dict())
                m.features.append(slb.StateBatchNorm2d(32))
            model.features[-1].load_state_dict(whole.features[-1].state_dict())
        for (name, a), (_, b) in zip(model.named_buffers(), whole.named_buffers()):
            assert torch.equal(a, b), (make, step, name)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_export_matches_slb_model_in_eval(bits):
    torch.manual_seed(4)
    model = slb.convert(SmallCNN(), bits, act_bits=4)
    x = torch.randn(16, 1, 28, 28)
    model.train()
    model(x)
    slb.update_discrete_stats(model, x)
    model.eval()
    exported = slb.export(model)
    assert not slb.slb_layers(exported)
    assert not any(isinstance(m, slb.StateBatchNorm2d) for m in exported.modules())
    torch.testing.assert_close(exported(x), model(x))
    for (_, e), (_, m) in zip(quant.quantizable_layers(exported), slb.slb_layers(model)):
        k = e.codes.long()
        levels = 2 ** bits - 1
        torch.testing.assert_close(e.weight, e.scale * (2 * k / levels - 1))
        assert e.weight_bits == bits and k.max() <= levels
    n_weights = sum(m.weight.numel() for _, m in quant.quantizable_layers(exported))
    n_all = sum(p.numel() for p in exported.parameters())
    assert quant.model_size_bits(exported) == bits * n_weights + 32 * (n_all - n_weights)


def test_recalibration_matches_full_batch_statistics():
    torch.manual_seed(5)
    model = slb.convert(SmallCNN(), 2, sbn=False)
    x = torch.randn(32, 1, 28, 28)
    slb.recalibrate_bn(model, [(x[:16],), (x[16:],)])
    bn = model.features[1]
    with torch.no_grad(), slb.use_state(model, "discrete"):
        h = model.features[0](x)
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1  # restored


def test_memory_grows_with_2_to_the_b():
    base = SmallCNN()
    w = sum(m.weight.numel() for _, m in quant.quantizable_layers(base))
    for bits in (1, 2, 4):
        model = slb.convert(base, bits)
        logits = sum(m.logits.numel() for _, m in slb.slb_layers(model))
        assert logits == 2 ** bits * w
    assert slb.parameter_memory(slb.convert(base, 4)) > 15 * slb.parameter_memory(base)


@pytest.mark.parametrize("bits", [0, 9, 2.5, "2", True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        slb.value_set(bits)
    with pytest.raises(ValueError, match="bits"):
        slb.SLBLinear(3, 2, bits=bits)


@pytest.mark.parametrize("tau", [0, -1.0, math.nan, math.inf, "1"])
def test_bad_temperature(tau):
    with pytest.raises(ValueError, match="temperature"):
        slb.SLBLinear(3, 2, temperature=tau)
    model = slb.convert(SmallCNN(), 2)
    with pytest.raises(ValueError, match="temperature"):
        slb.set_temperature(model, tau)
    with pytest.raises(ValueError, match="temperature"):
        slb.TemperatureSchedule("exp", start=tau)


def test_bad_schedules():
    with pytest.raises(ValueError, match="before it begins"):
        slb.TemperatureSchedule("exp", begin=0.8, finish=0.3)
    with pytest.raises(ValueError, match="cools"):
        slb.TemperatureSchedule("exp", start=0.1, end=1.0)
    with pytest.raises(ValueError, match="kind"):
        slb.TemperatureSchedule("step")
    with pytest.raises(ValueError, match="total"):
        slb.Annealer(slb.convert(SmallCNN(), 2), slb.TemperatureSchedule(), total=0)
    with pytest.raises(ValueError, match="no SLB layers"):
        slb.Annealer(SmallCNN(), slb.TemperatureSchedule(), total=3)


def test_bad_state_and_input_shape():
    with pytest.raises(ValueError, match="state"):
        with slb.use_state(SmallCNN(), "argmax"):
            pass
    with pytest.raises(ValueError, match="4-D input"):
        slb.StateBatchNorm2d(3)(torch.randn(2, 3))


def test_ste_baselines_at_one_bit_and_on_the_even_grid():
    w = torch.tensor([-1.0, -0.5, -0.1, 0.2, 0.9])
    torch.testing.assert_close(quant.binarize(w), torch.tensor([-0.54, -0.54, -0.54, 0.54, 0.54]))
    torch.testing.assert_close(quant.quantize_even(w, 2),
                               torch.tensor([-1.0, -1 / 3, -1 / 3, 1 / 3, 1.0]))
    q = quant.prepare_qat(SmallCNN(), 1)
    q(torch.randn(2, 1, 28, 28)).sum().backward()
    assert all(m.weight.grad is not None for _, m in quant.quantizable_layers(q))


# --------------------------------------------------------------------------- the gap, bounded
def _slb_model(bits=2, seed=0):
    torch.manual_seed(seed)
    m = slb.convert(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)), bits)
    with torch.no_grad():
        for _, layer in slb.slb_layers(m):
            layer.logits.mul_(3.0)
    return m


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_gap_bound_holds_and_gap_at_restores_the_temperature(bits):
    m = _slb_model(bits)
    slb.set_temperature(m, 0.7)
    for tau in (1.0, 0.3, 0.1, 0.03, 0.01):
        assert slb.gap_at(m, tau) <= slb.gap_bound(m, tau) + 1e-12
    assert all(layer.temperature == 0.7 for _, layer in slb.slb_layers(m))
    margins = slb.logit_margins(slb.slb_layers(m)[0][1])
    assert (margins >= 0).all() and margins.shape == slb.slb_layers(m)[0][1].weight_shape


def test_temperature_for_gap_and_the_gap_annealer():
    m = _slb_model(2)
    tau = slb.temperature_for_gap(m, 0.05)
    assert slb.gap_at(m, tau) <= 0.05 < slb.gap_at(m, tau * 1.1)
    with pytest.raises(ValueError, match="target"):
        slb.temperature_for_gap(m, 0.0)
    sched = slb.GapSchedule(0.3, 0.01, every=1)
    assert sched.target(0.0) == pytest.approx(0.3) and sched.target(1.0) == pytest.approx(0.01)
    ann = slb.GapAnnealer(m, sched, total=20)
    taus = [ann.step() for _ in range(20)]
    assert taus == sorted(taus, reverse=True)          # it only cools
    assert slb.model_gap(m) <= 0.01 * (1 + 1e-9)
    with pytest.raises(ValueError, match="must fall"):
        slb.GapSchedule(0.01, 0.3)
    with pytest.raises(ValueError, match="every"):
        slb.GapSchedule(every=0)


def test_value_set_with_zero():
    v = slb.value_set(2, "zero")
    assert v.tolist() == [-1.0, 0.0, 1.0]
    assert slb.value_set(3, "zero").numel() == 7 and 0.0 in slb.value_set(3, "zero").tolist()
    with pytest.raises(ValueError, match="value set"):
        slb.value_set(2, "log")
    with pytest.raises(ValueError, match="bits"):
        slb.value_set(1, "zero")
    torch.manual_seed(0)
    m = slb.convert(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), 2, values="zero")
    layer = slb.slb_layers(m)[0][1]
    assert layer.logits.shape[0] == 3
    k, scale = slb.codes(layer)
    torch.testing.assert_close(layer.discrete_weight(), scale * (2 * k.float() / 2 - 1))
    out = slb.export(m)
    assert out(torch.randn(2, 6)).shape == (2, 3)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_state_bn_without_autograd_is_batch_norm(momentum):
    """In training mode without autograd (SBN's discrete pass, a recalibration), a state
    BN normalizes with a compiled loop: the output and the running statistics are
    F.batch_norm's up to the rounding of its sums, over several batches; with autograd,
    F.batch_norm itself runs; a batch of one value per channel gets torch's error."""
    torch.manual_seed(6)
    bn = slb.StateBatchNorm2d(5, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    ref = nn.BatchNorm2d(5, momentum=momentum)
    ref.load_state_dict({"weight": bn.weight, "bias": bn.bias}, strict=False)
    bn.train(), ref.train()
    for _ in range(3):
        x = torch.randn(6, 5, 7, 9) * 3 + torch.randn(1, 5, 1, 1) * 4
        with torch.no_grad():
            out, expected = bn(x), ref(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.statistics("continuous")[0], ref.running_mean,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.statistics("continuous")[1], ref.running_var,
                                   rtol=1e-5, atol=1e-6)
    x = torch.randn(6, 5, 7, 9, requires_grad=True)
    mean, var = (t.clone() for t in bn.statistics("continuous"))
    assert torch.equal(bn(x), nn.functional.batch_norm(  # with autograd: F.batch_norm
        x, mean, var, bn.weight, bn.bias, True, momentum or 1 / 4, bn.eps))
    with torch.no_grad(), pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 5, 1, 1))


@pytest.mark.parametrize("alpha", ["learned", "fixed"])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_compiled_discrete_weight_is_the_argmax_value_bit_for_bit(alpha, bits):
    """Without autograd on a CPU the discrete weight comes from one compiled pass; it is
    alpha * values[logits.max(0).indices] to the bit, with tied logits (the first wins) and
    a NaN logit (it counts as the largest); with autograd alpha keeps its gradient."""
    torch.manual_seed(bits)
    layer = slb.SLBConv2d(3, 5, 3, bits=bits, alpha=alpha)
    with torch.no_grad():
        layer.logits.copy_((layer.logits * 2).round())  # many ties
        layer.logits[-1, 0, 0, 0, 0] = float("nan")
        if alpha == "learned":
            layer.log_alpha.fill_(-1.2345)
    want = (layer.alpha * layer.values[layer.logits.max(0).indices]).detach()
    with torch.no_grad():
        got = layer.discrete_weight()
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert got[0, 0, 0, 0] == layer.alpha.detach() * layer.values[-1]
    with_grad = layer.discrete_weight()
    assert torch.equal(with_grad.detach(), want)
    assert with_grad.requires_grad == (alpha == "learned")


@pytest.mark.parametrize("alpha", ["learned", "fixed"])
@pytest.mark.parametrize("bits, tau", [(1, 1.0), (2, 1.0), (2, 0.05), (3, 0.3)])
def test_expected_weight_gradient_in_closed_form_is_autograds(alpha, bits, tau):
    """On a CPU the expected weight is slb.ExpectedWeight: the forward is autograd's path
    bit for bit, and the closed-form gradients of the logits and of log(alpha) are the ones
    autograd takes through softmax, sum and product, up to float32 rounding (a cold 0.05
    included, where the softmax is nearly one-hot)."""
    torch.manual_seed(bits)
    layer = slb.SLBConv2d(4, 6, 3, bits=bits, temperature=tau, alpha=alpha)
    g = torch.randn(6, 4, 3, 3)
    w = layer.expected_weight()
    assert w.grad_fn is not None and type(w.grad_fn).__name__ == "ExpectedWeightBackward"
    (w * g).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    p = layer.probabilities()
    ref = layer.alpha * (layer.values @ p.reshape(len(layer.values), -1)).reshape(p.shape[1:])
    (ref * g).sum().backward()
    assert torch.equal(w.detach(), ref.detach())
    for got, (name, param) in zip(grads, layer.named_parameters()):
        # float32 rounding, relative to the gradient's scale (the softmax's small entries)
        torch.testing.assert_close(got, param.grad, rtol=1e-5,
                                   atol=1e-6 * float(param.grad.abs().max()), msg=name)


# ----------------------------------------------------------------------------- edge cases
# Each was once silently wrong (issue 30): now the right answer or an error naming the value.
@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf"), True])
def test_a_temperature_set_on_a_layer_is_checked(tau):
    layer = slb.SLBLinear(4, 3)
    with pytest.raises(ValueError, match=f"temperature must be a finite number > 0, got {tau!r}"):
        layer.temperature = tau
    assert layer.temperature == 1.0 and torch.isfinite(layer(torch.randn(2, 4))).all()


def test_groups_that_do_not_divide_the_channels_are_refused():
    with pytest.raises(ValueError, match=r"in_channels \(5\) and out_channels \(4\) must both be divisible by groups \(2\)"):
        slb.SLBConv2d(5, 4, 3, groups=2)
    conv = slb.SLBConv2d(4, 6, 3, groups=2, padding=1)   # a grouped conv as nn.Conv2d builds it
    assert conv.weight_shape == tuple(torch.nn.Conv2d(4, 6, 3, groups=2).weight.shape)
    assert conv(torch.randn(1, 4, 5, 5)).shape == (1, 6, 5, 5)


def test_nearest_init_needs_the_layers_weight_shape():
    with pytest.raises(ValueError, match=r"of shape \(3, 4\); got shape \(5, 5\)"):
        slb.SLBLinear(4, 3, init="nearest", weight=torch.randn(5, 5))


def test_assigning_alpha_to_a_learned_scale_sets_it():
    layer = slb.SLBLinear(4, 3)
    layer.alpha = 2.0
    assert float(layer.alpha.detach()) == pytest.approx(2.0) and layer.log_alpha.requires_grad
    with pytest.raises(ValueError, match="alpha must be one finite number > 0"):
        layer.alpha = -1.0
    assert float(layer.alpha.detach()) == pytest.approx(2.0)


def test_a_conv_that_does_not_pad_with_zeros_is_named():
    """SLB's conv layers pad with zeros: converting a conv with another padding mode is
    refused, naming the layer and its mode (it used to lose the mode silently)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"'0' pads with 'reflect'"):
        slb.convert(net, bits=2)
