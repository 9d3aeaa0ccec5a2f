"""Module-level API of geokernels.nn and geokernels.models, as a library user builds on it:
constructor checks at construction time, loss-target validation, the detector leaving the
caller's module alone, checkpoint metadata, repr on meta, dtype handling (session-11 audit)."""
import copy
import math

import numpy as np
import pytest
import torch

from geokernels.models import CFSSNet, FlowMismatchDetector, UNet, VelocityUNet
from geokernels.nn import CFSSBlock, CGPM, ContourFlowLoss, QuasiConcavityLoss

TINY_VEL = dict(in_channels=3, base_width=8, channel_mults=(1, 2), blocks_per_level=1,
                attention_levels=(), mid_attention=False, num_heads=1)


# ---- constructors fail at construction, naming the argument ----------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: CFSSBlock(iters=-1), "iters"),
    (lambda: CFSSBlock(halfsize=-1), "halfsize"),
    (lambda: CFSSBlock(eps=0.0), "eps"),
    (lambda: CFSSBlock(tau=math.nan), "tau"),
    (lambda: CFSSBlock(checkpoint="bogus"), "checkpoint"),
    (lambda: CFSSBlock(backend="bogus"), "backend"),
    (lambda: ContourFlowLoss(reduction="avg"), "reduction"),
    (lambda: ContourFlowLoss(eps=-1.0), "eps"),
    (lambda: QuasiConcavityLoss(order=2, activation="tanh"), "activation"),
    (lambda: QuasiConcavityLoss(order=1, window=4), "window"),
    (lambda: QuasiConcavityLoss(reduction="avg"), "reduction"),
    (lambda: CGPM(backend="bogus"), "backend"),
    (lambda: CGPM(track_history="yes"), "track_history"),
    (lambda: CFSSNet(backbone="unet"), "backbone"),
    (lambda: CFSSNet(flow_eps=0.0), "flow_eps"),
    (lambda: CFSSNet(alpha=math.nan), "alpha"),
    (lambda: UNet(dropout=-0.5), "dropout"),
    (lambda: VelocityUNet(channel_mults=(1.5, 2)), "channel_mults"),
    (lambda: FlowMismatchDetector(agg="quantile:abc"), "quantile"),
    (lambda: FlowMismatchDetector(agg="quantile:1.5"), "quantile"),
    (lambda: FlowMismatchDetector(backend="bogus"), "backend"),
    (lambda: FlowMismatchDetector(device="tpu"), "device"),
])
def test_bad_constructor_arguments_fail_at_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_learnable_accepts_one_name_as_a_string():
    block = CFSSBlock(learnable="tau")            # was split into the letters 't', 'a', 'u'
    assert block.learnable == ("tau",) and hasattr(block, "raw_tau")


def test_repr_on_meta_and_of_every_result_changing_setting():
    with torch.device("meta"):
        net = CFSSNet(backbone=UNet(1, 3, depth=1, width=4), learnable=("tau",), iters=2)
    text = repr(net)                              # .item() on a meta tensor raised here
    assert "tau=<learnable>" in text and "alpha=0.1" in text and "flow_eps=" in text
    assert "checkpoint='auto'" in repr(CFSSBlock())
    r = repr(CGPM(steps=5, betas=(0.5, 0.9), adam_eps=1e-3, threshold=0.8))
    assert "betas=(0.5, 0.9)" in r and "adam_eps=0.001" in r and "threshold=0.8" in r


# ---- CFSSNet.loss targets -----------------------------------------------------------------------
@pytest.fixture
def cfss_batch():
    torch.manual_seed(0)
    net = CFSSNet(backbone=UNet(1, 3, depth=1, width=4), iters=2)
    x = torch.rand(2, 1, 12, 12)
    mask = torch.zeros(2, 1, 12, 12)
    mask[:, :, 3:9, 3:9] = 1
    return net, x, mask


@pytest.mark.parametrize("shape", [(2, 1, 12, 12), (2, 2, 1, 1), (1, 2, 12, 12)])
def test_cfssnet_loss_rejects_a_flow_that_would_broadcast(cfss_batch, shape):
    net, x, mask = cfss_batch
    with pytest.raises(ValueError, match="flow must have shape"):
        net.loss({"image": x, "mask": mask, "flow": torch.randn(shape)})


def test_cfssnet_loss_rejects_a_0_255_mask(cfss_batch):
    net, x, mask = cfss_batch
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        net.loss({"image": x, "mask": mask * 255})
    total, parts = net.loss({"image": x, "mask": mask})
    assert math.isfinite(float(total.detach())) and parts["bce"] < 5



def test_cfssnet_loss_mask_check_steps_aside_under_torch_compile(cfss_batch):
    """The [0, 1] mask check had its own gate, which ignored tracers: under torch.compile it
    branched on mask.min()/max() data (two extra graph breaks, 'generic_jump')."""
    import geokernels as gk

    net, x, mask = cfss_batch
    flow = gk.contour_flow_field(mask)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda x, m, f: net.loss({"image": x, "mask": m, "flow": f}))(
        x, mask, flow)
    assert not [r for r in ex.break_reasons if "generic_jump" in str(r.reason)]


# ---- FlowMismatchDetector ------------------------------------------------------------------------
def test_detector_leaves_the_callers_model_alone():
    """Wrapping a live model to evaluate during training froze it (eval, requires_grad off,
    channels_last): the next backward failed."""
    model = VelocityUNet(**TINY_VEL)
    det = FlowMismatchDetector(model, K=1, T=1, device="cpu")
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert model.stem.weight.is_contiguous()
    assert det.members[None] is not model and not det.members[None].training
    x = torch.rand(2, 3, 8, 8)
    model(x, torch.rand(2)).square().mean().backward()   # still trains
    det.score(x)


def test_detector_metadata_must_be_json(tmp_path):
    det = FlowMismatchDetector(VelocityUNet(**TINY_VEL), K=1, T=1, device="cpu")
    det.metadata = {"root": __import__("pathlib").Path("/data/mvtec")}
    with pytest.raises(TypeError, match="metadata must hold JSON types"):
        det.save(tmp_path / "d.pt")                   # saved, then load() called it corrupt
    det.metadata = {"image_auroc": np.float64(0.97), "tags": ("a", "b")}
    det.save(tmp_path / "d.pt")
    back = FlowMismatchDetector.load(tmp_path / "d.pt", device="cpu")
    assert back.metadata == {"image_auroc": 0.97, "tags": ["a", "b"]}


def test_detector_class_names_checked():
    cond = VelocityUNet(**TINY_VEL, num_classes=2)
    with pytest.raises(ValueError, match="distinct"):
        FlowMismatchDetector(cond, class_names=["a", "a"], device="cpu")
    with pytest.raises(ValueError, match="unconditional"):
        FlowMismatchDetector(VelocityUNet(**TINY_VEL), class_names=["a", "b"], device="cpu")
    with pytest.raises(ValueError, match="keys"):
        FlowMismatchDetector({"a": VelocityUNet(**TINY_VEL)}, class_names=["a"], device="cpu")


@pytest.mark.parametrize("kwargs", [dict(stats_sigma=math.nan), dict(min_std=-1.0),
                                    dict(stats_sigma="4")])
def test_calibrate_arguments_checked(kwargs):
    det = FlowMismatchDetector(VelocityUNet(**TINY_VEL), K=1, T=1, device="cpu")
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        det.calibrate(torch.rand(2, 3, 8, 8), **kwargs)


# ---- backbones' forward inputs --------------------------------------------------------------------
def test_unet_names_a_non_float_input():
    with pytest.raises(TypeError, match="x must be a floating-point"):
        UNet(1, 1, depth=1, width=4)(torch.zeros(1, 1, 8, 8, dtype=torch.long))


def test_velocity_unet_dtypes_and_times():
    model = VelocityUNet(**TINY_VEL).eval()
    x = torch.rand(2, 3, 8, 8)
    ref = model(x, torch.full((2,), 0.5))
    out = model(x.double(), 0.5)                  # float64 x_t into float32 weights
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(x, torch.tensor([0.5, math.nan]))
    with pytest.raises(TypeError, match="t must hold real times"):
        model(x, torch.tensor([True, False]))
    with pytest.raises(TypeError, match="x_t must be a floating-point"):
        model(x.long(), 0.5)


def test_velocity_unet_checks_python_class_indices_before_moving_them():
    """A Python int went to x_t's device first and was then range-checked only on the CPU: on a
    GPU nn.Embedding's device-side assert fired instead (meta shows the same path here)."""
    model = VelocityUNet(**TINY_VEL, num_classes=3)
    with pytest.raises(ValueError, match=r"cond values must be in \[0, 3\)"):
        model(torch.rand(2, 3, 8, 8), 0.5, 7)
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match=r"cond values must be in \[0, 3\)"):
        meta(torch.rand(2, 3, 8, 8, device="meta"), 0.5, [0, 99])
