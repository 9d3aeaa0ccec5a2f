"""Backend choice shared by every op: ``backend="auto"|"cuda"|"triton"|"cpu"|"torch"``.

auto = the CUDA kernels on CUDA tensors, the C++ kernels on CPU tensors, Triton on CUDA tensors
for ops without a CUDA kernel, and the pure-PyTorch reference only when nothing compiled fits
(said once, loudly). ``GEOKERNELS_BACKEND`` sets the default that ``"auto"`` stands for.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from geokernels import _extension

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

# op name -> backends with a fused implementation (the reference "torch" is always there)
_OPS: dict[str, tuple[str, ...]] = {}

_HAS_TRITON_PACKAGE = importlib.util.find_spec("triton") is not None


def register_op(name: str, backends: tuple[str, ...]) -> None:
    for b in backends:
        if b not in ("cuda", "triton", "cpu"):
            raise ValueError(f"unknown backend {b!r} for op {name!r}")
    _OPS[name] = tuple(backends)


def registered_ops() -> dict[str, tuple[str, ...]]:
    return dict(_OPS)


def triton_usable(device_type: str) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not _HAS_TRITON_PACKAGE:
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(op: str, device_type: str) -> list[str]:
    """Backends that can run ``op`` on tensors of ``device_type`` in this process, in the order
    ``backend="auto"`` prefers them."""
    out = []
    impl = _OPS.get(op, ())
    if (device_type == "cuda" and "cuda" in impl and _extension.cuda_compiled()
            and (not torch.cuda.is_available() or _extension.cuda_arch_problem("cuda") is None)):
        out.append("cuda")
    if device_type == "cpu" and "cpu" in impl and _extension.compiled():
        out.append("cpu")
    if "triton" in impl and triton_usable(device_type):
        out.append("triton")
    out.append("torch")
    return out


# ops whose fused backends have reverse-mode autograd only (torch.library.register_autograd /
# autograd.Function without setup_context): forward-mode AD would silently drop their tangents
_DIFFERENTIABLE = ("qc1_loss", "qc2_loss", "contour_flow_loss", "cfss_iterate",
                   "midpoint_convexify", "cgpm")


def _refuse_unsupported_autodiff(op: str, backend: str, tensor: torch.Tensor) -> None:
    """NotImplementedError, naming the op and the way out, where a fused backend would give a
    wrong result (forward-mode AD: the op's tangent silently dropped) or a cryptic functorch
    error (torch.func.grad/jacrev/vjp/jvp); vmap is left alone (PyTorch loops over the batch)."""
    if backend == "torch" or op not in _DIFFERENTIABLE or torch.compiler.is_compiling():
        return
    import torch.autograd.forward_ad as fwAD

    what = None
    if torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        interpreter = torch._C._functorch.peek_interpreter_stack()
        kind = None if interpreter is None else interpreter.key()
        if kind == torch._C._functorch.TransformType.Jvp:
            what = "torch.func.jvp / jacfwd (forward-mode AD)"
        elif kind == torch._C._functorch.TransformType.Grad:
            what = "torch.func.grad / vjp / jacrev"
    elif fwAD._current_level >= 0 and fwAD.unpack_dual(tensor).tangent is not None:
        what = "forward-mode AD (torch.autograd.forward_ad)"
    if what is not None:
        raise NotImplementedError(
            f"{op}: {what} is not supported by the fused {backend!r} backend (reverse-mode "
            f"autograd only); use backend='torch' (the reference) under these transforms, or "
            f"plain loss.backward()")


def resolve(op: str, backend: str | None, tensor: torch.Tensor) -> str:
    """The backend that will run ``op`` on ``tensor``; ValueError for an impossible request,
    NotImplementedError for an autodiff transform the fused backends cannot serve."""
    chosen = _resolve(op, backend, tensor)
    _refuse_unsupported_autodiff(op, chosen, tensor)
    return chosen


_ARCH_WARNED: set[str] = set()


def _warn_arch_once(problem: str) -> None:
    """backend="auto" on a GPU the CUDA kernels were not built for: say so once, then use
    Triton (or the reference)."""
    if problem not in _ARCH_WARNED:
        _ARCH_WARNED.add(problem)
        import warnings

        warnings.warn(f"geokernels: {problem}; backend='auto' uses Triton (or the reference) "
                      f"on it instead", RuntimeWarning, stacklevel=4)


def check_backend(backend) -> str:
    """``backend`` if it names one of BACKENDS, else a ValueError naming the argument (what the
    ops' resolve() does at a call; modules and pipelines call it when they are configured)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def default_backend() -> str:
    """What ``backend="auto"`` stands for: GEOKERNELS_BACKEND if set, else "auto"; a ValueError
    naming the variable for a value that is not a backend."""
    value = os.environ.get("GEOKERNELS_BACKEND", "auto") or "auto"
    if value not in BACKENDS:
        raise ValueError(f"the environment variable GEOKERNELS_BACKEND must be one of "
                         f"{BACKENDS}, got {value!r}")
    return value


def _resolve(op: str, backend: str | None, tensor: torch.Tensor) -> str:
    if backend is None or backend == "auto":
        backend = default_backend()
    check_backend(backend)
    impl = _OPS[op]
    dev = tensor.device.type
    if dev == "meta" and backend in ("auto", "cpu") and "cpu" in impl and _extension.compiled():
        return "cpu"  # meta tensors (shape inference): the dispatcher runs the fake kernels
    if backend == "auto":
        if dev == "cuda" and "cuda" in impl and _extension.cuda_compiled():
            problem = _extension.cuda_arch_problem(tensor.device)
            if problem is None:
                return "cuda"
            _warn_arch_once(problem)
        if dev == "cuda" and "triton" in impl and triton_usable("cuda"):
            return "triton"
        if dev == "cpu" and "cpu" in impl and _extension.compiled():
            return "cpu"
        _extension.warn_reference_fallback(op)
        return "torch"
    if backend == "torch":
        return "torch"
    if backend not in impl:
        raise ValueError(
            f"backend={backend!r} is not implemented for {op}; it has {('torch',) + impl}")
    if backend == "cuda":
        if dev != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, but the input of {op} is on {dev}")
        if not _extension.cuda_compiled():
            raise ValueError(
                "backend='cuda' requested but geokernels._C was built without CUDA kernels "
                f"({'not built' if not _extension.compiled() else 'CPU-only build'}). "
                + _extension.REBUILD_HINT)
        problem = _extension.cuda_arch_problem(tensor.device)
        if problem is not None:
            raise ValueError(f"backend='cuda': {problem}")
    elif backend == "cpu":
        if dev != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, but the input of {op} is on {dev}")
        if not _extension.compiled():
            raise ValueError("backend='cpu' requested but geokernels._C is not built. "
                             + _extension.REBUILD_HINT)
    elif backend == "triton":
        if not _HAS_TRITON_PACKAGE:
            raise ValueError("backend='triton' requested but the triton package is not installed")
        if not triton_usable(dev):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"the input of {op} is on {dev}")
    return backend


def resolve_device(device) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu", "cuda", "cuda:N" as given; anything else,
    or "cuda" without a GPU, is a ValueError naming ``device`` (TypeError for a non-string)."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu' or 'cuda', got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use --device cpu")
    return torch.device(device)
