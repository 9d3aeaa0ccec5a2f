"""64-bit indexing (issue 8): tensors with more than 2^31 elements.

On the GPU (benchmarks/gpu_check.sh; skipped without CUDA): each op runs on a (9, 1, 16384, 16384)
float32 tensor (2.4e9 elements, 9.7 GB) and its last plane -- whose offsets exceed 2^31 -- must
equal the op on that plane alone (planes are independent: bit-identical). A 32-bit offset
would read or write the wrong plane (or fault).

On the CPU a > 2^31-element test would need > 8 GB of RAM, more than CI has; the CPU kernels
index planes with int64 too (checked by inspection: ``csrc/cpu/*`` use int64_t plane offsets),
and the CUDA sources are checked for the same pattern below (cheap, weak, but it catches a
regression to ``int`` plane offsets before the GPU run does).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import geokernels
from tests._util import requires_cuda

ROOT = Path(__file__).resolve().parents[1]
LARGE = (9, 1, 16384, 16384)  # 2,415,919,104 elements > 2^31


@requires_cuda
@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("op", ["qc2_loss", "midpoint_convexify", "distance_transform"])
def test_cuda_more_than_2_31_elements(op):
    free, _ = torch.cuda.mem_get_info()
    need = 4 * torch.Size(LARGE).numel() * 3
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    assert torch.Size(LARGE).numel() > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    u = torch.rand(LARGE, device="cuda", generator=gen)
    if op == "qc2_loss":
        def f(t):
            return geokernels.qc2_loss(t, reduction="none", backend="cuda")
    elif op == "midpoint_convexify":
        def f(t):  # one Jacobi sweep: planes independent
            return geokernels.midpoint_convexify(t, radius=1.0, max_iters=1, backend="cuda")
    else:
        u = u > 0.999

        def f(t):
            return geokernels.distance_transform(t, backend="cuda")
    with torch.no_grad():
        last_alone = f(u[-1:].clone())
        full = f(u)
        assert torch.equal(full[-1:], last_alone)
        del full
    torch.cuda.empty_cache()


def test_cuda_sources_use_64bit_plane_offsets():
    """No CUDA kernel computes a plane/pixel offset in 32-bit ``int`` from the grid indices."""
    bad = []
    pattern = re.compile(r"\b(int|unsigned|int32_t|uint32_t)\s+(plane|idx|index|offset|off|p)\s*="
                         r"[^;]*(blockIdx|gridDim)")
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{path.name}:{n}: {line.strip()}")
    assert not bad, "32-bit offsets from grid indices:\n" + "\n".join(bad)
