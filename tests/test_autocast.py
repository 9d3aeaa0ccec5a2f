"""Autocast policy of every public op (issue 8; geokernels/ops/_autocast.py).

Inside ``torch.autocast`` every op computes in float32: float16/bfloat16 arguments are upcast,
the result is float32 and equals the op on the float32 copies outside autocast bit for bit;
gradients reach low-precision leaves in their own dtype (the float32 gradient rounded once);
float32 arguments give exactly the results they give outside autocast. CPU autocast runs here;
the CUDA cases (float16 and bfloat16) run on the GPU machine.
"""
from __future__ import annotations

import pytest
import torch

import geokernels
from tests._op_specs import SPECS, SPECS_BY_NAME
from tests._util import requires_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
LOW = [torch.bfloat16, torch.float16]


def _inputs(spec, device):
    """Legal float32 inputs (bool masks stay bool) on ``device``, rounded to bfloat16 values so
    that every low-precision copy is exact for both half types' ranges used here."""
    out = []
    torch.manual_seed(0)
    for a in spec.tensors:
        t = a.make(tuple(a.shape), torch.float32)
        if t.is_floating_point():
            t = t.to(torch.bfloat16).to(torch.float16).float()  # representable in both
        out.append(t.to(device))
    return out


def _floats(out):
    return [o for o in (out if isinstance(out, tuple) else (out,))
            if isinstance(o, torch.Tensor) and o.is_floating_point()]


def _same(a, b, what):
    for x, y in zip(_floats(a), _floats(b)):
        assert x.dtype == y.dtype, f"{what}: dtype {x.dtype} != {y.dtype}"
        assert torch.equal(x, y), f"{what}: differs by {float((x - y).abs().max())}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_low_precision_inputs_run_in_float32(name, low, device):
    spec = SPECS_BY_NAME[name]
    base = _inputs(spec, device)
    wants = [spec.differentiable and t.is_floating_point() for t in base]
    lows = [(t.to(low) if t.is_floating_point() else t).requires_grad_(w) for t, w in zip(base, wants)]
    f32 = [t.clone().requires_grad_(w) for t, w in zip(base, wants)]
    with torch.autocast(device, dtype=low):
        out = spec.call(*lows)
    ref = spec.call(*f32)
    assert all(o.dtype == torch.float32 for o in _floats(out)), [o.dtype for o in _floats(out)]
    _same(out, ref, f"{name} under autocast({low})")
    if any(wants):
        o, r = spec.output(out), spec.output(ref)
        cot = torch.rand_like(r)
        leaves = [t for t, w in zip(lows, wants) if w]
        gs = torch.autograd.grad(o, leaves, cot, allow_unused=True)
        gs_ref = torch.autograd.grad(r, [t for t, w in zip(f32, wants) if w], cot, allow_unused=True)
        for g, g_ref, leaf in zip(gs, gs_ref, leaves):
            if g_ref is None:
                assert g is None or not g.any()
                continue
            assert g.dtype == leaf.dtype == low
            assert torch.equal(g, g_ref.to(low)), f"{name}: gradient is not the float32 one rounded"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_float32_results_do_not_change_under_autocast(name, device):
    spec = SPECS_BY_NAME[name]
    base = _inputs(spec, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = spec.call(*[t.clone() for t in base])
    _same(out, spec.call(*[t.clone() for t in base]), f"{name} float32 under autocast")


def test_outside_autocast_half_on_cpu_is_still_a_type_error():
    u = torch.rand(1, 1, 5, 5).to(torch.bfloat16)
    with pytest.raises(TypeError, match="u"):
        geokernels.qc2_loss(u)


def test_flow_mismatch_model_keeps_the_callers_autocast():
    # the reduction runs in float32, but the model calls stay under the caller's autocast
    seen = []

    def model(x_t, t, cond):
        seen.append((x_t.dtype, torch.is_autocast_enabled("cpu")))
        return torch.nn.functional.linear(x_t.permute(0, 2, 3, 1), torch.eye(3)).permute(0, 3, 1, 2)

    x = torch.rand(2, 3, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        heat = geokernels.flow_mismatch(model, x.to(torch.bfloat16), K=2, T=2)
    assert heat.dtype == torch.float32 and heat.shape == (2, 6, 5)
    assert seen and all(dt == torch.float32 and on for dt, on in seen)


def test_compiled_op_under_autocast():
    u = torch.rand(2, 1, 7, 6).to(torch.bfloat16)
    f = torch.compile(lambda a: geokernels.qc2_loss(a, backend="cpu"), fullgraph=True,
                      backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(u)
    assert out.dtype == torch.float32
    assert torch.equal(out, geokernels.qc2_loss(u.float(), backend="cpu"))


def test_nn_module_in_an_autocast_training_step():
    # a bf16 model output fed to a geokernels loss module under autocast trains in float32
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(2, 1, 8, 8)
    loss_fn = geokernels.nn.QuasiConcavityLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(torch.sigmoid(logits))
    assert loss.dtype == torch.float32
    loss.backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()
