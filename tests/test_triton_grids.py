"""Launch grids of the Triton flow_mismatch kernels stay within CUDA's limits at large shapes.

CUDA caps grid axes 1 and 2 at 65535 blocks (axis 0 at 2^31 - 1); Triton does not check and the
launch fails with "invalid argument" on a GPU only. Here the kernels are replaced by recorders and
each op's Python body runs on meta tensors (nothing is allocated or computed), so the grid of a
2048x2048 image is checked on a CPU.
"""
import pytest
import torch

pytest.importorskip("triton")

from geokernels.triton import flow_mismatch as fm  # noqa: E402

pytestmark = pytest.mark.triton

CUDA_GRID_MAX = (2**31 - 1, 65535, 65535)
KERNELS = ["_noise_kernel", "_paths_kernel", "_delta_kernel", "_accumulate_kernel",
           "_aggregate_kernel"]


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args)`` records and runs nothing."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, tuple(grid), args))
        return launch


def _body(op):
    """The Python function behind a torch.library custom op (the dispatcher would run the fake
    implementation for meta tensors)."""
    return op._init_fn


@pytest.mark.parametrize("B,K,C,H,W", [
    (2, 16, 3, 2048, 2048),  # pixel blocks of accumulate/aggregate/delta: 2^18 / 2^16
    (2, 16, 4, 2048, 2048),  # element blocks of noise/paths: 65536
    (128, 1024, 1, 8, 8),  # B*K = 131072 paths (swapping the grid axes would not do)
])
def test_grids_within_cuda_limits(monkeypatch, B, K, C, H, W):
    launches = []
    for name in KERNELS:
        monkeypatch.setattr(fm, name, _Recorder(name, launches))
    meta = dict(dtype=torch.float32, device="meta")
    x = torch.empty(B, C, H, W, **meta)
    v = torch.empty(B * K, C, H, W, **meta)
    _body(fm.noise)(x, 1, 0, K)
    _body(fm.paths)(x, None, 0.5, 1, 0, K, 0, B * K)
    _body(fm.delta)(v, x, None, 1, 0, K, 0)
    _body(fm.accumulate_)(torch.empty(B, H, W, **meta), v, x, None, 1.0, 1, 0, K, 1, False)
    _body(fm.aggregate_)(torch.empty(B, H, W, **meta), torch.empty(B, K, H, W, **meta), 1.0, 1,
                         False)
    assert sorted(name for name, _, _ in launches) == sorted(KERNELS)
    bad = []
    for name, grid, args in launches:
        assert 1 <= len(grid) <= 3, (name, grid)
        bad += [f"{name}: grid {grid}, axis {axis} > {limit}"
                for axis, (n, limit) in enumerate(zip(grid, CUDA_GRID_MAX)) if not 1 <= n <= limit]
        if name in ("_accumulate_kernel", "_aggregate_kernel"):
            # one "non-finite seen" flag per program
            flags = args[4] if name == "_accumulate_kernel" else args[2]
            programs = 1
            for n in grid:
                programs *= n
            assert flags.numel() == programs, (name, grid, flags.shape)
    assert not bad, "\n".join(bad)


def test_device_guard():
    """Triton launches on the current CUDA device: the ops make the tensors' device current
    (without initialising CUDA until entered), and do nothing for CPU tensors."""
    from types import SimpleNamespace

    from geokernels.triton._tiles import device_guard

    guard = device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with device_guard(torch.zeros(1)):
        pass
