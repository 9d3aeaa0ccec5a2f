"""Where the mismatch op, the metrics and the MVTec loader come from.

The real implementations (``geokernels.ops``, ``geokernels.metrics``, ``geokernels.data``) are used
whenever they import; ``_fallbacks`` only fills the gap while those branches are not merged.
"""
from __future__ import annotations


def flow_mismatch_op():
    try:
        from geokernels.ops import flow_mismatch
    except ImportError:
        from geokernels.anomaly._fallbacks import flow_mismatch
    return flow_mismatch


def anomaly_score_op():
    try:
        from geokernels.ops import anomaly_score
    except ImportError:
        from geokernels.anomaly._fallbacks import anomaly_score
    return anomaly_score


def metric(name: str):
    """``auroc``, ``average_precision`` or ``aupro`` from geokernels.metrics (or the stand-in)."""
    try:
        import geokernels.metrics as m

        return getattr(m, name)
    except (ImportError, AttributeError):
        from geokernels.anomaly import _fallbacks

        return getattr(_fallbacks, name)


def dataset_class(name: str):
    """``MVTecAD``, ``VisA`` or ``TextureAnomalyDataset`` from geokernels.data (MVTecAD has a
    stand-in; the others raise a clear ImportError until they exist)."""
    try:
        import geokernels.data as d

        return getattr(d, name)
    except (ImportError, AttributeError):
        if name == "MVTecAD":
            from geokernels.anomaly._fallbacks import MVTecAD

            return MVTecAD
        raise ImportError(f"geokernels.data.{name} is not available in this build") from None
