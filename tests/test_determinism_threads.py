"""Determinism, thread safety, torch.compile and opcheck coverage of every op (issue 8).

- run to run and across torch thread counts: bit-identical results (CPU kernels reduce over
  fixed blocks, never in thread order)
- flow_mismatch: seeded heatmaps identical across ``chunk`` splits, batch splits (with
  image_index_offset) and noise_cache, for every aggregation
- several Python threads calling the CPU ops at once get the serial results (the dispatcher
  releases the GIL around C++ kernels, so they really overlap)
- torch.compile(fullgraph=True) and torch.library.opcheck: every public op and every registered
  op is covered, here or in its family's test file (checked, so a new op must add coverage)
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch

import geokernels
from tests._op_specs import SPECS, SPECS_BY_NAME, velocity_model

TESTS = Path(__file__).parent


# ---- inputs large enough that every CPU kernel really splits across threads ----------------------
# Each CPU kernel loop is an at::parallel_for(0, n, grain, f) over blocks: it runs as
# min(threads, ceil(n / grain)) tasks, and as ONE task on the calling thread when n <= grain
# (ATen's parallel_for, OpenMP backend). The kernels choose grain so that a task holds at least
# kMinPixelsPerTask pixels (distance: 2**16, qc2: 2**15, qc1/cgpm: 8192; midpoint: 2**24 pair
# evaluations). At the former 37x45 the kernels of distance_transform, contour_flow_field,
# qc2_loss and the midpoint_convexify sweeps therefore ran as one task at any thread count (e.g.
# the EDT row pass: 6 planes x 3 row blocks = 18 blocks <= grain 2**16 // (16 * 45) = 91), so
# the thread-count comparison tested nothing for them. _cpu_loops() below models every
# loop with the constants of csrc/cpu (checked against the sources by
# test_split_model_constants_match_csrc), and test_determinism_inputs_split_every_cpu_loop
# asserts >= 2 tasks at 2 threads for the sizes used here.
SPLIT_HW = (131, 157)  # odd sizes: SIMD tails and partial blocks too
# op -> ((H, W), extra call parameters)
SPLIT_OVERRIDES = {
    # a sweep task holds 2**24 / ((K + 1) * 8 * 64) tiles of 8x64 pixels: at the table's radius 2
    # (K = 6 pairs) 4681 tiles, i.e. 2.4 M pixels; at radius 15 (K = 354) 92 tiles, so 6 planes
    # of 91x125 (12 x 2 tiles each, 144 in all) split in 2. Three sweeps keep the
    # source-tracking forward cheap.
    "midpoint_convexify": ((91, 125), dict(radius=15.0, max_iters=3)),
}


def _split_case(spec):
    """((H, W), params) of the determinism inputs of ``spec``."""
    return SPLIT_OVERRIDES.get(spec.name, (SPLIT_HW, {}))


def _bigger(spec):
    """Inputs large enough to span several parallel tasks (and SIMD tails), and their params."""
    (H, W), params = _split_case(spec)
    shapes = [tuple(arg.shape[:-2]) + (H, W) for arg in spec.tensors]
    torch.manual_seed(3)
    return [a.make(s, a.dtype) for a, s in zip(spec.tensors, shapes)], params


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _midpoint_pairs(radius: float) -> int:
    """K = |D(r)| / 2 (SPEC 1.6; csrc/cpu/midpoint_common.h)."""
    R = int(radius)
    return sum(1 for dy in range(-R, R + 1) for dx in range(-R, R + 1)
               if (dy, dx) != (0, 0) and dy * dy + dx * dx <= radius * radius) // 2


def _cpu_loops(spec, shapes, params):
    """(loop, n blocks, grain) of every at::parallel_for the op's CPU kernels run (csrc/cpu)."""
    B, C, H, W = shapes[0]
    P = B * C  # planes

    def row_blocks(rows, min_pixels):  # row blocks of every plane; grain from a pixel minimum
        return P * _ceil(H, rows), max(1, min_pixels // (rows * W))

    name = spec.name
    if name in ("distance_transform", "contour_flow_field"):  # distance.cpp
        return [("column pass", P * _ceil(W, 256), max(1, 2**16 // (256 * H))),
                ("row pass / field pass", *row_blocks(16, 2**16))]
    if name == "qc2_loss":  # qc_loss.cpp
        return [("forward / backward", *row_blocks(16, 2**15))]
    if name in ("qc1_loss", "cgpm"):  # qc1_loss.cpp, cgpm.cpp
        return [("row blocks", *row_blocks(16, 8192))]
    if name in ("contour_flow_loss", "cfss_iterate"):  # contour_flow.cpp, cfss.cpp: grain 1
        return [("row blocks", *row_blocks(32, 1)), ("planes", P, 1)]
    if name == "midpoint_convexify":  # midpoint.cpp
        K = _midpoint_pairs(params["radius"])
        return [("jacobi sweep tiles", P * _ceil(H, 8) * _ceil(W, 64),
                 max(1, 2**24 // ((K + 1) * 8 * 64))),
                ("backward planes", P, 1)]
    if name in ("flow_mismatch", "flow_mismatch_noise"):  # flow_mismatch_kernel.h: grain 1
        paths = B * 3  # K = 3 in the table
        return [("noise / paths", paths * _ceil(C * H * W, 4096), 1),
                ("delta / accumulate", B * _ceil(H * W, 256), 1)]
    return None


# the constants _cpu_loops uses, as the sources spell them
CSRC_CONSTANTS = {
    "distance.cpp": ["kColsPerBlock = 256", "kRowsPerBlock = 16", "kMinPixelsPerTask = 1 << 16",
                     "grain_for(kColsPerBlock * H)", "grain_for(kRowsPerBlock * W)"],
    "qc_loss.cpp": ["kRowsPerBlock = 16", "kMinPixelsPerTask = 1 << 15"],
    "qc1_loss.cpp": ["kRowsPerBlock = 16", "kMinPixelsPerTask = 8192"],
    "cgpm.cpp": ["kRowsPerBlock = 16", "kMinPixelsPerTask = 8192"],
    "contour_flow.cpp": ["kRowsPerBlock = 32", "at::parallel_for(0, planes * row_blocks, 1,"],
    "cfss.cpp": ["kRowsPerBlock = 32", "at::parallel_for(p0 * row_blocks, p1 * row_blocks, 1,",
                 "at::parallel_for(0, planes, 1,"],
    "midpoint.cpp": ["kTileRows = 8", "kTileCols = 64",
                     "(int64_t{1} << 24) / ((pairs.K + 1) * kTileRows * kTileCols)"],
    "flow_mismatch_kernel.h": ["kFmElemBlock = 4096", "kFmPixBlock = 256"],
}


def _run(spec, tensors, params=None):
    """Output (and gradient w.r.t. the first tensor for differentiable ops), detached."""
    leaves = [t.detach().clone().requires_grad_(spec.differentiable and i == 0)
              for i, t in enumerate(tensors)]
    out = spec.output(spec.call(*leaves, **(params or {})))
    if spec.differentiable:
        cot = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        (g,) = torch.autograd.grad(out, leaves[0], cot)
        return out.detach(), g
    return out.detach(), None


def _same(a, b):
    return torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))


# the [noise] variant adds nothing here (same kernels)
DET_SPECS = [s for s in SPECS if s.name != "flow_mismatch[noise]"]


@pytest.mark.parametrize("spec", DET_SPECS, ids=lambda s: s.name)
def test_deterministic_run_to_run_and_across_thread_counts(spec):
    tensors, params = _bigger(spec)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (threads, threads, 1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run(spec, tensors, params))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert _same(results[0], r), spec.name


@pytest.mark.parametrize("spec", [s for s in DET_SPECS if s.backend_op is not None],
                         ids=lambda s: s.name)   # the ops with CPU kernels (not pure PyTorch)
def test_determinism_inputs_split_every_cpu_loop(spec):
    """At 2 threads every CPU kernel loop of the op runs as >= 2 tasks on the inputs above."""
    tensors, params = _bigger(spec)
    loops = _cpu_loops(spec, [tuple(t.shape) for t in tensors], params)
    assert loops, f"{spec.name}: add its CPU kernel loops to _cpu_loops"
    for what, n, grain in loops:
        tasks = 1 if n <= grain else min(2, _ceil(n, grain))
        assert tasks >= 2, f"{spec.name} {what}: {n} blocks with grain {grain} run as one task"


def test_split_model_constants_match_csrc():
    csrc = TESTS.parent / "csrc" / "cpu"
    if not csrc.is_dir():
        pytest.skip("no csrc/ next to the tests (installed package)")
    stale = []
    for file, needles in CSRC_CONSTANTS.items():
        text = " ".join((csrc / file).read_text().split())
        stale += [f"{file}: {n}" for n in needles if n not in text]
    assert not stale, f"CPU parallel grains changed; update _cpu_loops and the sizes: {stale}"


@pytest.mark.parametrize("agg", ["min", "mean", "median", "quantile:0.75"])
def test_flow_mismatch_identical_across_chunks_batches_and_cache(agg):
    torch.manual_seed(1)
    x = torch.randn(4, 2, 9, 11)
    kw = dict(K=3, T=3, agg=agg, seed=2**40 + 7)
    full = geokernels.flow_mismatch(velocity_model, x, **kw)
    for chunk in (1, 2, 3, 5, 6, 12):
        for cache in (True, False):
            out = geokernels.flow_mismatch(velocity_model, x, chunk=chunk, noise_cache=cache, **kw)
            assert torch.equal(out, full), (chunk, cache)
    parts = [geokernels.flow_mismatch(velocity_model, x[i:i + 1], image_index_offset=i, **kw)
             for i in range(4)]
    assert torch.equal(torch.cat(parts), full)
    assert torch.equal(geokernels.flow_mismatch(velocity_model, x, **kw), full)  # run to run
    # and the image score from it
    assert torch.equal(geokernels.anomaly_score(torch.cat(parts)), geokernels.anomaly_score(full))


def test_concurrent_threads_match_serial():
    """4 Python threads x every CPU op, interleaved: each result equals the serial one."""
    jobs = []
    for spec in DET_SPECS:
        for seed in range(2):
            torch.manual_seed(seed)
            tensors = [a.make((2,) + tuple(a.shape[1:-2]) + (23, 19), a.dtype)
                       for a in spec.tensors]
            jobs.append((spec, tensors))
    serial = [_run(spec, tensors) for spec, tensors in jobs]
    results = {}
    errors = []
    barrier = threading.Barrier(4)

    def worker(w):
        try:
            barrier.wait()
            idx = list(range(len(jobs)))
            for order in (idx[w:] + idx[:w], idx[::-1]):  # threads start on different ops
                for j in order:
                    results.setdefault(j, []).append(_run(*jobs[j]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for j, outs in results.items():
        for out in outs:
            assert _same(out, serial[j]), jobs[j][0].name


# ---- torch.compile(fullgraph=True) around every public op ---------------------------------------
# ops whose family test file already compiles them (checked below); the others are compiled here
COMPILED_ELSEWHERE = {
    "qc2_loss": "test_qc2_loss.py",
    "midpoint_convexify": "test_midpoint.py",
    "distance_transform": "test_distance.py",
    "contour_flow_field": "test_flow_field.py",
    "flow_mismatch": "test_flow_mismatch.py",
    # families landing from other branches: their own test files
    "qc1_loss": "test_qc1_loss.py",
    "fidelity_loss": "test_qc1_loss.py",
    "cgpm": "test_cgpm.py",
    "contour_flow_loss": "test_contour_flow_loss.py",
    "cfss_iterate": "test_cfss.py",
}
COMPILED_HERE = [n for n in ("flow_mismatch_noise", "smooth_heatmap", "anomaly_score",
                              "fidelity_loss") if n in SPECS_BY_NAME]
# known gaps (none left; an entry here silences the coverage check for that op)
COMPILE_GAPS: dict[str, str] = {}


@pytest.mark.parametrize("name", COMPILED_HERE)
def test_torch_compile_fullgraph(name):
    spec = SPECS_BY_NAME[name]
    tensors = [a.make(a.shape, torch.float32) for a in spec.tensors]
    # aot_eager: graph capture through the fake kernels, without inductor codegen (cheap on CI)
    f = torch.compile(lambda *t: spec.output(spec.call(*t)) * 2, fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(*tensors), spec.output(spec.call(*tensors)) * 2, rtol=0, atol=0)


def test_every_public_op_is_compiled_somewhere():
    import geokernels.ops as ops

    public = sorted(n for n in ops.__all__ if callable(getattr(ops, n)))
    for name in public:
        if name in COMPILED_HERE or name in COMPILE_GAPS:
            continue
        assert name in COMPILED_ELSEWHERE, f"{name}: no torch.compile(fullgraph=True) test"
        path = TESTS / COMPILED_ELSEWHERE[name]
        text = path.read_text() if path.exists() else ""
        assert re.search(r"torch\.compile\([^\n]*" + re.escape(name), text) or (
            "fullgraph=True" in text and name in text), f"{name}: {path.name} does not compile it"


# ---- opcheck coverage of every registered op ------------------------------------------------------
def _registered(namespace: str) -> list[str]:
    return sorted(s.name.split("::")[1] for s in torch._C._jit_get_all_schemas()
                  if s.name.startswith(namespace + "::"))


# op -> (test file, a token that file uses in its opcheck call)
OPCHECKED_ELSEWHERE = {
    "geokernels::qc2_loss_forward": ("test_qc2_loss.py", "qc2_loss_forward"),
    "geokernels::qc2_loss_backward": ("test_qc2_loss.py", "qc2_loss_backward"),
    "geokernels::midpoint_convexify_forward": ("test_midpoint.py", "OP.default"),
    "geokernels::midpoint_convexify_backward": ("test_midpoint.py", "midpoint_convexify_backward"),
    "geokernels::distance_transform": ("test_distance.py", "distance_transform.default"),
    "geokernels::contour_flow_field": ("test_flow_field.py", "contour_flow_field.default"),
    "geokernels::cgpm_unroll_backward": ("test_cgpm.py", "cgpm_unroll_backward"),
    "geokernels::philox4x32_10": ("test_flow_mismatch.py", "philox4x32_10.default"),
    "geokernels::flow_mismatch_noise": ("test_flow_mismatch.py", "flow_mismatch_noise.default"),
    "geokernels::flow_mismatch_paths": ("test_flow_mismatch.py", "flow_mismatch_paths.default"),
    "geokernels::flow_mismatch_delta": ("test_flow_mismatch.py", "flow_mismatch_delta.default"),
    "geokernels::flow_mismatch_accumulate_": ("test_flow_mismatch.py",
                                              "flow_mismatch_accumulate_.default"),
    "geokernels::flow_mismatch_aggregate_": ("test_flow_mismatch.py",
                                             "flow_mismatch_aggregate_.default"),
    "geokernels_triton::qc2_loss_forward": ("test_qc2_loss.py", "tq.qc2_loss_forward"),
    "geokernels_triton::midpoint_convexify_forward": ("test_midpoint.py",
                                                      "tmp.midpoint_convexify_forward"),
    "geokernels_triton::midpoint_convexify_backward": ("test_midpoint.py",
                                                       "tmp.midpoint_convexify_backward"),
    "geokernels_triton::flow_mismatch_paths": ("test_flow_mismatch.py", "tfm.paths"),
    "geokernels_triton::flow_mismatch_accumulate_": ("test_flow_mismatch.py", "tfm.accumulate_"),
    "geokernels::contour_flow_loss_forward": ("test_contour_flow_loss.py",
                                              "contour_flow_loss_forward.default"),
    "geokernels::contour_flow_loss_backward": ("test_contour_flow_loss.py",
                                               "contour_flow_loss_backward.default"),
    "geokernels::cfss_forward": ("test_cfss.py", "cfss_forward.default"),
    "geokernels::cfss_backward": ("test_cfss.py", "cfss_backward.default"),
    "geokernels_triton::contour_flow_loss_forward": ("test_contour_flow_loss.py",
                                                     "tcf.contour_flow_loss_forward"),
    "geokernels_triton::cfss_forward": ("test_cfss.py", "tcfss.cfss_forward"),
    "geokernels::qc1_loss_forward": ("test_qc1_loss.py", "qc1_loss_forward.default"),
    "geokernels::qc1_loss_backward": ("test_qc1_loss.py", "qc1_loss_backward.default"),
    "geokernels::qc1_loss_value_and_grad": ("test_qc1_loss.py", "qc1_loss_value_and_grad.default"),
    "geokernels::cgpm_steps": ("test_cgpm.py", "cgpm_steps.default"),
    "geokernels_triton::qc1_loss_forward": ("test_qc1_loss.py", "tq.qc1_loss_forward"),
    "geokernels_triton::cgpm_steps": ("test_cgpm.py", "tc.cgpm_steps"),
    "geokernels_triton::cgpm_sigmoid": ("test_cgpm.py", "tc.sigmoid"),
}
# known gaps (none left; an entry here silences the coverage check for that op)
OPCHECK_GAPS: dict[str, str] = {}
# ops without tensor arguments: nothing for opcheck to check
NO_TENSORS = {"geokernels::cuda_compiled"}


def _triton_samples():
    from geokernels.triton import flow_mismatch as tfm
    from geokernels.triton import qc_loss as tq

    x = torch.rand(1, 1, 3, 4)
    u = torch.rand(1, 1, 5, 6, dtype=torch.float64)
    samples = {
        "geokernels_triton::flow_mismatch_noise": (tfm.noise, (x, 3, 0, 2)),
        "geokernels_triton::flow_mismatch_delta": (tfm.delta, (torch.rand(2, 1, 3, 4), x, None,
                                                               1, 0, 2, 0)),
        "geokernels_triton::flow_mismatch_aggregate_": (tfm.aggregate_, (
            torch.zeros(1, 3, 4), torch.rand(1, 3, 3, 4), 0.5, 2, False)),
        "geokernels_triton::qc2_loss_backward": (tq.qc2_loss_backward, (
            torch.rand((), dtype=torch.float64), u, 1e-3, 1.0, 1e-8, 1e-5, "softplus", "mean")),
        "geokernels_triton::qc1_loss_backward": (tq.qc1_loss_backward, (
            torch.rand((), dtype=torch.float64), u, 3, "mean")),
    }
    try:  # the contour-flow family (cfss branch)
        from geokernels.triton import cfss as tcfss
        from geokernels.triton import contour_flow as tcf
    except ImportError:
        return samples
    logits = torch.randn(1, 1, 5, 6, dtype=torch.float64)
    flow = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    samples["geokernels_triton::contour_flow_loss_backward"] = (tcf.contour_flow_loss_backward, (
        torch.rand_like(logits), logits, flow, 1e-8, "none"))
    params = torch.tensor([0.9, 1.1, 1.0, 2.0], dtype=torch.float64)
    _, states = tcfss.cfss_forward(logits, flow, params, 2, 1, False, 1, True)
    samples["geokernels_triton::cfss_backward"] = (tcfss.cfss_backward, (
        torch.randn_like(logits), logits, flow, params, states, 2, 1, False, 1))
    return samples


@pytest.mark.triton
def test_opcheck_triton_ops_not_checked_elsewhere():
    pytest.importorskip("triton")
    from geokernels import _backend

    if "triton" not in _backend.available_backends("flow_mismatch", "cpu"):
        pytest.skip("triton not usable on CPU here")
    for name, (op, args) in _triton_samples().items():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_every_registered_op_has_an_opcheck():
    import importlib
    import pkgutil

    try:  # every Triton module registers its geokernels_triton ops on import
        import geokernels.triton as triton_pkg

        for info in pkgutil.iter_modules(triton_pkg.__path__):
            importlib.import_module(f"geokernels.triton.{info.name}")
        triton_ops = ["geokernels_triton::" + n for n in _registered("geokernels_triton")]
        here = set(_triton_samples())
    except ImportError:
        triton_ops, here = [], set()
    ops = ["geokernels::" + n for n in _registered("geokernels")] + triton_ops
    assert ops, "no registered ops found"
    missing = []
    for op in ops:
        if op in NO_TENSORS or op in here or op in OPCHECK_GAPS:
            continue
        if op not in OPCHECKED_ELSEWHERE:
            missing.append(op)
            continue
        file, token = OPCHECKED_ELSEWHERE[op]
        path = TESTS / file
        text = path.read_text() if path.exists() else ""
        if not any("opcheck" in line and token in line for line in text.splitlines()):
            missing.append(f"{op} (not in {file})")
    assert not missing, f"registered ops without a torch.library.opcheck test: {missing}"
