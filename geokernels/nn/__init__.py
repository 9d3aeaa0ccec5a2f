"""torch.nn modules built on the fused ops."""
# D-Convexity (QuasiConcavityLoss, CGPM, SegmentationWithCGPM)
from geokernels.nn.dconvex import CGPM, QuasiConcavityLoss, SegmentationWithCGPM, threshold_mask

# Contour Flow (ContourFlowLoss, CFSSBlock)
from geokernels.nn.contour_flow import CFSSBlock, ContourFlowLoss

__all__ = [name for name in dir() if not name.startswith("_")]
