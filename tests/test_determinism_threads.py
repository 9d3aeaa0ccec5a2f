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


def _bigger(spec):
    """Inputs large enough to span several parallel blocks (and SIMD tails)."""
    shapes = []
    for arg in spec.tensors:
        s = list(arg.shape)
        s[-2], s[-1] = 37, 45
        shapes.append(tuple(s))
    torch.manual_seed(3)
    return [a.make(s, a.dtype) for a, s in zip(spec.tensors, shapes)]


def _run(spec, tensors):
    """Output (and gradient w.r.t. the first tensor for differentiable ops), detached."""
    leaves = [t.detach().clone().requires_grad_(spec.differentiable and i == 0)
              for i, t in enumerate(tensors)]
    out = spec.output(spec.call(*leaves))
    if spec.differentiable:
        cot = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        (g,) = torch.autograd.grad(out, leaves[0], cot)
        return out.detach(), g
    return out.detach(), None


def _same(a, b):
    return torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))


# flow_mismatch over 37x45 with the Python reference model is cheap; the [noise] variant adds
# nothing here (same kernels)
DET_SPECS = [s for s in SPECS if s.name != "flow_mismatch[noise]"]


@pytest.mark.parametrize("spec", DET_SPECS, ids=[s.name for s in DET_SPECS])
def test_deterministic_run_to_run_and_across_thread_counts(spec):
    tensors = _bigger(spec)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            results.append(_run(spec, tensors))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert _same(results[0], r), spec.name


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
