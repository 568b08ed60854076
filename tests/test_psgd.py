"""PSGD: the step equals the formula, grid points are fixed points, bad input is refused."""
import math

import pytest
import torch
from torch import nn

from lowbit import psgd
from lowbit.models import SmallCNN


def _param(values, grad):
    p = nn.Parameter(torch.tensor(values))
    p.grad = torch.tensor(grad)
    return p


def test_plain_step_matches_hand_computation():
    # 3 bits: max|w| = 1.2, Δ = 0.4, Q(w) = (-0.8, -0.4, 0, 0.4, 1.2)
    w = [-0.9, -0.3, 0.05, 0.4, 1.2]
    g = [1.0, -2.0, 0.5, 3.0, 1.0]
    p = _param(w, g)
    psgd.PSGD([p], lr=0.1, bits=3, lambda_s=10.0, eps=0.01).step()
    dist = [0.1, 0.1, 0.05, 0.0, 0.0]
    expected = [wi - 0.1 * (10.0 * di + 0.01) * gi for wi, di, gi in zip(w, dist, g)]
    torch.testing.assert_close(p.detach(), torch.tensor(expected))


def test_normalized_scale_in_unit_interval_and_step():
    w = [-0.9, -0.3, 0.05, 0.4, 1.2]
    g = [1.0, 1.0, 1.0, 1.0, 1.0]
    p = _param(w, g)
    psgd.PSGD([p], lr=0.1, bits=3, eps=0.01, normalized=True).step()
    dist = torch.tensor([0.1, 0.1, 0.05, 0.0, 0.0])
    s = (dist + 0.01) / (dist.max() + 0.01)
    assert (s > 0).all() and (s <= 1).all()
    torch.testing.assert_close(p.detach(), torch.tensor(w) - 0.1 * s)


def test_momentum_and_weight_decay_follow_sgd_after_scaling():
    w0, g = [0.3, -0.45], [1.0, -1.0]
    p = _param(w0, g)
    opt = psgd.PSGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, bits=2, lambda_s=2.0)
    # 2 bits: Δ = 0.45, Q = (0.45, -0.45): distances (0.15, 0)
    s = torch.tensor([2.0 * 0.15, 0.0])
    d1 = s * torch.tensor(g) + 0.01 * torch.tensor(w0)
    opt.step()
    w1 = torch.tensor(w0) - 0.1 * d1
    torch.testing.assert_close(p.detach(), w1)
    p.grad = torch.tensor(g)
    opt.step()  # grid recomputed from w1; buffer = 0.9 * d1 + d2
    delta = w1.abs().max() / 1
    q = torch.round(w1 / delta) * delta
    d2 = 2.0 * (w1 - q).abs() * torch.tensor(g) + 0.01 * w1
    torch.testing.assert_close(p.detach(), w1 - 0.1 * (0.9 * d1 + d2))


def test_weights_on_the_grid_do_not_move():
    w = torch.tensor([-0.8, -0.4, 0.0, 0.4, 1.2])
    p = _param(w.tolist(), [5.0, -3.0, 2.0, 1.0, -7.0])
    opt = psgd.PSGD([p], lr=0.5, momentum=0.9, bits=3, lambda_s=150.0)
    for _ in range(3):
        opt.step()
    torch.testing.assert_close(p.detach(), w)


def test_fixed_grid_step():
    p = _param([0.3, 0.6], [1.0, 1.0])
    psgd.PSGD([p], lr=0.1, bits=4, lambda_s=1.0, delta=0.5).step()
    # grid {…, 0, 0.5, 1, …}: distances 0.2 and 0.1
    torch.testing.assert_close(p.detach(), torch.tensor([0.3 - 0.02, 0.6 - 0.01]))
    with pytest.raises(ValueError, match="delta must be > 0"):
        psgd.PSGD([p], delta=0.0)


def test_pruning_target_is_zero():
    p = _param([0.5, -0.25, 0.0], [1.0, 1.0, 1.0])
    psgd.PSGD([p], lr=0.1, bits=None, lambda_s=1.0).step()
    # s(w) = |w|: zero stays, others move in proportion to their magnitude
    torch.testing.assert_close(p.detach(), torch.tensor([0.5 - 0.05, -0.25 - 0.025, 0.0]))


@pytest.mark.parametrize("sgd", [dict(momentum=0.9, weight_decay=5e-4),
                                 dict(momentum=0.9, dampening=0.3, weight_decay=0.1),
                                 dict(momentum=0.5, nesterov=True), dict(weight_decay=1e-2)])
def test_unscaled_group_is_plain_sgd(sgd):
    """An unscaled group is torch.optim.SGD bit for bit, over several steps."""
    torch.manual_seed(0)
    a, b = nn.Linear(40, 3), nn.Linear(40, 3)
    b.load_state_dict(a.state_dict())
    ours = psgd.PSGD(a.parameters(), lr=0.1, scaled=False, **sgd)
    theirs = torch.optim.SGD(b.parameters(), lr=0.1, **sgd)
    for _ in range(4):
        x = torch.randn(8, 40)
        for m, o in ((a, ours), (b, theirs)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("lam,eps", [(10.0, 0.01), (150.0, 1e-4), (1.0, 0.5)])
def test_warping_identity(lam, eps):
    # PSGD on w is gradient descent on v = f(w) when s(w) = 1 / f'(w)^2
    # off the grid points (at w = w* autograd sees sign(0) = 0; the limit there is 1/√ε)
    w = torch.linspace(-0.995, 0.995, 400, dtype=torch.float64, requires_grad=True)
    target = torch.round(w.detach() * 3) / 3
    assert (w.detach() != target).all()
    f = psgd.warp(w, target, lam, eps)
    (fprime,) = torch.autograd.grad(f.sum(), w)
    s = psgd.position_scale(w.detach(), target, lam, eps)
    torch.testing.assert_close(fprime ** 2 * s, torch.ones_like(s))
    assert torch.equal(psgd.warp(target, target, lam, eps), target)  # targets are fixed


def test_param_groups_split():
    net = SmallCNN()
    groups = psgd.param_groups(net, bits=2, first_last_bits=8)
    assert [g.get("bits") for g in groups] == [2, 8, None]
    assert groups[0]["params"][0] is net.features[4].weight
    assert groups[1]["params"] == [net.features[0].weight, net.classifier.weight]
    assert groups[2]["scaled"] is False and len(groups[2]["params"]) == 5
    no_ends = psgd.param_groups(net, bits=2, scale_first_last=False)
    assert no_ends[1]["scaled"] is False


@pytest.mark.parametrize("kw,match", [
    (dict(bits=1), "bits must be from 2 to 16, got 1"),
    (dict(bits=17), "bits must be from 2 to 16, got 17"),
    (dict(bits=2.5), "bits must be a whole number"),
    (dict(lambda_s=-1.0), "lambda_s must be a finite number ≥ 0, got -1.0"),
    (dict(eps=-0.1), "eps must be a finite number ≥ 0"),
    (dict(eps=float("nan")), "eps must be a finite number ≥ 0"),
    (dict(lr=-0.1), "lr must be"),
    (dict(normalized=True, eps=0.0), "normalized scale needs eps > 0"),
    (dict(nesterov=True), "nesterov momentum needs momentum > 0"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        psgd.PSGD([nn.Parameter(torch.ones(3))], **kw)


def test_non_finite_gradient_leaves_everything_untouched():
    a = _param([0.3, 0.6], [1.0, 1.0])
    b = _param([0.1, 0.2], [1.0, float("nan")])
    opt = psgd.PSGD([a, b], lr=0.1, momentum=0.9, bits=4)
    with pytest.raises(ValueError, match=r"non-finite gradient in 1 parameter.*\(2,\).*no parameter"):
        opt.step()
    assert torch.equal(a.detach(), torch.tensor([0.3, 0.6]))
    assert torch.equal(b.detach(), torch.tensor([0.1, 0.2]))
    assert len(opt.state) == 0


def test_sparsity_and_mse_helpers():
    net = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0, 1.0, 0.0, -1.0]] * 4))
    assert psgd.sparsity(net) == 0.5
    assert psgd.weight_quantization_mse(net, 2) == 0.0
    assert math.isclose(psgd.sparsity(net, threshold=1.0), 1.0)


@pytest.mark.parametrize("eps", [1e-3, 0.0])
@pytest.mark.parametrize("bits", [4, 2, None])
def test_multi_tensor_step_is_the_per_parameter_formula(bits, eps):
    """PSGD's many-parameter path (plain scale, current range, or aimed at 0: multi-tensor
    ops) computes, bit for bit, w ← w − lr·(momentum buffer of s(w)·g + wd·w), s from
    position_scale/position_target."""
    torch.manual_seed(0)
    ws = [torch.randn(8, 3, 3, 3), torch.randn(10, 20), torch.zeros(5)]
    gs = [torch.randn_like(w) for w in ws]
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt = psgd.PSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, bits=bits, lambda_s=24.0,
                    eps=eps)
    opt.step()
    for w, g, p in zip(ws, gs, params):
        s = psgd.position_scale(w, psgd.position_target(w, bits), 24.0, eps)
        d = (g * s).add(w, alpha=1e-3)  # the first step: the momentum buffer is d itself
        assert torch.equal(p.detach(), w.add(d, alpha=-0.1))


def test_groups_updated_together_as_each_alone():
    """Groups that share settings are computed in one multi-tensor call: the same bits as
    one optimizer per group, over several steps (momentum), for the book's CNN groups plus
    groups that differ (another lr, running range, normalized, unscaled)."""
    from lowbit.models import SmallCNN
    torch.manual_seed(0)
    a, b = SmallCNN(), SmallCNN()
    b.load_state_dict(a.state_dict())

    def groups(net):
        gs = psgd.param_groups(net, bits=4)
        gs[0] = {**gs[0], "lr": 0.05}
        gs.append({"params": [gs[2]["params"].pop()], "grid_range": "running"})
        gs.append({"params": [gs[2]["params"].pop()], "normalized": True, "eps": 1e-3})
        return gs

    together = psgd.PSGD(groups(a), lr=0.01, momentum=0.9, weight_decay=5e-4)
    alone = [psgd.PSGD([g], lr=0.01, momentum=0.9, weight_decay=5e-4) for g in groups(b)]
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        for net, opts in ((a, [together]), (b, alone)):
            for o in opts:
                o.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            for o in opts:
                o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gradient_check_finds_every_non_finite_value(bad, dtype):
    """The fused check (lowbit.optim.all_finite) sees NaN, +inf and -inf in any tensor and
    dtype, an empty tensor among them included, and leaves the gradients' bits as they were."""
    from lowbit.optim import all_finite, max_abs
    ts = [torch.randn(5, dtype=dtype), torch.empty(0, dtype=dtype), torch.randn(3, 4).double()]
    before = [t.clone() for t in ts]
    assert all_finite(ts) and all(torch.equal(a, b) for a, b in zip(ts, before))
    assert max_abs(ts).tolist() == [float(ts[0].abs().max()), 0.0, float(ts[2].abs().max())]
    ts[0][3] = bad
    assert not all_finite(ts)
    assert not math.isfinite(max_abs(ts)[0].item())
    assert all_finite([]) and all_finite([torch.empty(0)])


def test_non_finite_weights_are_named_and_nothing_moves():
    a = _param([0.3, float("inf")], [1.0, 1.0])
    opt = psgd.PSGD([a], lr=0.1, bits=4)
    with pytest.raises(ValueError, match=r"non-finite weights .*\(2,\).*no parameter"):
        opt.step()
    assert len(opt.state) == 0


def test_step_follows_a_parameter_whose_memory_changes():
    """A parameter given new memory (``p.data = ...``, as a loaded copy or a cast does) is
    read anew, and a non-contiguous weight steps as a contiguous one: both steps are the
    formula's."""
    w0, w1 = torch.tensor([0.3, -0.2, 0.9]), torch.tensor([0.5, 0.1, -0.45])
    p = nn.Parameter(w0.clone())
    opt = psgd.PSGD([p], lr=0.1, bits=3, lambda_s=10.0)
    for w in (w0, w1):
        p.data = w.clone()
        p.grad = torch.ones(3)
        opt.step()
        assert torch.equal(p.detach(), w.add(psgd.position_scale(
            w, psgd.position_target(w, 3), 10.0), alpha=-0.1))
    t = nn.Parameter(torch.randn(4, 6).t())  # not contiguous
    t.grad = torch.ones(6, 4)
    before = t.detach().clone()
    psgd.PSGD([t], lr=0.1, bits=3, lambda_s=10.0).step()
    assert torch.equal(t.detach(), before.add(psgd.position_scale(
        before, psgd.position_target(before, 3), 10.0), alpha=-0.1))


@pytest.mark.parametrize("scaled_group", [dict(), dict(normalized=True, eps=1e-3)],
                         ids=["plain scale", "normalized scale"])
def test_a_non_finite_weight_in_an_unscaled_group_is_refused_before_any_update(scaled_group):
    a = nn.Parameter(torch.tensor([1.0, float("nan")]))
    b = nn.Parameter(torch.tensor([0.5, 0.2]))
    opt = psgd.PSGD([{"params": [a], "scaled": False}, {"params": [b], **scaled_group}],
                    lr=0.1, momentum=0.9, bits=4)
    a.grad, b.grad = torch.tensor([0.1, 0.1]), torch.tensor([0.1, 0.1])
    with pytest.raises(ValueError, match=r"non-finite weights in parameter\(s\) with shapes \[\(2,\)\]; no parameter was updated"):
        opt.step()
    assert torch.equal(b.detach(), torch.tensor([0.5, 0.2])) and not opt.state[a] and not opt.state[b]


@pytest.mark.parametrize("scaled_group", [dict(), dict(normalized=True, eps=1e-3)],
                         ids=["plain scale", "normalized scale"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_step_that_would_overflow_is_refused_before_any_update(scaled_group, momentum):
    c = nn.Parameter(torch.tensor([3e38, 1.0]))
    opt = psgd.PSGD([{"params": [c], **scaled_group}], lr=10.0, momentum=momentum, bits=None)
    c.grad = torch.tensor([-3e38, 0.1])
    with pytest.raises(FloatingPointError, match=r"would make non-finite weights .*no parameter was updated"):
        opt.step()
    assert torch.equal(c.detach(), torch.tensor([3e38, 1.0])) and not opt.state[c]
