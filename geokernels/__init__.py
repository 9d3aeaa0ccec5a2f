"""geokernels: fused CPU/CUDA/Triton kernels for geometric vision.

Families (SPEC.md): D-Convexity quasi-concavity prior, Contour Flow constraint, Flow Mismatching
anomaly detection. Ops take ``backend="auto"|"cuda"|"triton"|"cpu"|"torch"``.
"""
from geokernels._version import __version__
from geokernels import _extension
from geokernels._checks import get_checks, set_checks
from geokernels.ops import qc2_loss

__all__ = ["__version__", "qc2_loss", "set_checks", "get_checks"]
