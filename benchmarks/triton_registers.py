"""Registers and spills of every Triton kernel launch the ops make, for sm_90, on a machine
without a GPU: the ops run once under the interpreter with launches recorded (the driver of
tests/test_triton_compile.py), each distinct launch is compiled with triton.compile for
GPUTarget("cuda", 90, 32) and its PTX assembled by the wheel's ptxas -v (sm_90a).

    TRITON_INTERPRET=1 python benchmarks/triton_registers.py [name filter]

Prints one line per launch: kernel, constexprs, pointer dtypes, compile seconds, ptxas's
"stack frame / spill stores / spill loads" and register count. A launch that spills is a
performance bug on the GPU even when every test passes.
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_COMPILE = r'''
import glob, importlib, json, os, subprocess, sys, tempfile, time
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))[0]
for job in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(job["module"]), job["name"])
    consts = {k: triton.language.dtype(v["dtype"]) if isinstance(v, dict) else v
              for k, v in job["consts"].items()}
    t0 = time.time()
    c = triton.compile(ASTSource(fn=kernel, signature=job["sig"], constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options=job["options"])
    seconds = time.time() - t0
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(c.asm["ptx"])
    r = subprocess.run([ptxas, "-v", "-arch=sm_90a", fh.name, "-o", os.devnull],
                       capture_output=True, text=True)
    os.unlink(fh.name)
    info = [line.split("info    : ")[-1].strip() for line in r.stderr.splitlines()
            if "Used" in line or "spill" in line]
    consts = {k: v["dtype"] if isinstance(v, dict) else v for k, v in job["consts"].items()
              if k not in ("BH", "BW")}
    ptrs = ",".join(sorted({v for v in job["sig"].values() if v.startswith("*")}))
    print(f"{job['name']:<26} {consts} {ptrs} {job['options'] or ''} {seconds:.1f}s | "
          + " | ".join(info), flush=True)
'''


def main(name_filter: str = "") -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the ops run under the interpreter to record launches)")
    from triton.runtime import interpreter

    from tests import test_triton_compile as tc

    jobs = {}
    real_run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        sig, consts = tc._describe(self, args, kwargs)
        options = {k: v for k, v in kwargs.items() if k in tc._LAUNCH_OPTIONS}
        job = {"module": self.fn.__module__, "name": self.fn.__name__, "sig": sig,
               "consts": consts, "options": options}
        jobs[json.dumps(job, sort_keys=True)] = job
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    tc._drive_every_op()
    selected = [j for j in jobs.values() if name_filter in j["name"] or name_filter in j["module"]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(selected), text=True,
                   env=env, check=True)


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    main(sys.argv[1] if len(sys.argv) > 1 else "")
