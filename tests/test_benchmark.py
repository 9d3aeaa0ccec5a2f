"""The benchmark harness (geokernels.benchmark): op selection and case registration. Timings are
never asserted here; only which cases run and that every row has a measurement."""
import math

import torch

from geokernels import benchmark as gkbench


def test_every_factory_names_its_op():
    gkbench._load_cases()
    assert gkbench._CASES
    for factory in gkbench._CASES:
        assert isinstance(getattr(factory, "bench_op", None), str), factory.__name__


def test_run_builds_only_the_selected_ops(monkeypatch):
    gkbench._load_cases()
    built = []
    wrapped = []
    for factory in gkbench._CASES:
        def spy(device, quick, factory=factory):
            built.append(factory.bench_op)
            return factory(device, quick)
        spy.bench_op = factory.bench_op
        wrapped.append(spy)
    monkeypatch.setattr(gkbench, "_CASES", wrapped)
    results = gkbench.run("cpu", ops=["qc2_loss"], quick=True, compile_reference=False,
                          memory=False, min_time=0.0, progress=False)
    assert built == ["qc2_loss"]          # the detector case (checkpoint load) was never built
    assert results and {r.op for r in results} == {"qc2_loss"}
    impls = {r.impl for r in results}
    assert "reference" in impls and impls - {"reference"}, impls
    assert all(not math.isnan(r.ms) and r.ms > 0 for r in results)
    assert all(r.speedup_vs_reference is not None for r in results)
    assert "qc2_loss" in gkbench.format_table(results)


def test_unknown_op_is_an_error(capsys):
    import pytest

    from geokernels.cli import main

    with pytest.raises(gkbench.UnknownOpError, match="ops: no benchmark cases for \\['qc3_loss'\\]"):
        gkbench.run("cpu", ops=["qc3_loss"], progress=False)
    with pytest.raises(SystemExit, match="--ops: no benchmark cases.*known:.*qc2_loss"):
        main(["bench", "--device", "cpu", "--ops", "qc3_loss"])


def test_register_case_bare_and_named(monkeypatch):
    monkeypatch.setattr(gkbench, "_CASES", [])
    monkeypatch.setattr(gkbench, "_load_cases", lambda: None)
    calls = []

    @gkbench.register_case
    def anything(device, quick):
        calls.append("bare")
        return []

    @gkbench.register_case(op="qc1_loss")
    def named(device, quick):
        calls.append("qc1_loss")
        return []

    assert gkbench._CASES == [anything, named]
    assert anything.bench_op is None and named.bench_op == "qc1_loss"
    assert gkbench.run(torch.device("cpu"), ops=["cgpm"], progress=False) == []
    assert calls == ["bare"]              # an unnamed factory is always built, then filtered
    gkbench.run(torch.device("cpu"), progress=False)
    assert calls == ["bare", "bare", "qc1_loss"]


def test_a_failing_factory_is_not_an_unknown_op(monkeypatch):
    import pytest

    monkeypatch.setattr(gkbench, "_CASES", [])
    monkeypatch.setattr(gkbench, "_load_cases", lambda: None)

    @gkbench.register_case(op="cgpm")
    def broken(device, quick):
        raise ValueError("corrupt checkpoint")

    with pytest.raises(ValueError, match="corrupt checkpoint") as info:
        gkbench.run("cpu", ops=["cgpm"], progress=False)
    assert not isinstance(info.value, gkbench.UnknownOpError)


def test_first_call_is_warmup_not_judged(monkeypatch):
    # a step whose first call compiles (slow) and is fast afterwards is timed by repetitions,
    # not from one sample
    import time

    monkeypatch.setattr(gkbench, "SLOW_STEP_S", 0.05)
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.1)

    ms = gkbench.time_step(step, torch.device("cpu"), min_time=0.0)
    assert len(calls) >= 5 and ms < 50
    calls.clear()
    slow = gkbench.time_step(lambda: (calls.append(1), time.sleep(0.06)), torch.device("cpu"))
    assert len(calls) == 2 and slow >= 60       # really slow: warm-up + one timed call


def test_rows_are_reported_case_by_case(monkeypatch, tmp_path, capsys):
    from geokernels.cli import main

    monkeypatch.setattr(gkbench, "_load_cases", lambda: None)
    seen_json = []

    def cases(device, quick):
        def make_step(impl):
            if impl == "reference" and (tmp_path / "b.json").exists():
                import json

                seen_json.append(len(json.loads((tmp_path / "b.json").read_text())))
            return lambda: torch.ones(8).sum()
        return [gkbench.Case("qc2_loss", f"case{i}", make_step, 32, compile_reference=False)
                for i in range(3)]

    cases.bench_op = "qc2_loss"
    monkeypatch.setattr(gkbench, "_CASES", [cases])
    got = []
    results = gkbench.run("cpu", min_time=0.0, memory=False, progress=False, on_case=got.append)
    assert [len(rows) for rows in got] == [len(results) // 3] * 3
    assert [r.label for rows in got for r in rows] == [r.label for r in results]
    # the CLI prints each case's rows and rewrites --json as they come (a killed run keeps them)
    assert main(["bench", "--device", "cpu", "--no-memory", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("measured | qc2_loss | case") == len(results)
    assert seen_json == [len(results) // 3, 2 * len(results) // 3]


def test_one_failing_factory_does_not_lose_the_others(monkeypatch):
    # on a GPU run, a factory that cannot build its cases (e.g. a checkpoint) must not take
    # the other ops' rows with it; an exception with an empty message is reported too
    import pytest

    monkeypatch.setattr(gkbench, "_CASES", [])
    monkeypatch.setattr(gkbench, "_load_cases", lambda: None)

    @gkbench.register_case(op="cgpm")
    def broken(device, quick):
        raise AssertionError()

    def bare_assert(impl):
        def step():
            if impl != "reference":
                raise AssertionError()   # (pytest would give an assert statement a message)
        return step

    @gkbench.register_case(op="qc2_loss")
    def fine(device, quick):
        return [gkbench.Case("qc2_loss", "tiny", bare_assert, 0, compile_reference=False)]

    with pytest.warns(RuntimeWarning, match="cgpm"):
        rows = gkbench.run("cpu", ops=["cgpm", "qc2_loss"], progress=False, memory=False)
    assert {r.op for r in rows} == {"qc2_loss"}
    assert any(r.note == "AssertionError: " for r in rows)


def _one_case(monkeypatch, make_step, **kw):
    monkeypatch.setattr(gkbench, "_load_cases", lambda: None)

    def cases(device, quick):
        return [gkbench.Case("qc2_loss", "c", make_step, 32, **kw)]

    cases.bench_op = "qc2_loss"
    monkeypatch.setattr(gkbench, "_CASES", [cases])


def test_a_fast_wrong_kernel_gets_a_mismatch_note_not_a_speedup(monkeypatch):
    """Rows were timed blind: a fused op that ignored its input was reported 1286x faster."""
    u = torch.rand(2, 1, 16, 16)
    import geokernels

    real = geokernels.qc2_loss
    monkeypatch.setattr(geokernels, "qc2_loss", lambda u, **kw: u.new_zeros(()))
    from geokernels.bench_cases import dconvex

    def make_step(impl):
        fn = real if impl == "reference" else (lambda x: geokernels.qc2_loss(x, backend=impl))
        return lambda: fn(u)

    _one_case(monkeypatch, make_step, compile_reference=False)
    rows = {r.impl: r for r in gkbench.run("cpu", min_time=0.0, memory=False, progress=False)}
    assert not math.isnan(rows["reference"].ms)
    # still timed (a rare GPU run keeps its numbers), but flagged and given no ratio
    assert not math.isnan(rows["cpu"].ms) and rows["cpu"].speedup_vs_reference is None
    assert rows["cpu"].note.startswith("MISMATCH") and "rel. L2 error" in rows["cpu"].note
    assert gkbench.mismatched(rows["cpu"]) and not gkbench.mismatched(rows["reference"])
    # the real cases return (value, gradients) and pass the check
    monkeypatch.setattr(geokernels, "qc2_loss", real)
    leaf = u.clone().requires_grad_()
    step = dconvex._loss_step(leaf, real)
    out = step()
    assert len(out) == 2 and out[1].shape == u.shape
    assert leaf.grad is None   # nothing left for the next step to free inside its memory probe
    gkbench.check_output("cpu", out, step(), 1e-4)


def test_expected_output_replaces_the_reference_as_yardstick(monkeypatch):
    """flow_mismatch's reference loop draws torch.randn noise: rows are checked against
    Case.expected (the reference on the fused noise), never against the reference row."""
    target = torch.arange(6.0)

    def make_step(impl):
        return (lambda: torch.randn(6)) if impl == "reference" else (lambda: target + 1e-9)

    _one_case(monkeypatch, make_step, compile_reference=False, expected=lambda: target)
    rows = gkbench.run("cpu", min_time=0.0, memory=False, progress=False)
    assert all(not math.isnan(r.ms) for r in rows), [r.note for r in rows]
    _one_case(monkeypatch, make_step, compile_reference=False, expected=lambda: -target)
    rows = {r.impl: r for r in gkbench.run("cpu", min_time=0.0, memory=False, progress=False)}
    assert rows["cpu"].note.startswith("MISMATCH")


def test_fused_rows_come_before_compiled_and_survive_an_interrupt(monkeypatch):
    """A cold torch.compile cut by gpu_check's SIGINT lost the whole case's rows, including the
    fused ones (timed after the compiled row) and the already measured reference."""
    order = []

    def make_step(impl):
        order.append(impl)
        if impl == "compiled":
            raise KeyboardInterrupt
        return lambda: torch.ones(3)

    _one_case(monkeypatch, make_step)
    got = []
    import pytest

    with pytest.raises(KeyboardInterrupt):
        gkbench.run("cpu", min_time=0.0, memory=False, progress=False, on_case=got.append)
    assert order == ["reference", "cpu", "compiled"]
    assert [r.impl for r in got[0]] == ["reference", "cpu"]
    assert got[0][1].speedup_vs_reference is not None


def test_output_check_rules():
    import numpy as np
    import pytest

    a = torch.tensor([1.0, 2.0, float("inf"), float("nan")])
    gkbench.check_output("x", a, a.clone(), 1e-4)         # NaN where the reference has NaN
    with pytest.raises(gkbench.OutputMismatch, match="NaN/Inf"):
        gkbench.check_output("x", torch.tensor([1.0, 2.0, -float("inf"), float("nan")]), a, 1e-4)
    gkbench.check_output("x", torch.ones(2, 1, 3), np.ones((2, 1, 3)), 1e-4)   # scipy rows
    with pytest.raises(gkbench.OutputMismatch, match="NaN/Inf"):
        gkbench.check_output("x", torch.tensor([1.0, 2.0, 3.0, 4.0]), a, 1e-4)
    with pytest.raises(gkbench.OutputMismatch, match="shape"):
        gkbench.check_output("x", torch.ones(3), torch.ones(2, 1, 3), 1e-4)
    with pytest.raises(gkbench.OutputMismatch, match="returned 1 tensors"):
        gkbench.check_output("x", torch.ones(3), (torch.ones(3), torch.ones(3)), 1e-4)


def test_dram_sized_cases_on_gpus_only():
    """The acceptance sizes fit in an H200's L2, so their GB/s says nothing about DRAM: on CUDA
    the memory-bound losses also get a 128 MiB-per-tensor case (no compiled row: compile time)."""
    from geokernels.benchmark import DRAM_SHAPE, case_shapes

    base = (8, 1, 256, 256)
    assert case_shapes(torch.device("cpu"), False, base) == [base]
    assert case_shapes(torch.device("cuda"), True, base) == [base]
    assert case_shapes(torch.device("cuda"), False, base) == [base, DRAM_SHAPE]
    assert math.prod(DRAM_SHAPE) * 4 >= 128 * 2**20
