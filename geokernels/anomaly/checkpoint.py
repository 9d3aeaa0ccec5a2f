"""Checkpoint files of the flow-matching detector: atomic writes and loads with clear errors.

Two kinds share these helpers (the ``format`` key tells them apart):

* ``TRAIN_FORMAT``: a training checkpoint (``geokernels.anomaly.train``): model config, raw and EMA
  weights, optimiser and scheduler state, step, RNG states, training config. Resumable.
* ``DETECTOR_FORMAT``: a detector (``FlowMismatchDetector.save``): per-member config + EMA weights,
  class names, scoring settings, optional calibration statistics. Small; what is shipped.

Files are written to a temporary file in the same folder and moved into place with ``os.replace``
(atomic on POSIX and Windows), so an interrupted save never leaves a truncated checkpoint behind.
Files are read with ``torch.load(weights_only=True)``: no arbitrary code runs on load.
"""
from __future__ import annotations

import os

import torch

from geokernels._files import write_atomic

TRAIN_FORMAT = "geokernels.flow_matching.train"
DETECTOR_FORMAT = "geokernels.flow_mismatch.detector"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, or not a geokernels flow-matching checkpoint."""


def save_atomic(obj: dict, path: str | os.PathLike) -> str:
    """torch.save ``obj`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    return write_atomic(path, lambda fh: torch.save(obj, fh), binary=True)


def load_checkpoint(path: str | os.PathLike, formats=(TRAIN_FORMAT, DETECTOR_FORMAT),
                    map_location="cpu", max_version: int = FORMAT_VERSION) -> dict:
    """Load and sanity-check a checkpoint (of one of ``formats``, version <= ``max_version``).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        CheckpointError (a ValueError): the file is truncated/corrupt, not a torch file, or not
            one of ``formats``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, expected a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): corrupt or truncated")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip/pickle errors, EOF, unpickling refusals: all mean "bad file"
        raise CheckpointError(
            f"checkpoint {path!r} could not be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the file is corrupt, truncated, "
            f"or not a geokernels checkpoint") from exc
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"checkpoint {path!r} is not a geokernels flow-matching checkpoint "
            f"(format {found!r}; expected one of {tuple(formats)})")
    if int(obj.get("version", 0)) > max_version:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {obj.get('version')}, newer than this "
            f"geokernels understands ({max_version}); upgrade geokernels")
    return obj
