"""Backbones and end-to-end models."""
# segmentation backbones and CFSSNet (UNet, CFSSNet)

# flow-matching anomaly detection (VelocityUNet, FlowMismatchDetector)

__all__ = [name for name in dir() if not name.startswith("_")]
