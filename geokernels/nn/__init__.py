"""torch.nn modules built on the fused ops."""
# D-Convexity (QuasiConcavityLoss, CGPM, SegmentationWithCGPM)

# Contour Flow (ContourFlowLoss, CFSSBlock)
from geokernels.nn.contour_flow import CFSSBlock, ContourFlowLoss

__all__ = [name for name in dir() if not name.startswith("_")]
