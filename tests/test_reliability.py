"""The package never silently hands back something wrong: state survives a save/load round
trip, stale or broken caches are not returned, and odd input gets a clear error."""
import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from lowbit import cache, fqt, psgd, quant, slb, train
from lowbit.models import SmallCNN


def _round_trip(module: nn.Module) -> dict:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def _slb_conv():
    m = slb.SLBConv2d(2, 3, 3, bias=True, bits=2)
    m.temperature, m.state = 0.013, "continuous"
    return m


def _state_bn():
    m = slb.StateBatchNorm2d(2)
    m.train()
    m(torch.randn(4, 2, 3, 3))
    m.state = "continuous"
    return m


def _act_quant():
    m = quant.ActQuant(3)
    m(torch.rand(4, 5))
    m.eval()
    return m


def _fqt_linear():
    m = fqt.FQTLinear(4, 3)
    fqt.configure(m, mode="qat", quantizer="bhq", grad_bits=2)
    return m


# (make a layer with state that differs from a fresh one, make a fresh one, an input)
LAYERS = {
    "SLBConv2d": (_slb_conv, lambda: slb.SLBConv2d(2, 3, 3, bias=True, bits=2),
                  lambda: torch.randn(2, 2, 5, 5)),
    "SLBLinear": (lambda: _with(slb.SLBLinear(4, 3, bits=1), temperature=0.05, state="discrete"),
                  lambda: slb.SLBLinear(4, 3, bits=1), lambda: torch.randn(2, 4)),
    "StateBatchNorm2d": (_state_bn, lambda: slb.StateBatchNorm2d(2),
                         lambda: torch.randn(4, 2, 3, 3)),
    "StateBatchNorm1d": (lambda: _with(slb.StateBatchNorm1d(3), state="discrete"),
                         lambda: slb.StateBatchNorm1d(3), lambda: torch.randn(4, 3)),
    "ActQuant": (_act_quant, lambda: quant.ActQuant(8), lambda: torch.rand(4, 5)),
    "QuantConv2d": (lambda: quant.QuantConv2d(2, 3, 3, weight_bits=2, per_channel=True),
                    lambda: quant.QuantConv2d(2, 3, 3), lambda: torch.randn(2, 2, 5, 5)),
    "QuantLinear": (lambda: quant.QuantLinear(4, 3, weight_bits=3, grid="even"),
                    lambda: quant.QuantLinear(4, 3), lambda: torch.randn(2, 4)),
    "FQTLinear": (_fqt_linear, lambda: fqt.FQTLinear(4, 3), lambda: torch.randn(2, 4)),
    "FQTConv2d": (lambda: _with(fqt.FQTConv2d(2, 3, 3), mode="qat", grad_bits=4),
                  lambda: fqt.FQTConv2d(2, 3, 3), lambda: torch.randn(2, 2, 5, 5)),
}


def _with(m, **attrs):
    for k, v in attrs.items():
        setattr(m, k, v)
    if isinstance(m, nn.BatchNorm1d) or isinstance(m, slb.StateBatchNorm1d):
        m.train()
        m(torch.randn(6, m.num_features))
    return m


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_survives_a_state_dict_round_trip(name):
    make, fresh, data = LAYERS[name]
    torch.manual_seed(0)
    a = make()
    torch.manual_seed(1)
    b = fresh()
    b.load_state_dict(_round_trip(a))
    for m in (a, b):
        m.eval()
    x = data()
    if name.startswith("SLB") or name.startswith("State"):
        a.train(), b.train()  # the 'continuous'/'discrete' state decides, not the mode
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    extra = {k: v for k, v in vars(a).items() if not k.startswith("_") and k != "training"}
    assert {k: getattr(b, k) for k in extra} == extra


def test_psgd_survives_a_state_dict_round_trip():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)

    def opt_for(model):
        return psgd.PSGD(model.parameters(), lr=0.1, momentum=0.9, bits=3,
                         grid_range="running")

    a = opt_for(net)
    for _ in range(3):
        a.zero_grad()
        net(torch.randn(4, 5)).pow(2).sum().backward()
        a.step()
    net2 = nn.Linear(5, 3)
    net2.load_state_dict(net.state_dict())
    b = opt_for(net2)
    b.load_state_dict(_round_trip_opt(a))
    x = torch.randn(4, 5)
    for model, opt in ((net, a), (net2, b)):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    torch.testing.assert_close(net2.weight, net.weight, rtol=0, atol=0)
    assert "range_min" in b.state[net2.weight]


def _round_trip_opt(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def test_cached_slb_model_keeps_its_temperature(data_home):
    def build():
        torch.manual_seed(0)
        return slb.convert(SmallCNN(), bits=2)

    def run(model):
        slb.set_temperature(model, 0.013)
        return train.History()

    a, _ = cache.load_or_train({"name": "slb-tau"}, build, run)
    b, _ = cache.load_or_train({"name": "slb-tau"}, build, run)  # from the cache
    assert [m.temperature for _, m in slb.slb_layers(b)] == \
        [m.temperature for _, m in slb.slb_layers(a)] == [0.013] * len(slb.slb_layers(a))
    assert slb.model_gap(b) == slb.model_gap(a)


def test_psgd_checks_groups_before_adding_and_state_before_loading():
    w = nn.Parameter(torch.randn(3))
    opt = psgd.PSGD([w], lr=0.1)
    with pytest.raises(ValueError, match="lambda_s"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "lambda_s": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="unknown PSGD setting"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "lamda_s": 1.0})
    bad = opt.state_dict()
    bad["param_groups"][0]["bits"] = 40
    with pytest.raises(ValueError, match="bits"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["bits"] == 4
    sgd = torch.optim.SGD([w], lr=0.1).state_dict()
    with pytest.raises(ValueError, match="not a PSGD state dict"):
        opt.load_state_dict(sgd)
    with pytest.raises(ValueError, match="grid_range"):
        psgd.PSGD([w], grid_range="ema")


def test_psgd_refuses_sparse_gradients_clearly():
    emb = nn.Embedding(5, 3, sparse=True)
    opt = psgd.PSGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_running_grid_range_follows_the_official_average():
    w = nn.Parameter(torch.tensor([-1.0, 0.5, 2.0]))
    opt = psgd.PSGD([w], lr=0.0, bits=2, grid_range="running")
    for peak in (2.0, 4.0):
        with torch.no_grad():
            w[2] = peak
        w.grad = torch.ones(3)
        opt.step()
    state = opt.state[w]
    assert float(state["range_max"]) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert float(state["range_min"]) == pytest.approx(-1.0)


def test_last_bias_is_scaled_and_quantized_on_request():
    net = SmallCNN()
    groups = psgd.param_groups(net, 4, last_bias=True)
    scaled = [p for g in groups if g.get("scaled", True) for p in g["params"]]
    assert any(p is net.classifier.bias for p in scaled)
    assert not any(p is net.classifier.bias for g in psgd.param_groups(net, 4)
                   if g.get("scaled", True) for p in g["params"])
    q = quant.quantize_model(net, 4, last_bias_bits=4)
    assert q.classifier.bias.unique().numel() <= 15
    assert torch.equal(quant.quantize_model(net, 4).classifier.bias, net.classifier.bias)


def test_obscure_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="bits of a listed grid must be from 2 to 16, got 32"):
        quant.symmetric_grid(0.1, 32)
    assert torch.equal(quant.quantize_even(torch.zeros(5), 4), torch.zeros(5))
    for x in (torch.tensor([3e38, -3e38]),):
        for f in (lambda t: quant.quantize_asymmetric(t, 4),
                  lambda t: quant.quantize_symmetric(t, 4)):
            try:
                out = f(x)
            except ValueError as e:
                assert "overflows" in str(e)
            else:
                assert bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="meta tensor"):
        quant.quantize_symmetric(torch.empty(3, device="meta"), 4)
    with pytest.raises(ValueError, match="sparse"):
        quant.quantize_symmetric(torch.eye(3).to_sparse(), 4)


def test_quantize_model_returns_activation_quantizers_in_eval_mode():
    torch.manual_seed(0)
    net = SmallCNN()
    q = quant.quantize_model(net, 4, act_bits=4)
    acts = [m for m in q.modules() if isinstance(m, quant.ActQuant)]
    assert acts and not any(m.training for m in acts)
    before = [float(a.x_max) for a in acts]
    q(torch.randn(2, 1, 28, 28))
    assert [float(a.x_max) for a in acts] == before  # evaluation does not move the range


def test_recalibrate_bn_checks_before_wiping():
    torch.manual_seed(0)
    model = slb.convert(SmallCNN(), bits=2)
    bn = next(m for m in model.modules() if isinstance(m, slb.StateBatchNorm2d))
    bn.discrete_mean.fill_(0.7)
    for bad in ([], "data", 3):
        with pytest.raises(ValueError, match="batches"):
            slb.recalibrate_bn(model, bad)
    with pytest.raises(ValueError, match="state"):
        slb.recalibrate_bn(model, [torch.randn(2, 1, 28, 28)], state="both")
    with pytest.raises(ValueError, match="max_batches"):
        slb.recalibrate_bn(model, [torch.randn(2, 1, 28, 28)], max_batches=0)
    assert float(bn.discrete_mean[0]) == pytest.approx(0.7)


def test_import_leaves_denormals_alone():
    code = ("import torch, lowbit, lowbit.fqt, lowbit.slb, lowbit.psgd, lowbit.recipes, "
            "lowbit.plots; x = torch.tensor([1e-40]); assert float(x * 1.0) != 0.0")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_convert_functions_share_one_way_to_swap_layers():
    import inspect
    for f in (quant.prepare_qat, slb.convert, slb.export, fqt.convert):
        assert "replace_layers" in inspect.getsource(f), f.__name__
