"""Shared test setup.

Triton kernels run on CPU tensors through the interpreter; TRITON_INTERPRET must be set before
any @triton.jit function is created, so it is set here, first, when no GPU is present.
"""
import os
import shutil
import subprocess


def _has_cuda_gpu() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


if not _has_cuda_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Every test that is skipped without a GPU also carries the `cuda` marker, so that
    `-m cuda` (benchmarks/gpu_check.sh) runs it: parametrised cases marked only with
    requires_cuda (a skipif) escaped the marker selection."""
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            continue
        if any(m.kwargs.get("reason") == "needs a CUDA device" for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
