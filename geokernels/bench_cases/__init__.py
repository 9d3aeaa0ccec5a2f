"""Benchmark cases, one module per op family (registered on import)."""
from geokernels.bench_cases import dconvex  # noqa: F401
from geokernels.bench_cases import midpoint  # noqa: F401

# contour flow
from geokernels.bench_cases import contour_flow  # noqa: F401

# flow mismatching
from geokernels.bench_cases import flow_mismatch  # noqa: F401,E402
