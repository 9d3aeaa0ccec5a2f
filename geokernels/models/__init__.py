"""Backbones and end-to-end models."""
# segmentation backbones and CFSSNet (UNet, CFSSNet)
from geokernels.models.cfssnet import CFSSNet
from geokernels.models.unet import UNet

# flow-matching anomaly detection (VelocityUNet, FlowMismatchDetector)

__all__ = [name for name in dir() if not name.startswith("_")]
