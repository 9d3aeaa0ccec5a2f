"""Benchmark cases of flow-mismatch scoring (issue acceptance: B=8, K=8, T=24, 3x128x128 with a
trivial 1x1-conv velocity model, fused kernels vs the straightforward reference loop).

The reference gets its noise precomputed outside the timed step (it is an input of the loop);
the fused backends regenerate theirs inside the kernels. Two chunkings are measured: all B*K
paths per model call (chunk=None, the default) and one image's K paths per call (chunk=K).
"""
from __future__ import annotations

import torch

import geokernels
from geokernels import reference
from geokernels.benchmark import Case, register_case


def conv1x1_velocity(channels: int, device) -> "callable":
    """The trivial velocity model of the acceptance test: a fixed random 1x1 convolution."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / channels)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    conv = conv.to(device).requires_grad_(False)
    return lambda x_t, t, cond: conv(x_t)


@register_case
def flow_mismatch_cases(device: torch.device, quick: bool):
    B, K, T, C, H, W = (2, 4, 4, 3, 64, 64) if quick else (8, 8, 24, 3, 128, 128)
    x = torch.rand(B, C, H, W, device=device)
    model = conv1x1_velocity(C, device)
    noise = geokernels.flow_mismatch_noise(x, K=K, seed=0)  # the reference's explicit input
    # what a fused implementation must move per call: write x_t, read v (+ x, heat: negligible)
    nbytes = T * 2 * B * K * C * H * W * x.element_size()
    cases = []
    for chunk in (None, K):
        def make_step(impl: str, chunk=chunk):
            if impl == "reference":
                return lambda: reference.flow_mismatch(model, x, K=K, T=T, noise=noise)
            if impl == "compiled":
                raise NotImplementedError("torch.compile of a K*T-step Python loop is not useful")
            return lambda: geokernels.flow_mismatch(model, x, K=K, T=T, chunk=chunk, backend=impl)

        label = (f"B{B} K{K} T{T} {C}x{H}x{W} conv1x1 chunk={'all' if chunk is None else chunk} f32")
        cases.append(Case("flow_mismatch", label, make_step, nbytes=nbytes, compile_reference=False))
    return cases
