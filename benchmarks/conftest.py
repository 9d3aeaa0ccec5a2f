import os
import shutil

# Triton on a CPU-only machine runs through the interpreter (set before any @triton.jit).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
