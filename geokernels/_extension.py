"""Loading the compiled extension ``geokernels._C`` and checking it matches the running torch.

* Built against another torch than the one running: a clear ImportError saying how to rebuild
  (a mismatched binary would crash or fail with undefined symbols).
* Not built at all (e.g. a source checkout on PYTHONPATH): ops fall back to the pure-PyTorch
  reference backend, and the first such op call warns once.
"""
from __future__ import annotations

import importlib
import sys
import warnings

import torch

REBUILD_HINT = (
    "Rebuild it against the torch you run: "
    "`pip install --no-build-isolation --force-reinstall --no-deps -e .` in the geokernels "
    "source tree (or `python setup.py build_ext --inplace`)."
)

_C = None
_missing_reason: str | None = None
_warned = False


def _base_version(v: str) -> str:
    return v.split("+")[0]


def _load():
    global _C, _missing_reason
    try:
        # import_module (not `from geokernels import _C`, which raises a plain ImportError) so a
        # missing binary is told apart from one that exists but cannot load
        mod = importlib.import_module("geokernels._C")
    except ModuleNotFoundError as exc:
        if exc.name != "geokernels._C":
            raise
        import glob
        import os
        from importlib.machinery import EXTENSION_SUFFIXES

        here = os.path.dirname(os.path.abspath(__file__))
        ours = tuple(s for s in EXTENSION_SUFFIXES if s.count(".") > 1)   # tagged ones
        other = sorted(os.path.basename(p) for p in glob.glob(os.path.join(here, "_C.*"))
                       if p.endswith((".so", ".pyd")) and not p.endswith(ours))
        _missing_reason = ("geokernels._C is not built" if not other else
                           f"geokernels._C is built for another Python ({', '.join(other)}), not "
                           f"this one ({sys.version.split()[0]})")
        return
    except ImportError as exc:  # undefined symbols etc.: almost always a torch ABI mismatch
        raise ImportError(
            f"geokernels._C could not be loaded with torch {torch.__version__}: {exc}. "
            f"It was most likely built against another torch. {REBUILD_HINT}") from exc
    built = getattr(mod, "TORCH_VERSION", None)
    # the full version when the build recorded it ("2.14.1a0+git...": exact), else its base
    if built is None or (str(built) != torch.__version__
                         and _base_version(str(built)) != _base_version(torch.__version__)):
        raise ImportError(
            f"geokernels._C was built against torch {built}, but torch {torch.__version__} is "
            f"running. {REBUILD_HINT}")
    _C = mod


_load()


def compiled() -> bool:
    """True if the C++ extension is loaded."""
    return _C is not None


def cuda_compiled() -> bool:
    """True if the extension contains the CUDA kernels."""
    return _C is not None and bool(_C.cuda_compiled())


def extension():
    return _C


def parse_cuda_archs(text) -> list[tuple[tuple[int, int], str]] | None:
    """TORCH_CUDA_ARCH_LIST text ("8.0;9.0+PTX", "7.5 8.6", "9.0a") as [((major, minor), kind)]
    with kind "sass" (cubin), "ptx" (cubin and PTX) or "exact" (an arch-specific "a" cubin);
    None when it cannot say (unset, or named archs such as "Ampere")."""
    import re

    out = []
    for item in re.split(r"[;,\s]+", str(text or "").strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", item)
        if not m:
            return None
        kind = "ptx" if m.group(4) else ("exact" if m.group(3) else "sass")
        out.append(((int(m.group(1)), int(m.group(2))), kind))
    return out or None


def archs_run_on(archs, capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` runs on a GPU of ``capability``: a cubin runs on its
    major version at the same or a higher minor, PTX on any later GPU (JIT-compiled), an
    arch-specific ("9.0a") cubin on that exact GPU only."""
    for arch, kind in archs:
        if kind == "exact" and arch == tuple(capability):
            return True
        if kind != "exact" and arch[0] == capability[0] and arch[1] <= capability[1]:
            return True
        if kind == "ptx" and arch <= tuple(capability):
            return True
    return False


_ARCH_PROBLEM: dict[int, str | None] = {}


def cuda_arch_problem(device) -> str | None:
    """Why the compiled CUDA kernels cannot run on ``device`` (a GPU older than every arch they
    were built for), or None. Checked once per device."""
    if not cuda_compiled():
        return None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _ARCH_PROBLEM:
        archs = parse_cuda_archs(getattr(_C, "CUDA_ARCHS", None))
        cap = tuple(torch.cuda.get_device_capability(index))
        _ARCH_PROBLEM[index] = None if archs is None or archs_run_on(archs, cap) else (
            f"geokernels._C's CUDA kernels were built for TORCH_CUDA_ARCH_LIST="
            f"{_C.CUDA_ARCHS!r}, which cannot run on cuda:{index} (compute capability "
            f"{cap[0]}.{cap[1]}); rebuild with TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")
    return _ARCH_PROBLEM[index]


def require_ops(*names: str) -> None:
    """ImportError if the loaded extension lacks ops this Python tree declares: a binary built
    from an older checkout (e.g. after a pull without rebuilding). No-op without an extension."""
    if _C is None:
        return
    missing = [n for n in names if not hasattr(torch.ops.geokernels, n)]
    if missing:
        raise ImportError(
            f"geokernels._C is out of date: it lacks the ops {missing} that this source tree "
            f"uses. {REBUILD_HINT}")


def warn_reference_fallback(op: str) -> None:
    """Say once, loudly, that compiled kernels are missing and the slow reference runs."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"geokernels: {_missing_reason or 'no compiled kernel for this device'}; {op} and every "
        f"other op run on the slow pure-PyTorch reference backend. {REBUILD_HINT}",
        RuntimeWarning,
        stacklevel=3,
    )
