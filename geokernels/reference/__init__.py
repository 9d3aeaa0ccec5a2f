"""Pure-PyTorch transcription of SPEC.md: the oracle every backend is tested against."""
# SPEC 1.2
from geokernels.reference.dconvex import qc2_loss, qc2_loss_map

# SPEC 1.3-1.5

# SPEC 1.6
from geokernels.reference.midpoint import midpoint_convexify, midpoint_offsets, midpoint_sweep

# SPEC 2.1-2.2
from geokernels.reference.contour_flow import div_backward, grad_forward
from geokernels.reference.distance import (contour_flow_field, distance_transform,
                                           distance_transform_bruteforce)

# SPEC 2.3-2.4
from geokernels.reference.contour_flow import (cfss_iterate, contour_flow_loss,
                                             contour_flow_loss_map, gaussian_kernel)

# SPEC 3
# (the function flow_mismatch shadows the submodule's attribute name; import the module's other
# names as `from geokernels.reference.flow_mismatch import ...`)
from geokernels.reference.flow_mismatch import (anomaly_score, flow_mismatch, flow_mismatch_noise,
                                                gaussian_smooth, philox4x32_10)

__all__ = [name for name in dir() if not name.startswith("_")]
