"""Kernel benchmarks shared by ``geokernels bench``, ``benchmarks/`` (pytest-benchmark) and
``benchmarks/gpu_check.sh``: each fused backend against the reference, eager and compiled, in the
same run, with effective bandwidth and peak memory.

An op family adds cases with :func:`register_case`. A case builds its inputs once and returns,
for an implementation name ("reference", "compiled", or a backend like "cpu"/"cuda"/"triton"),
a zero-argument step function that runs the workload (forward + backward where the op has one)
and returns what it computed (the value, then the gradients of a fwd+bwd step). Each row's
warm-up output is compared with the reference's (or with ``Case.expected()`` where the reference
draws other random numbers): a fast wrong kernel is still timed but gets a MISMATCH note and no
speed-up.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

from geokernels import _backend


@dataclasses.dataclass
class Case:
    op: str
    label: str
    make_step: Callable[[str], Callable[[], object]]
    nbytes: int  # the minimum bytes a fused implementation must move per step
    compile_reference: bool = True
    # what every row's output must match (default: the reference step's own output)
    expected: Callable[[], object] | None = None
    rtol: float = 1e-4  # relative L2 error allowed per output tensor (float32 workloads)
    # False where the reference is not torch (scipy/numpy): torch's memory probes cannot see it
    reference_memory: bool = True


def impl_fn(impl: str, reference_fn, op):
    """What a case's row runs: the reference, torch.compile(reference), or the op on a fused
    backend."""
    if impl == "reference":
        return reference_fn
    if impl == "compiled":
        return torch.compile(reference_fn)
    return functools.partial(op, backend=impl)


# On a GPU the acceptance sizes fit in L2 (an H200 has ~50 MB): their GB/s says little about
# DRAM. The memory-bound losses are therefore also run at a DRAM-sized shape there.
DRAM_SHAPE = (32, 1, 1024, 1024)   # 128 MiB of float32 per tensor


def case_shapes(device: torch.device, quick: bool, shape: tuple) -> list[tuple]:
    """``shape``, and DRAM_SHAPE too on CUDA at full size."""
    return [shape] + ([DRAM_SHAPE] if device.type == "cuda" and not quick else [])


class OutputMismatch(AssertionError):
    """A benchmarked implementation computed something other than the reference."""


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a step's output, in order (numpy arrays, e.g. scipy's, converted)."""
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    import numpy as np

    if isinstance(out, np.ndarray):
        return [torch.from_numpy(out)]
    raise TypeError(f"a benchmark step returned {type(out).__name__}; expected tensors")


def check_output(impl: str, out, expected, rtol: float) -> None:
    """OutputMismatch unless every tensor of ``out`` matches ``expected`` (shape, and relative L2
    error <= rtol, NaN/Inf in the same places)."""
    got, want = _tensors(out), _tensors(expected)
    if len(got) != len(want):
        raise OutputMismatch(f"MISMATCH: {impl} returned {len(got)} tensors, the reference "
                             f"{len(want)}")
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            raise OutputMismatch(f"MISMATCH: output {i} has shape {tuple(a.shape)}, the "
                                 f"reference's {tuple(b.shape)}")
        fin = torch.isfinite(b)
        na, nb = a[~fin], b[~fin]   # NaN where NaN, the same infinities where infinite
        if not (torch.equal(fin, torch.isfinite(a)) and torch.equal(na.isnan(), nb.isnan())
                and torch.equal(na[~nb.isnan()], nb[~nb.isnan()])):
            raise OutputMismatch(f"MISMATCH: output {i} has NaN/Inf where the reference has not")
        a, b = a[fin], b[fin]
        err = float((a - b).norm() / b.norm().clamp_min(1e-300))
        if err > rtol and float((a - b).abs().max()) > 1e-12:
            raise OutputMismatch(f"MISMATCH: output {i} rel. L2 error {err:.2e} > {rtol:.0e}")


@dataclasses.dataclass
class Result:
    op: str
    label: str
    impl: str
    ms: float
    speedup_vs_reference: float | None = None
    speedup_vs_compiled: float | None = None
    gbps: float | None = None
    peak_mb: float | None = None
    note: str = ""
    fraction_of_copy: float | None = None  # gbps / measured device copy bandwidth

    def as_dict(self):
        return dataclasses.asdict(self)


_CASES: list[Callable[[torch.device, bool], list[Case]]] = []


class UnknownOpError(ValueError):
    """``run(ops=...)`` named an op that no registered benchmark case times."""


def _first_line(exc: BaseException) -> str:
    """'Type: first line of the message' (an exception may have an empty message: a bare
    assert inside Triton or Inductor)."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:80] if lines else ''}"


def register_case(factory: Callable[[torch.device, bool], list[Case]] | None = None, *,
                  op: str | None = None):
    """Register ``factory(device, quick) -> [Case]``; usable as a decorator, bare or as
    ``@register_case(op="name")``. Naming the op the factory's cases belong to lets ``run(ops=...)``
    skip building the inputs (or loading the checkpoint) of the ops it does not time."""
    def add(f):
        f.bench_op = op
        _CASES.append(f)
        return f
    return add if factory is None else add(factory)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SLOW_STEP_S = 2.0  # a step slower than this is timed once more, not repeated


def time_step(step: Callable[[], object], device: torch.device, min_time: float = 0.3,
              max_reps: int = 200, warmup: int = 2,
              on_first: Callable[[object], None] | None = None) -> float:
    """Median wall time of one step in milliseconds (CUDA: device-synchronised events).

    The first call is a warm-up (torch.compile, Triton JIT, cuDNN autotuning happen there) and
    is never judged; ``on_first`` gets its output (the correctness check, before any timing).
    Slow steps (e.g. a reference Jacobi loop taking a minute) are not repeated: when the second
    call exceeds SLOW_STEP_S it is the measurement."""
    first = step()
    synchronize(device)
    if on_first is not None:
        on_first(first)
    del first
    t0 = time.perf_counter()
    step()
    synchronize(device)
    if time.perf_counter() - t0 > SLOW_STEP_S:
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup - 2):
        step()
    synchronize(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start_all < min_time or len(times) < 3):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native layer prints to fd 2; keep the table readable."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            sys.stderr.flush()
            os.dup2(null.fileno(), fd)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> float | None:
    """Peak bytes allocated by torch during one step, above what was live before, in MB."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                  and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


_COPY_BW: dict[str, float] = {}


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), the ceiling
    a memory-bound kernel can approach."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_step(lambda: dst.copy_(src), device, min_time=0.5)
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def fused_impls(op: str, device: torch.device) -> list[str]:
    """Fused backends worth timing on ``device`` (Triton's CPU interpreter is a test aid, not a
    performance path, so it is left out on CPU)."""
    return [b for b in _backend.available_backends(op, device.type)
            if b != "torch" and not (b == "triton" and device.type == "cpu")]


def _load_cases():
    # importing the op families registers their cases
    import geokernels.bench_cases  # noqa: F401


def run(device: str | torch.device = "cpu", ops: list[str] | None = None, quick: bool = False,
        compile_reference: bool = True, memory: bool = True, min_time: float = 0.3,
        progress: bool = True,
        on_case: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Time every registered case on ``device``; one row per (case, implementation).

    ``on_case(rows)`` is called with each case's rows as soon as they are measured (so that a
    run cut short by a time limit still leaves what it measured)."""
    _load_cases()
    device = torch.device(device)
    if isinstance(ops, str):
        ops = [ops]
    named = {getattr(f, "bench_op", None) for f in _CASES}
    if ops is not None and None not in named and set(ops) - named:
        raise UnknownOpError(f"ops: no benchmark cases for {sorted(set(ops) - named)}; "
                             f"known: {sorted(named)}")
    factories = [f for f in _CASES
                 if ops is None or getattr(f, "bench_op", None) in (None, *ops)]
    cases, failed = [], []
    for f in factories:   # one factory failing (a checkpoint, a missing backend) loses its cases only
        try:
            cases += [c for c in f(device, quick) if ops is None or c.op in ops]
        except Exception as exc:
            failed.append(exc)
            warnings.warn(f"bench: the cases of {getattr(f, 'bench_op', f.__name__)} could not be "
                          f"built: {_first_line(exc)}", RuntimeWarning, stacklevel=2)
    if failed and not cases:
        raise failed[0]
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    results: list[Result] = []
    copy_bw = None
    if device.type == "cuda":  # measured once per device and process (the demo runs op by op)
        if str(device) not in _COPY_BW:
            _COPY_BW[str(device)] = copy_bandwidth_gbps(device)
        copy_bw = _COPY_BW[str(device)]
    it = tqdm(cases, desc="bench", disable=not progress) if tqdm else cases
    # CUDA events and streams of the benchmarked device (cuda:1 timed cuda:0's stream before)
    with (torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()):
        _run_cases(it, device, compile_reference, memory, min_time, copy_bw, results, on_case)
    return results


def _run_cases(it, device, compile_reference, memory, min_time, copy_bw, results, on_case):
    for case in it:
        # the fused rows before torch.compile's: a cold compile cut short by a time limit must
        # not take the never-timed kernels' rows with it
        impls = ["reference"] + fused_impls(case.op, device)
        if compile_reference and case.compile_reference:
            impls.append("compiled")
        rows = {}
        expected = []
        if case.expected is not None:
            try:
                expected.append(case.expected())
            except Exception as exc:
                warnings.warn(f"bench: {case.op} [{case.label}]: no expected output, rows "
                              f"unchecked: {_first_line(exc)}", RuntimeWarning, stacklevel=2)

        mismatch: dict[str, str] = {}

        def check(out, impl):
            if impl == "reference":        # its own output is the yardstick unless the case
                if not expected:           # gives one (the reference draws other noise)
                    expected.append(out)
            elif expected:
                try:
                    check_output(impl, out, expected[0], case.rtol)
                except OutputMismatch as exc:   # still timed (a rare GPU run keeps its
                    mismatch[impl] = str(exc)   # numbers), but flagged and given no ratio

        try:
            for impl in impls:
                try:
                    step = case.make_step(impl)
                    ms = time_step(step, device, min_time=min_time,
                                   on_first=lambda out, impl=impl: check(out, impl))
                    slow = ms > 1e3 * SLOW_STEP_S
                    unseen = impl == "reference" and not case.reference_memory
                    peak = (peak_memory_mb(step, device) if memory and not slow and not unseen
                            else None)
                    note = ("slow: timed once, memory pass skipped" if slow and memory else
                            "memory n/a (not torch)" if unseen and memory else "")
                    if impl in mismatch:
                        note = mismatch[impl] + (f"; {note}" if note else "")
                    rows[impl] = Result(
                        case.op, case.label, impl, ms, peak_mb=peak,
                        gbps=case.nbytes / (ms * 1e-3) / 1e9 if case.nbytes else None, note=note)
                except Exception as exc:  # e.g. torch.compile unsupported here: report, go on
                    rows[impl] = Result(case.op, case.label, impl, math.nan,
                                        note=mismatch.get(impl) or _first_line(exc))
        finally:   # also on KeyboardInterrupt (a time limit's SIGINT): keep the measured rows
            _finish_rows(rows, copy_bw, results, on_case)


def mismatched(row: Result) -> bool:
    """True for a row whose output differed from the reference (timed, but given no ratio)."""
    return row.note.startswith("MISMATCH")


def _finish_rows(rows: dict, copy_bw, results: list, on_case) -> None:
    """Speed-up ratios of one case's rows (against its reference / compiled rows), then record."""
    if not rows:
        return
    ref = rows["reference"].ms if "reference" in rows else math.nan
    comp = rows["compiled"].ms if "compiled" in rows else math.nan
    for r in rows.values():
        if not math.isnan(r.ms) and not mismatched(r):
            r.speedup_vs_reference = ref / r.ms if not math.isnan(ref) else None
            r.speedup_vs_compiled = comp / r.ms if not math.isnan(comp) else None
            if copy_bw and r.gbps:
                r.fraction_of_copy = r.gbps / copy_bw
        results.append(r)
    if on_case is not None:
        on_case(list(rows.values()))


def format_table(results: list[Result]) -> str:
    head = ["op", "case", "impl", "ms", "x ref", "x compiled", "GB/s", "% copy BW", "peak MB", "note"]
    rows = []
    for r in results:
        f = lambda v, fmt: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)  # noqa: E731
        rows.append([r.op, r.label, r.impl, f(r.ms, ".3f"), f(r.speedup_vs_reference, ".2f"),
                     f(r.speedup_vs_compiled, ".2f"), f(r.gbps, ".1f"),
                     f(None if r.fraction_of_copy is None else 100 * r.fraction_of_copy, ".0f"),
                     f(r.peak_mb, ".1f"), r.note])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
