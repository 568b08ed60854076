"""The loss-landscape wrapper computes what Li et al. (2018) define."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit import landscape, quant
from lowbit.models import SmallCNN


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = SmallCNN().eval()
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    return net, x, y


def test_directions_gaussian_filter_normalized_zero_for_bias_bn(setup):
    net, _, _ = setup
    d = landscape.filter_normalized_direction(net, torch.Generator().manual_seed(0))
    for p, di in zip(net.parameters(), d):
        assert di.shape == p.shape
        if p.dim() <= 1:
            assert torch.count_nonzero(di) == 0  # biases and BatchNorm are not perturbed
        else:
            torch.testing.assert_close(di.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))
    # Gaussian, not uniform: within one filter, ~68% of entries lie within one standard
    # deviation (uniform: 58%); 15,680 entries of the classifier give a standard error of 0.4%
    big = d[-2]  # classifier weight, 10 filters of 1,568
    z = (big - big.mean(1, keepdim=True)) / big.std(1, keepdim=True)
    assert abs((z.abs() < 1).float().mean().item() - 0.6827) < 0.02


def test_plane_center_grid_and_model_untouched(setup):
    net, x, y = setup
    before = [p.detach().clone() for p in net.parameters()]
    plane = landscape.loss_plane(net, x, y, extent=0.5, steps=5, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    np.testing.assert_allclose(plane.alphas, [-0.5, -0.25, 0, 0.25, 0.5])
    with torch.no_grad():
        assert math.isclose(plane.center, F.cross_entropy(net(x), y).item(), rel_tol=1e-6)


def test_every_grid_point_is_exact(setup):
    # no zig-zag: point (i, j) equals the loss of θ + α_i d1 + β_j d2 built from scratch
    net, x, y = setup
    g = torch.Generator().manual_seed(3)
    dirs = [landscape.filter_normalized_direction(net, g) for _ in range(2)]
    plane = landscape.loss_plane(net, x, y, extent=1.0, steps=3, directions=dirs)
    for i, a in enumerate(plane.alphas):
        for j, b in enumerate(plane.betas):
            m = SmallCNN().eval()
            m.load_state_dict(net.state_dict())
            with torch.no_grad():
                for p, d1, d2 in zip(m.parameters(), *dirs):
                    p.add_(a * d1 + b * d2)
                expected = F.cross_entropy(m(x), y).item()
            assert math.isclose(plane.loss[i, j], expected, rel_tol=1e-5), (i, j)


def test_quantized_plane_center_matches_quantize_model(setup):
    net, x, y = setup
    plane = landscape.loss_plane(net, x, y, extent=0.2, steps=3, bits=2, first_last_bits=8)
    q = quant.quantize_model(net, 2, first_last_bits=8)
    with torch.no_grad():
        assert math.isclose(plane.center, F.cross_entropy(q(x), y).item(), rel_tol=1e-5)


def test_sharpness_and_bad_input(setup):
    net, x, y = setup
    assert landscape.sharpness(net, x, y, radius=0.5, n_directions=2) > 0
    with pytest.raises(ValueError, match="odd number"):
        landscape.loss_plane(net, x, y, steps=4)
    with pytest.raises(ValueError, match="extent must be a positive"):
        landscape.loss_plane(net, x, y, extent=0)
    with pytest.raises(ValueError, match="bits must be from 2 to 32"):
        landscape.loss_plane(net, x, y, steps=3, bits=1)
