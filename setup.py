"""Build geokernels._C: C++ CPU kernels always; CUDA kernels when torch is a CUDA build and a
CUDA toolkit is found (no GPU needed to compile).

Environment:
  GEOKERNELS_NO_CUDA=1     build the CPU kernels only
  GEOKERNELS_FORCE_CUDA=1  a missing CUDA toolkit is an error instead of a CPU-only build
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "8.0;9.0+PTX": sm_80 and sm_90 code, and
                           PTX that newer GPUs compile when the extension loads)
  CUDA_HOME / CUDA_PATH    toolkit root (found from nvcc on PATH otherwise, through wrappers)
  MAX_JOBS                 parallel compile jobs (ninja)
Install with `pip install --no-build-isolation -e .` so the build uses the torch you run.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _version_key(path: str) -> tuple:
    """/usr/local/cuda-12.10 -> (12, 10): numeric order (text order put 12.10 before 12.9)."""
    return tuple(int(p) for p in re.findall(r"\d+", os.path.basename(path)))


def nvcc_version(cuda_home: str) -> str | None:
    """'13.0' from `nvcc --version` of the toolkit at ``cuda_home`` (None if it cannot say)."""
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def find_cuda_home(torch_cuda: str | None = None) -> str | None:
    """The real CUDA toolkit root. `nvcc` on PATH may be a symlink or a wrapper script
    (e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`); follow both before guessing. Guessing
    among /usr/local/cuda-*, a toolkit of torch's CUDA major version (``torch_cuda``) comes
    first, then the newest."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit_root(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if _is_toolkit_root(root):
            return root
        try:  # a wrapper script: look for the nvcc path it execs
            with open(real, "r", errors="ignore") as fh:
                text = fh.read(4096)
            for cand in re.findall(r"(/[^\s'\"]+)/bin/nvcc", text):
                if _is_toolkit_root(cand):
                    return cand
        except OSError:
            pass
    major = torch_cuda.split(".")[0] if torch_cuda else None
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: (
        _version_key(p)[:1] == (int(major),) if major else False, _version_key(p)), reverse=True)
    candidates = versioned + ["/usr/local/cuda", "/opt/cuda"]
    for cand in candidates:
        if _is_toolkit_root(cand):
            return cand
    return None


def main() -> None:
    import torch   # (torch.utils.cpp_extension reads CUDA_HOME when imported: after it is set)

    want_cuda = not _truthy("GEOKERNELS_NO_CUDA")
    cuda_home = find_cuda_home(torch.version.cuda) if want_cuda else None
    mismatch = None
    if cuda_home and torch.version.cuda:
        found = nvcc_version(cuda_home)
        if found and found.split(".")[0] != torch.version.cuda.split(".")[0]:
            mismatch = (f"the CUDA toolkit at {cuda_home} is CUDA {found}, but torch "
                        f"{torch.__version__} was built with CUDA {torch.version.cuda}; "
                        f"torch's extension builder refuses mixed major versions. Point "
                        f"CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]}.x toolkit, or "
                        f"set GEOKERNELS_NO_CUDA=1 for a CPU-only build")
            cuda_home = None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
        if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():   # unset or empty
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = bool(want_cuda and cuda_home and torch.version.cuda)
    if _truthy("GEOKERNELS_FORCE_CUDA") and not with_cuda:
        sys.exit(
            "GEOKERNELS_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
            + (mismatch or f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit root="
               f"{cuda_home!r}. Install a CUDA build of torch and a CUDA toolkit (set CUDA_HOME)."))
    if mismatch:
        print(f"geokernels: WARNING: building the CPU kernels only: {mismatch}.", file=sys.stderr)

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["python/bindings.cpp"]
    # Match torch's std::string ABI explicitly (recent cpp_extension versions assume the new
    # ABI): strings cross into libc10 in every error path, and a mismatch crashes there.
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    define_macros = [("GEOKERNELS_TORCH_VERSION", '"%s"' % torch.__version__),
                     ("_GLIBCXX_USE_CXX11_ABI", str(abi))]
    cxx_flags = ["-O3", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-psabi"]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]

    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros += [("GEOKERNELS_WITH_CUDA", None),
                          ("GEOKERNELS_CUDA_VERSION_STRING", '"%s"' % torch.version.cuda),
                          # what the kernels were compiled for: checked against the GPU at run
                          # time (an sm_75 card cannot run sm_80 code or compute_90 PTX)
                          ("GEOKERNELS_CUDA_ARCHS",
                           '"%s"' % os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip())]
        ext = CUDAExtension(
            "geokernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension(
            "geokernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])

    print(f"geokernels: building with CUDA={'yes (' + cuda_home + ')' if with_cuda else 'no'}, "
          f"torch {torch.__version__}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}",
          file=sys.stderr)

    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})


if __name__ == "__main__":  # also true under the PEP 517/660 setuptools backends
    main()
