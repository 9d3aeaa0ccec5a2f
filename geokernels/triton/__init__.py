"""Triton kernels, wrapped as torch.library custom ops (namespace geokernels_triton).

Import a module here only when a Triton backend is requested: importing triton is slow, and on
CPU the kernels need TRITON_INTERPRET=1 set before the first @triton.jit is created.
"""
