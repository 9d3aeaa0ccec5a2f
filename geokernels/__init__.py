"""geokernels: fused CPU/CUDA/Triton kernels for geometric vision.

Families (SPEC.md): D-Convexity quasi-concavity prior, Contour Flow constraint, Flow Mismatching
anomaly detection. Ops take ``backend="auto"|"cuda"|"triton"|"cpu"|"torch"``.
"""
from geokernels._version import __version__
from geokernels import _extension
from geokernels._checks import get_checks, set_checks

# ops (SPEC 1.2)
from geokernels.ops import qc2_loss

# ops (SPEC 1.3-1.5)

# ops (SPEC 1.6)
from geokernels.ops import midpoint_convexify

# ops (SPEC 2.1-2.2)
from geokernels.ops import contour_flow_field, distance_transform

# ops (SPEC 2.3-2.4)
from geokernels.ops import cfss_iterate, contour_flow_loss

# ops (SPEC 3)
from geokernels.ops import anomaly_score, flow_mismatch, flow_mismatch_noise, smooth_heatmap

# high-level API (models, detector)
from geokernels.models.detector import FlowMismatchDetector  # noqa: E402

__all__ = [name for name in dir() if not name.startswith("_")]
