"""Pure-PyTorch transcription of SPEC.md: the oracle every backend is tested against."""
# SPEC 1.2
from geokernels.reference.dconvex import qc2_loss, qc2_loss_map

# SPEC 1.3-1.5

# SPEC 1.6

# SPEC 2.1-2.2
from geokernels.reference.contour_flow import div_backward, grad_forward

# SPEC 2.3-2.4
from geokernels.reference.contour_flow import (cfss_iterate, contour_flow_loss,
                                             contour_flow_loss_map, gaussian_kernel)

# SPEC 3

__all__ = [name for name in dir() if not name.startswith("_")]
