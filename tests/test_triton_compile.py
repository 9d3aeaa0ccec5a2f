"""Every Triton kernel launch the ops make compiles for a GPU (sm_90), checked on a CPU machine.

The suite runs the Triton kernels through the interpreter, which accepts code that compiled
Triton rejects (shapes that are not constexpr powers of two, calls the code generator does not
support, type clashes) and never sees a GPU's argument typing. Here each op runs once on small
CPU tensors (interpreter) with every launch recorded: kernel, argument types, constexpr values.
A subprocess without TRITON_INTERPRET then compiles each distinct launch with
``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` down to a cubin, with the ptxas that
ships inside the triton wheel: no GPU or driver needed.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import geokernels

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
                    torch.bfloat16: "bf16", torch.int32: "i32", torch.int64: "i64",
                    torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _describe(fn, args, kwargs):
    """(signature, constexprs) of one launch, JSON-serialisable (Triton's own typing rules)."""
    import inspect

    params = inspect.signature(fn.fn).parameters
    kwargs = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
    bound = dict(zip(fn.arg_names, args), **kwargs)
    sig, consts = {}, {}
    for name in fn.arg_names:
        value = bound.get(name, params[name].default)
        if "constexpr" in str(params[name].annotation) or value is None:
            sig[name] = "constexpr"
            if isinstance(value, triton.language.dtype):
                value = {"dtype": value.name}
            consts[name] = value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TORCH_TO_TRITON[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.fn.__name__}: argument {name} of type {type(value).__name__}")
    return sig, consts


def _drive_every_op():
    """Forward and backward of every op with a Triton backend, float32 and float64, small."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        def rand(*shape, grad=False):
            return torch.rand(*shape, dtype=dtype, generator=g).requires_grad_(grad)

        u = rand(1, 2, 9, 11, grad=True)
        for act in ("softplus", "relu"):
            for red in ("mean", "none"):
                geokernels.qc2_loss(u, activation=act, reduction=red, backend="triton").sum().backward()
        for red in ("mean", "none"):
            geokernels.qc1_loss(u, window=3, reduction=red, backend="triton").sum().backward()
            geokernels.contour_flow_loss(u, rand(1, 4, 9, 11) - 0.5, reduction=red,
                                         backend="triton").sum().backward()
        for method in ("c2", "c1"):
            geokernels.cgpm(rand(1, 1, 9, 11) - 0.5, steps=2, method=method, return_history=True,
                            backend="triton")
        for mode in ("jacobi", "fast"):
            geokernels.midpoint_convexify(u, radius=1.5, max_iters=4, mode=mode,
                                          backend="triton").sum().backward()
        for q_nonneg, halfsize in ((False, 2), (True, 12)):   # 12: the window loop must not unroll
            o = rand(1, 1, 9, 11, grad=True)
            geokernels.cfss_iterate(o, rand(1, 2, 9, 11), iters=3, halfsize=halfsize,
                                    q_nonneg=q_nonneg, backend="triton").sum().backward()
        x = rand(2, 3, 8, 8)
        # all paths per call, fewer than K (delta + aggregate), noise cached or regenerated
        for K, agg, chunk, noise_cache in ((3, "min", None, None), (3, "mean", 2, False),
                                           (3, "median", 2, True), (3, "min", 6, True),
                                           (3, "quantile:1", None, None), (3, "median", None, None),
                                           (40, "median", None, None)):
            geokernels.flow_mismatch(lambda xt, t, cond=None: 0.5 * xt, x, K=K, T=2, agg=agg,
                                     chunk=chunk, noise_cache=noise_cache, backend="triton")


_COMPILE = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    failures = []
    for job in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(job["module"]), job["name"])
        consts = {k: triton.language.dtype(v["dtype"]) if isinstance(v, dict) else v
                  for k, v in job["consts"].items()}
        try:
            triton.compile(ASTSource(fn=kernel, signature=job["sig"], constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options=job["options"])
        except Exception as exc:
            failures.append(f"{job['name']} {job['sig']} {job['consts']}: "
                            f"{type(exc).__name__}: {str(exc)[-1500:]}")
    print(json.dumps(failures))
""")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records interpreter launches")
def test_every_launch_compiles_for_sm90(monkeypatch, tmp_path):
    from triton.runtime import interpreter

    jobs = {}
    real_run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        sig, consts = _describe(self, args, kwargs)
        options = {k: v for k, v in kwargs.items() if k in _LAUNCH_OPTIONS}
        job = {"module": self.fn.__module__, "name": self.fn.__name__, "sig": sig, "consts": consts,
               "options": options}
        jobs[json.dumps(job, sort_keys=True)] = job
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)
    _drive_every_op()
    launched = {job["name"] for job in jobs.values()}
    kernels = set()
    for module in ("qc_loss", "cgpm", "midpoint", "cfss", "contour_flow", "flow_mismatch"):
        mod = __import__(f"geokernels.triton.{module}", fromlist=["_"])
        kernels |= {n for n, v in vars(mod).items()
                    if n.endswith("_kernel") and isinstance(v, interpreter.InterpretedFunction)}
    assert len(kernels) >= 19 and launched == kernels, f"never launched: {sorted(kernels - launched)}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(list(jobs.values())),
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, f"{len(failures)} of {len(jobs)} launches do not compile:\n" + \
        "\n".join(failures)
