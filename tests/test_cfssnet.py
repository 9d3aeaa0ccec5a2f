"""Modules and models of the Contour Flow family: ContourFlowLoss, CFSSBlock, UNet, CFSSNet, and
the noisy-shape experiment on a tiny instance."""
import pytest
import torch
from torch.nn import functional as F

import geokernels
from geokernels.models import CFSSNet, UNet
from geokernels.models.cfssnet import _flow_field_scipy, ground_truth_flow
from geokernels.nn import CFSSBlock, ContourFlowLoss


@pytest.mark.parametrize("depth,norm,upsample", [(0, "none", "bilinear"), (2, "batch", "bilinear"),
                                                 (3, "group", "transpose"), (1, "instance", "bilinear")])
@pytest.mark.parametrize("size", [(16, 16), (23, 17)])
def test_unet_shapes(depth, norm, upsample, size):
    net = UNet(in_channels=2, out_channels=3, depth=depth, width=4, norm=norm, upsample=upsample)
    x = torch.randn(2, 2, *size)
    y = net(x)
    assert y.shape == (2, 3, *size)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("kwargs,match", [(dict(depth=-1), "depth"), (dict(norm="layer"), "norm"),
                                          (dict(width=0), "width"), (dict(upsample="pixel"), "upsample")])
def test_unet_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_unet_bad_input():
    with pytest.raises(ValueError, match="x must have shape"):
        UNet(in_channels=3, depth=1, width=4)(torch.randn(1, 1, 8, 8))


def test_contour_flow_loss_module():
    x = torch.randn(2, 2, 9, 11, dtype=torch.float64)
    f = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    mod = ContourFlowLoss(reduction="sum")
    torch.testing.assert_close(mod(x, f), geokernels.contour_flow_loss(x, f, reduction="sum"))


def test_cfss_block_matches_functional_and_learns_positive_scalars():
    o = torch.randn(2, 1, 12, 13, dtype=torch.float64)
    T = F.normalize(torch.randn(2, 2, 12, 13, dtype=torch.float64), dim=1)
    block = CFSSBlock(iters=4, eps=0.7, tau=0.4, lam=1.3, sigma=2.0, learnable=("eps", "sigma"))
    assert {n for n, _ in block.named_parameters()} == {"raw_eps", "raw_sigma"}
    torch.testing.assert_close(float(block.value("eps").detach()), 0.7)
    z = block(o, T)
    ref = geokernels.cfss_iterate(o, T, iters=4, eps=0.7, tau=0.4, lam=1.3, sigma=2.0)
    torch.testing.assert_close(z, ref)
    z.square().mean().backward()
    assert block.raw_eps.grad is not None and block.raw_sigma.grad is not None
    with torch.no_grad():  # whatever the optimiser does, the scalars stay positive
        block.raw_eps.fill_(-50.0)
    assert float(block.value("eps").detach()) > 0
    with pytest.raises(ValueError, match="learnable"):
        CFSSBlock(learnable=("gamma",))


def _disk_batch(B=2, H=24, W=24):
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    masks = []
    for b in range(B):
        r = 5 + 2 * b
        masks.append(((yy - H / 2) ** 2 + (xx - W / 2) ** 2 <= r * r).float())
    mask = torch.stack(masks)[:, None]
    image = mask + 0.3 * torch.randn_like(mask)
    return image, mask


def test_ground_truth_flow_is_a_unit_tangent():
    _, mask = _disk_batch()
    flow = _flow_field_scipy(mask)
    assert flow.shape == (2, 2, 24, 24)
    norm = flow.norm(dim=1)
    assert torch.all(((norm - 1).abs() < 1e-5) | (norm == 0))
    # on a disk the tangent is nearly orthogonal to the radius (forward differences of a pixel
    # EDT are coarse: mean |cos| ~ 0.27 on these small disks, against ~0.64 for random directions)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    radial = torch.stack((yy - 12, xx - 12))
    dot = (flow[0] * radial).sum(0) / radial.norm(dim=0).clamp_min(1)
    ring = (radial.norm(dim=0) > 3) & (radial.norm(dim=0) < 9) & (norm[0] > 0)
    assert dot[ring].abs().mean() < 0.35
    # the scipy fallback is SPEC 2.2 as the library's contour_flow_field computes it, also on
    # planes without a contour (all 0 / all 1: zero flow in both)
    torch.testing.assert_close(ground_truth_flow(mask), flow.float(), rtol=1e-6, atol=1e-6)
    flat = torch.cat([torch.zeros(1, 1, 6, 7), torch.ones(1, 1, 6, 7)])
    assert not _flow_field_scipy(flat).any() and not ground_truth_flow(flat).any()


def test_cfssnet_defaults_are_the_spec_ones():
    """SPEC 2.5 runs cfss_iterate with its SPEC 2.4 defaults (50 iterations; was 20 here)."""
    import inspect

    from geokernels.ops import cfss_iterate

    spec = inspect.signature(cfss_iterate).parameters
    net = inspect.signature(CFSSNet).parameters
    for name in ("iters", "eps", "tau", "lam", "sigma", "halfsize", "q_nonneg"):
        assert net[name].default == spec[name].default, name
    assert net["alpha"].default == 0.1


def test_cfssnet_forward_and_loss():
    torch.manual_seed(0)
    image, mask = _disk_batch()
    net = CFSSNet(backbone=UNet(1, 3, depth=2, width=4), iters=5, sigma=2.0, learnable=("lam",),
                  shape_weight=0.5)
    out = net(image)
    assert out["logits"].shape == (2, 1, 24, 24) and out["flow"].shape == (2, 2, 24, 24)
    norms = out["flow"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    flow_gt = ground_truth_flow(mask)
    total, parts = net.loss({"image": image, "mask": mask, "flow": flow_gt}, out)
    bce = F.binary_cross_entropy_with_logits(out["logits"], mask)
    flow_term = (1 - F.cosine_similarity(out["flow"], flow_gt, dim=1)).mean()
    shape = geokernels.contour_flow_loss(out["logits"], flow_gt)
    torch.testing.assert_close(total, bce + 0.1 * flow_term + 0.5 * shape)
    assert parts["bce"] == pytest.approx(float(bce.detach()))
    assert parts["flow"] == pytest.approx(float(flow_term.detach()))
    total.backward()
    assert net.cfss.raw_lam.grad is not None
    assert all(p.grad is not None for p in net.backbone.parameters())
    # a tuple batch without a flow: the ground truth is computed from the mask
    total2, _ = net.loss((image, mask))
    assert torch.isfinite(total2)
    assert net.predict(image).dtype == torch.uint8


def test_cfssnet_training_step_reduces_loss():
    torch.manual_seed(0)
    image, mask = _disk_batch(B=2, H=20, W=20)
    net = CFSSNet(backbone=UNet(1, 3, depth=1, width=4, norm="none"), iters=3, sigma=1.5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    batch = {"image": image, "mask": mask, "flow": ground_truth_flow(mask)}
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, _ = net.loss(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_cfssnet_rejects_wrong_backbone():
    net = CFSSNet(backbone=UNet(1, 2, depth=1, width=4))
    with pytest.raises(ValueError, match="backbone must return"):
        net(torch.randn(1, 1, 8, 8))
    with pytest.raises(TypeError, match="batch"):
        CFSSNet(backbone=UNet(1, 3, depth=1, width=4)).loss(torch.randn(1, 1, 8, 8))


def test_noise_experiment_tiny():
    from geokernels.experiments import cfss_noise

    res = cfss_noise.run(n_images=3, size=32, noise_levels=(1.5,), iters=30, progress=False)
    assert set(res) >= {"dice_plain", "dice_smoothing", "dice_cfss", "residual_cfss"}
    assert len(res["dice_cfss"]) == 1
    # CFSS with the ground-truth flow lifts Dice over plain thresholding of sigma(o)
    assert res["dice_cfss"][0] > res["dice_plain"][0] + 0.05
    assert res["residual_cfss"][0] < res["residual_plain"][0]
    # deterministic
    assert cfss_noise.run(n_images=3, size=32, noise_levels=(1.5,), iters=30, progress=False) == res
