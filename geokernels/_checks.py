"""Value checks (NaN/Inf) that need a pass over the data.

Shape, dtype and parameter checks always run (they are free). Value checks run by default on
CPU tensors only: on CUDA they would force a host-device sync the user did not ask for. One
switch for every op: ``geokernels.set_checks("always" | "cpu" | "never")``.
"""
from __future__ import annotations

import torch

_MODES = ("always", "cpu", "never")
_mode = "cpu"


def set_checks(mode: str) -> None:
    """Choose when ops scan their inputs for NaN/Inf: "always", "cpu" (default) or "never"."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


def get_checks() -> str:
    return _mode


def check_finite(t: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` if ``t`` holds NaN or Inf (subject to set_checks)."""
    if _mode == "never" or torch.compiler.is_compiling():
        return
    if _mode == "cpu" and t.device.type != "cpu":
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
