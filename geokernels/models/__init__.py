"""Backbones and end-to-end models."""
# segmentation backbones and CFSSNet (UNet, CFSSNet)
from geokernels.models.cfssnet import CFSSNet
from geokernels.models.unet import UNet

# flow-matching anomaly detection (VelocityUNet, FlowMismatchDetector)
from geokernels.models.velocity_unet import VelocityUNet  # noqa: E402
from geokernels.models.detector import FlowMismatchDetector  # noqa: E402

__all__ = [name for name in dir() if not name.startswith("_")]
