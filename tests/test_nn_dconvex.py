"""geokernels.nn D-Convexity modules: QuasiConcavityLoss, CGPM, SegmentationWithCGPM."""
import pytest
import torch
from torch import nn

import geokernels
from geokernels import reference
from geokernels.nn import CGPM, QuasiConcavityLoss, SegmentationWithCGPM, threshold_mask
from tests._util import rel_err


def _logits(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H, dtype=torch.float64),
                            torch.linspace(-1, 1, W, dtype=torch.float64), indexing="ij")
    r = torch.sqrt(yy ** 2 + xx ** 2)
    blob = torch.where((xx > 0.1) & (yy.abs() < 0.2), (0.6 - r) * 8 - 6, (0.6 - r) * 8)
    return blob.expand(B, C, H, W) + 0.3 * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("order,kwargs", [(2, {}), (2, dict(activation="relu", margin=0.01)), (1, dict(window=5))])
def test_quasi_concavity_loss_module(order, kwargs):
    u = torch.rand(2, 1, 12, 13, dtype=torch.float64, requires_grad=True)
    loss = QuasiConcavityLoss(order=order, **kwargs)(u)
    ref = (reference.qc2_loss if order == 2 else reference.qc1_loss)(u, **kwargs)
    assert rel_err(loss, ref) <= 1e-12
    loss.backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()
    assert "order=" in repr(QuasiConcavityLoss(order=order, **kwargs))


def test_quasi_concavity_loss_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        QuasiConcavityLoss(order=3)
    with pytest.raises(TypeError, match="window"):
        QuasiConcavityLoss(order=2, window=5)
    with pytest.raises(TypeError, match="margin"):
        QuasiConcavityLoss(order=1, margin=0.1)
    with pytest.raises(ValueError, match="window"):
        QuasiConcavityLoss(order=1, window=4)(torch.rand(1, 1, 5, 5))


def test_cgpm_module_matches_functional_and_reference():
    logits = _logits((2, 1, 16, 15))
    module = CGPM(steps=12, method="c1", window=3, track_history=True)
    probs = module(logits)
    ref = reference.cgpm(logits, steps=12, method="c1", window=3)
    assert rel_err(probs, ref) <= 1e-9
    assert module.last_history.shape == (12,)
    mask = module.mask(logits)
    assert mask.dtype == torch.uint8 and mask.shape == logits.shape
    assert torch.equal(mask, (ref >= 0.5).to(torch.uint8))
    assert torch.equal(module.mask(logits, threshold=0.9), (ref >= 0.9).to(torch.uint8))


def test_cgpm_module_validates_at_construction():
    with pytest.raises(ValueError, match="steps"):
        CGPM(steps=-1)
    with pytest.raises(ValueError, match="method"):
        CGPM(method="c0")
    with pytest.raises(TypeError, match="margin"):
        CGPM(method="c1", margin=0.1)
    with pytest.raises(ValueError, match="threshold"):
        CGPM(threshold=float("nan"))


def test_refinement_makes_the_mask_more_convex():
    # a notched disk: the first-order projection fills the notch (the solidity of the 0.5 level
    # set goes from about 0.77 to about 0.99 with the defaults)
    logits = _logits((1, 1, 48, 48)).float()
    before = threshold_mask(torch.sigmoid(logits))
    after = threshold_mask(CGPM(steps=100, method="c1")(logits))

    def solidity(mask):
        from scipy.spatial import ConvexHull

        pts = torch.nonzero(mask[0, 0]).double().numpy()
        return len(pts) / ConvexHull(pts).volume

    assert solidity(after) > solidity(before) + 0.1


class _TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64)

    def forward(self, x):
        return self.conv(x)


def test_segmentation_with_cgpm_backprop_reaches_backbone():
    torch.manual_seed(0)
    backbone = _TinyBackbone()
    model = SegmentationWithCGPM(backbone, steps=5, backprop_to_backbone=True, backend="cpu")
    x = _logits((2, 1, 10, 11))
    probs, logits = model(x, return_logits=True)
    assert probs.shape == x.shape and logits.shape == x.shape
    probs.sum().backward()
    assert backbone.conv.weight.grad is not None
    assert torch.isfinite(backbone.conv.weight.grad).all() and backbone.conv.weight.grad.abs().sum() > 0
    # the same gradient through the reference loop
    weight_grad = backbone.conv.weight.grad.clone()
    backbone.conv.weight.grad = None
    ref = reference.cgpm(backbone(x), steps=5, backprop_to_backbone=True)
    ref.sum().backward()
    assert rel_err(weight_grad, backbone.conv.weight.grad) <= 1e-8
    mask = model.predict_mask(x)
    assert mask.dtype == torch.uint8 and mask.shape == x.shape


def test_segmentation_without_backprop_detaches():
    backbone = _TinyBackbone()
    model = SegmentationWithCGPM(backbone, cgpm=CGPM(steps=3))
    probs = model(_logits((1, 1, 8, 8)))
    assert not probs.requires_grad


def test_segmentation_bad_arguments():
    with pytest.raises(TypeError, match="backbone"):
        SegmentationWithCGPM(lambda x: x)
    with pytest.raises(TypeError, match="cgpm"):
        SegmentationWithCGPM(_TinyBackbone(), cgpm=CGPM(), steps=3)
    with pytest.raises(TypeError, match="cgpm"):
        SegmentationWithCGPM(_TinyBackbone(), cgpm=nn.Identity())


def test_threshold_mask_bad_input():
    with pytest.raises(TypeError, match="threshold"):
        threshold_mask(torch.rand(1, 1, 2, 2), threshold="0.5")
    with pytest.raises(TypeError, match="probs"):
        threshold_mask([0.1], 0.5)


def test_exported_names():
    for name in ("QuasiConcavityLoss", "CGPM", "SegmentationWithCGPM"):
        assert hasattr(geokernels.nn, name)
    for name in ("qc1_loss", "fidelity_loss", "cgpm"):
        assert hasattr(geokernels, name)
