"""Public functional API, one module per op family."""
from geokernels.ops.qc_loss import qc2_loss

__all__ = ["qc2_loss"]
