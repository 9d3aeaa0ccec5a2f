"""Where the mismatch op, the metrics and the datasets come from (one place to change)."""
from __future__ import annotations


def flow_mismatch_op():
    from geokernels.ops import flow_mismatch

    return flow_mismatch


def anomaly_score_op():
    from geokernels.ops import anomaly_score

    return anomaly_score


def metric(name: str):
    """``auroc``, ``average_precision``, ``f1_max`` or ``aupro`` from geokernels.metrics."""
    import geokernels.metrics as m

    return getattr(m, name)


def dataset_class(name: str):
    """``MVTecAD``, ``VisA`` or ``TextureAnomalyDataset`` from geokernels.data."""
    import geokernels.data as d

    return getattr(d, name)
