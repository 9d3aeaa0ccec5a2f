"""pytest-benchmark suite over every registered benchmark case (geokernels/bench_cases).

    pytest benchmarks/ --benchmark-only [--benchmark-group-by=param:case_id]

Each case runs for the reference (eager), torch.compile(reference) and every fused backend
available here, so ratios come from the same run. Sizes: the issues' acceptance sizes; set
GEOKERNELS_BENCH_QUICK=1 for small ones.
"""
import os

import pytest
import torch

from geokernels import benchmark as gkbench

DEVICE = torch.device(os.environ.get("GEOKERNELS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
QUICK = os.environ.get("GEOKERNELS_BENCH_QUICK", "0") == "1"


def _params():
    gkbench._load_cases()
    out = []
    for factory in gkbench._CASES:
        for case in factory(DEVICE, QUICK):
            impls = ["reference"] + (["compiled"] if case.compile_reference else []) + gkbench.fused_impls(case.op, DEVICE)
            for impl in impls:
                out.append(pytest.param(case, impl, id=f"{case.op}[{case.label}]-{impl}"))
    return out


_EXPECTED: dict[int, object] = {}


def _expected(case):
    """What every row of ``case`` must compute: Case.expected(), else the reference's output
    (once per case)."""
    if id(case) not in _EXPECTED:
        _EXPECTED[id(case)] = (case.expected or case.make_step("reference"))()
    return _EXPECTED[id(case)]


@pytest.mark.parametrize("case,impl", _params())
def test_kernel(benchmark, case, impl):
    step = case.make_step(impl)
    out = step()  # warm-up (and compilation for the "compiled" row)
    if impl != "reference":   # a fast wrong kernel fails here instead of getting a timing
        gkbench.check_output(impl, out, _expected(case), case.rtol)
    del out

    def run():
        step()
        gkbench.synchronize(DEVICE)

    benchmark.group = f"{case.op} {case.label}"
    benchmark(run)
