"""Segmentation with shape priors: training, evaluation and the results table.

    from geokernels.segment import TrainConfig, train, evaluate
    train(TrainConfig(dataset="shapes", prior="qc2", steps=300), "runs/qc2")
    evaluate("runs/qc2/checkpoint.pt", "runs/qc2/eval")

or from the command line: ``geokernels segment train|eval|table`` (see ``geokernels.segment.cli``).
"""
from geokernels.segment.datasets import DATASETS, make_dataset
from geokernels.segment.evaluate import METRICS, evaluate, segmentation_metrics
from geokernels.segment.train import (BASE_LOSSES, DEFAULT_PRIOR_WEIGHTS, PRIORS, TrainConfig,
                                      build_model, train)

__all__ = ["DATASETS", "make_dataset", "METRICS", "evaluate", "segmentation_metrics",
           "BASE_LOSSES", "DEFAULT_PRIOR_WEIGHTS", "PRIORS", "TrainConfig", "build_model", "train"]
