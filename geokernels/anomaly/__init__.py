"""Flow-Mismatching anomaly detection pipeline (SPEC.md 3): training, baselines, CLI.

``train`` fits the velocity U-Net by conditional flow matching on normal images;
``geokernels.FlowMismatchDetector`` scores with it; ``geokernels anomaly train|score|eval`` is the
command line.
"""
from geokernels.anomaly.baselines import MismatchCalibration, reconstruction_heatmap
from geokernels.anomaly.checkpoint import CheckpointError, load_checkpoint
from geokernels.anomaly.train import TrainConfig, TrainResult, load_trained_model, train

__all__ = ["train", "TrainConfig", "TrainResult", "load_trained_model", "reconstruction_heatmap",
           "MismatchCalibration", "CheckpointError", "load_checkpoint"]
