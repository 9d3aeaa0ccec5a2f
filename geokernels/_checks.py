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


def tracing(t: torch.Tensor | None = None) -> bool:
    """True where a value check cannot look at data: under torch.compile / export, for a
    functorch-wrapped tensor (vmap, grad, jvp), a fake tensor, or under make_fx's proxy mode.
    Value checks are skipped there (they run in eager calls)."""
    if torch.compiler.is_compiling():
        return True
    if t is not None and (torch._C._functorch.is_functorch_wrapped_tensor(t)
                          or isinstance(t, torch._subclasses.FakeTensor)):
        return True
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None


def values_checked(t: torch.Tensor) -> bool:
    """Whether a value check (a pass over ``t``'s data; a host sync on CUDA) runs on ``t``: per
    set_checks ("always"; "cpu": CPU tensors only; "never"), and never under a tracer."""
    if _mode == "never" or (_mode == "cpu" and t.device.type != "cpu"):
        return False
    return not tracing(t)


def check_finite(t: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` if ``t`` holds NaN or Inf (subject to set_checks)."""
    if not values_checked(t):
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
