"""Public functional API, one module per op family."""
# SPEC 1.2
from geokernels.ops.qc_loss import qc2_loss

# SPEC 1.3-1.5 (qc1_loss, fidelity_loss, cgpm)

# SPEC 1.6 (midpoint_convexify)
from geokernels.ops.midpoint import midpoint_convexify

# SPEC 2.1-2.2 (distance_transform, contour_flow_field)
from geokernels.ops.distance import contour_flow_field, distance_transform

# SPEC 2.3-2.4 (contour_flow_loss, cfss_iterate)
from geokernels.ops.cfss import cfss_iterate
from geokernels.ops.contour_flow import contour_flow_loss

# SPEC 3 (flow_mismatch, anomaly_score)
from geokernels.ops.flow_mismatch import (anomaly_score, flow_mismatch, flow_mismatch_noise,
                                           smooth_heatmap)

__all__ = [name for name in dir() if not name.startswith("_")]
