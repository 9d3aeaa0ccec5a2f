"""CUDA loss kernels inside a captured CUDA graph (torch.cuda.graph, the mechanism behind
torch.compile(mode="reduce-overhead")): replays must equal eager calls bit for bit, with eager
calls interleaved, including a kernel's first use inside the capture.

The single-launch reductions take a block counter per launch (csrc/cuda/reduce.cuh): eagerly a
slot of a per-device pool, under capture a counter owned by the graph. The large qc1 window
needs the shared-memory opt-in (csrc/cuda/smem.cuh). CUDA only: skipped on CPU machines.
"""
import pytest
import torch

import geokernels
from tests._util import requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]


CASES = {
    "qc2_mean": lambda x: geokernels.qc2_loss(x, backend="cuda"),
    "qc2_sum_relu": lambda x: geokernels.qc2_loss(x, activation="relu", reduction="sum", backend="cuda"),
    "qc1_w7": lambda x: geokernels.qc1_loss(x, window=7, backend="cuda"),
    "qc1_w41_optin": lambda x: geokernels.qc1_loss(x, window=41, reduction="sum", backend="cuda"),
}


def _capture_and_compare(fn, shape, dtype, extra=()):
    torch.manual_seed(0)
    static = torch.rand(shape, device="cuda", dtype=dtype)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up on a side stream, as torch.cuda.graph advises
        fn(static, *extra)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = fn(static, *extra)
    for trial in range(3):
        fresh = torch.rand(shape, device="cuda", dtype=dtype)
        static.copy_(fresh)
        graph.replay()
        eager = fn(fresh, *extra)            # an eager call between replays
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager), f"trial {trial}: {captured} != {eager}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_in_cuda_graph(name, dtype):
    _capture_and_compare(CASES[name], (2, 3, 37, 45), dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_contour_flow_loss_in_cuda_graph(reduction):
    flow = torch.randn(2, 2, 48, 48, generator=torch.Generator().manual_seed(1)).cuda()

    def fn(x, f):
        return geokernels.contour_flow_loss(x, f, reduction=reduction, backend="cuda")

    _capture_and_compare(fn, (2, 1, 48, 48), torch.float32, extra=(flow,))


def test_first_use_inside_capture():
    # no eager warm-up: the first reduction of the process may be the captured one
    static = torch.rand(1, 1, 33, 65, device="cuda", dtype=torch.float64)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = geokernels.qc2_loss(static, margin=2e-3, backend="cuda")
    static.copy_(torch.rand_like(static))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, geokernels.qc2_loss(static, margin=2e-3, backend="cuda"))
