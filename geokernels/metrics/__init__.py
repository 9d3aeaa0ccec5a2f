"""Evaluation metrics (SPEC 2.6 and 3)."""
# segmentation: dice, iou, hd95, boundary_distance, solidity
from geokernels.metrics.segmentation import (boundary_distance, dice, hd95, inner_boundary, iou,
                                             solidity)

# anomaly detection: auroc, average_precision, f1_max, aupro
from geokernels.metrics.anomaly import (AnomalyMetricAccumulator, aupro, auroc,  # noqa: E402
                                        average_precision, f1_max)

__all__ = [name for name in dir() if not name.startswith("_")]
