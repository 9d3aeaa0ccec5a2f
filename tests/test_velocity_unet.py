"""VelocityUNet (SPEC 3 velocity model): shapes, presets, conditioning, gradients, bad input."""
import pytest
import torch
from torch import nn

from geokernels.models import VelocityUNet
from geokernels.models.velocity_unet import PRESETS, timestep_embedding


def _small(**kw):
    kw.setdefault("base_width", 8)
    kw.setdefault("channel_mults", (1, 2, 2))
    kw.setdefault("blocks_per_level", 1)
    return VelocityUNet(**kw)


def _randomize(model, std=0.05):
    """Replace the zero-initialised output layers so every input actually reaches the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_presets_sizes():
    counts = {name: VelocityUNet.from_preset(name).num_parameters() for name in PRESETS}
    assert 0.5e6 <= counts["tiny"] <= 1.0e6
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["paper"]
    paper = VelocityUNet.from_preset("paper", image_size=128)
    assert paper.config["base_width"] == 64 and paper.size_multiple == 8
    assert paper.config["image_size"] == 128
    with pytest.raises(ValueError, match="preset"):
        VelocityUNet.from_preset("huge")


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (3, 3, 24, 40), (2, 1, 8, 8)])
def test_forward_shape_and_dtype(shape):
    model = _randomize(_small(in_channels=shape[1]))
    x = torch.randn(shape)
    v = model(x, torch.rand(shape[0]))
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()
    v64 = model.double()(x.double(), torch.rand(shape[0], dtype=torch.float64))
    assert v64.dtype == torch.float64


def test_fresh_model_outputs_zero():
    # zero-initialised head: an untrained model predicts v = 0 (stable start of training)
    model = _small()
    assert torch.count_nonzero(model(torch.randn(2, 3, 16, 16), torch.rand(2))) == 0


def test_time_and_scalar_t():
    model = _randomize(_small())
    x = torch.randn(3, 3, 16, 16)
    a = model(x, torch.full((3,), 0.3))
    assert torch.equal(model(x, 0.3), a)
    assert torch.equal(model(x, torch.tensor([0.3])), a)
    b = model(x, torch.full((3,), 0.7))
    assert (a - b).abs().max() > 1e-4
    # rows are independent: a batch equals its rows scored alone
    assert torch.allclose(model(x[1:2], torch.tensor([0.3])), a[1:2], atol=1e-5)


def test_class_conditioning():
    model = _randomize(_small(num_classes=3))
    x = torch.randn(2, 3, 16, 16)
    t = torch.rand(2)
    v0 = model(x, t, torch.tensor([0, 0]))
    v2 = model(x, t, torch.tensor([2, 2]))
    assert (v0 - v2).abs().max() > 1e-4
    assert torch.equal(model(x, t, 2), v2)
    mixed = model(x, t, torch.tensor([0, 2]))
    assert torch.allclose(mixed[0], v0[0], atol=1e-5) and torch.allclose(mixed[1], v2[1], atol=1e-5)


def test_gradients_reach_every_parameter():
    model = _randomize(_small(num_classes=2, attention_levels=(1,)))
    x = torch.randn(2, 3, 16, 16)
    model(x, torch.rand(2), torch.tensor([0, 1])).square().mean().backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_config_round_trip():
    model = _randomize(_small(num_classes=2, attention_levels=(2,), dropout=0.0, image_size=16))
    clone = VelocityUNet.from_config(model.config)
    clone.load_state_dict(model.state_dict())
    x, t, c = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 0])
    assert torch.equal(model(x, t, c), clone(x, t, c))
    assert clone.config == model.config


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 0.5, 1.0]), 9)
    assert e.shape == (3, 9) and torch.isfinite(e).all()
    assert torch.allclose(e[0, :4], torch.ones(4))  # cos(0) = 1


def test_bad_input_names_argument():
    model = _small()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="x_t"):
        model(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(2, 3, 18, 16), torch.rand(2))
    with pytest.raises(ValueError, match="x_t"):
        model(torch.randn(3, 16, 16), torch.rand(1))
    with pytest.raises(TypeError, match="x_t"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.long), torch.rand(2))
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, torch.rand(3))
    with pytest.raises(ValueError, match="unconditional"):
        model(x, torch.rand(2), torch.tensor([0, 1]))
    cond_model = _small(num_classes=2)
    with pytest.raises(ValueError, match="cond"):
        cond_model(x, torch.rand(2))
    with pytest.raises(ValueError, match=r"cond values must be in \[0, 2\)"):
        cond_model(x, torch.rand(2), torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="cond"):
        cond_model(x, torch.rand(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="attention_levels"):
        _small(attention_levels=(5,))
    with pytest.raises(ValueError, match="base_width"):
        _small(base_width=0)
    with pytest.raises(ValueError, match="num_classes"):
        _small(num_classes=-1)


def test_bf16_autocast_cpu_runs():
    model = _randomize(_small())
    x = torch.randn(1, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model(x, torch.rand(1))
    assert torch.isfinite(v.float()).all()


def test_module_is_scriptable_free_of_python_state():
    # the model holds no tensors outside parameters (what DDP / EMA copies rely on)
    model = _small(num_classes=2)
    names = {n for n, _ in model.named_buffers()}
    assert names == set()
    assert all(isinstance(m, nn.Module) for m in model.modules())


def test_channels_last_model_matches_and_returns_nchw():
    model = _randomize(_small(num_classes=2))
    x, t, c = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 0])
    expected = model(x, t, c)
    nhwc = model.to(memory_format=torch.channels_last)
    got = nhwc(x, t, c)
    assert got.is_contiguous() and torch.allclose(got, expected, atol=1e-5)
