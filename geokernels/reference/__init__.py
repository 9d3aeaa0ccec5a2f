"""Pure-PyTorch transcription of SPEC.md: the oracle every backend is tested against."""
from geokernels.reference.dconvex import qc2_loss, qc2_loss_map

__all__ = ["qc2_loss", "qc2_loss_map"]
