"""Bad-input matrix over every public op (issue 8): cases x ops from the table in _op_specs.py.

Every case either expects a ValueError/TypeError whose message names the argument, or -- where
the input is legal (layouts, 1x1 images, integer masks, edge parameters) -- the reference's
result, forward and (for differentiable ops) backward. Test ids read ``<op>-<case>[-<arg>]``.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import geokernels
from geokernels import _backend
from tests._op_specs import SPECS, OpSpec
from tests._util import RTOL, assert_close_rel, requires_cuda


# ---- helpers -------------------------------------------------------------------------------------
def names(name: str) -> str:
    """A regex matching ``name`` as a whole word (so 'r' does not match every message)."""
    return rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"


def legal_tensors(spec: OpSpec, shapes=None, dtypes=None) -> list[torch.Tensor]:
    shapes = shapes or [a.shape for a in spec.tensors]
    dtypes = dtypes or [a.dtype for a in spec.tensors]
    return [a.make(tuple(s), d) for a, s, d in zip(spec.tensors, shapes, dtypes)]


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


def _loosest(dtypes):
    floats = [d for d in dtypes if d in RTOL]
    return max(floats, key=lambda d: RTOL[d]) if floats else None


def _compare(spec: OpSpec, out, ref, what: str, grad: bool = False, inputs_dtype=None):
    """``inputs_dtype``: the least precise floating input (mixed-dtype calls compute in it)."""
    if isinstance(ref, tuple):
        assert isinstance(out, tuple) and len(out) == len(ref), what
        for o, r in zip(out, ref):
            _compare(spec, o, r, what, grad, inputs_dtype)
        return
    if not isinstance(ref, torch.Tensor):
        assert out == ref, f"{what}: {out!r} != {ref!r}"
        return
    assert isinstance(out, torch.Tensor), f"{what}: got {type(out).__name__}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    dtype = out.dtype if out.is_floating_point() else torch.float64
    dtype = _loosest([dtype, inputs_dtype])
    if spec.exact and not grad:
        assert torch.equal(out.to(ref.dtype), ref), f"{what}: not bit-identical to the reference"
        return
    # results that are zero up to rounding (e.g. a scale-invariant loss's gradient on a 1x1
    # image) have no meaningful relative error: an absolute floor far below the tolerance
    floor = 1e-2 * RTOL[dtype] * max(1.0, float(ref.detach().double().abs().max())) * \
        max(1, ref.numel()) ** 0.5
    if float((out.detach().double().cpu() - ref.detach().double().cpu()).norm()) <= floor:
        return
    if spec.rtol_dtype is not None:
        dtype = spec.rtol_dtype if RTOL[spec.rtol_dtype] > RTOL.get(dtype, 0) else dtype
    assert_close_rel(out, ref, dtype, factor=spec.rtol_factor * (10 if grad else 1), what=what)


def check_legal(spec: OpSpec, bases, params=None, layouts=None, backend=None, what=""):
    """The op on ``layouts[j](bases[j])`` equals the reference on contiguous float64 copies,
    forward and, for differentiable ops, backward w.r.t. the first tensor (random cotangent).
    The inputs are not modified in place."""
    params = dict(params or {})
    layouts = layouts or [None] * len(bases)
    layouts = [f or (lambda t: t) for f in layouts]
    if backend is not None:
        params = dict(spec.backend_params.get(backend, {}), **params, backend=backend)
    # differentiable ops: the gradient w.r.t. every floating input
    wants = [spec.differentiable and b.is_floating_point() for b in bases]
    grad = any(wants)
    op_leaves = [b.detach().clone().requires_grad_(w) for b, w in zip(bases, wants)]
    ref_leaves = [_upcast(b).detach().clone().requires_grad_(w) for b, w in zip(bases, wants)]
    op_in = [f(t) for f, t in zip(layouts, op_leaves)]
    ref_in = [f(t).contiguous() for f, t in zip(layouts, ref_leaves)]
    out = spec.call(*op_in, **params)
    ref = spec.reference(*ref_in, **params)
    low = _loosest([b.dtype for b in bases])
    _compare(spec, out, ref, f"{spec.name} {what} forward", inputs_dtype=low)
    for b, leaf in zip(bases, op_leaves):  # nothing was written into the inputs
        torch.testing.assert_close(leaf.detach(), b, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{spec.name} {what}: an input was modified")
    out_t, ref_t = spec.output(out), spec.output(ref)
    if grad:
        cot = torch.randn(ref_t.shape, dtype=torch.float64)
        op_w = [t for t, w in zip(op_leaves, wants) if w]
        ref_w = [t for t, w in zip(ref_leaves, wants) if w]
        gs = torch.autograd.grad(out_t, op_w, cot.to(out_t.dtype), allow_unused=True)
        gs_ref = torch.autograd.grad(ref_t, ref_w, cot.to(ref_t.dtype), allow_unused=True)
        for k, (g, g_ref) in enumerate(zip(gs, gs_ref)):
            if g is None or g_ref is None:  # no path to this input (e.g. iters=0)
                assert g is None or not g.any(), f"{spec.name} {what}: gradient {k}"
                assert g_ref is None or not g_ref.any(), f"{spec.name} {what}: ref gradient {k}"
                continue
            _compare(spec, g, g_ref, f"{spec.name} {what} gradient {k}", grad=True,
                     inputs_dtype=low)
    else:
        assert not out_t.requires_grad
    return out


def expect_error(spec: OpSpec, tensors, exc, name, params=None):
    with pytest.raises(exc, match=names(name)):
        spec.call(*tensors, **(params or {}))


def _with_shape(spec: OpSpec, i: int, shape) -> list:
    shapes = [list(a.shape) for a in spec.tensors]
    shapes[i] = list(shape)
    return shapes


# ---- cases ---------------------------------------------------------------------------------------
# Each case: (case id, applies(spec, arg) -> bool, run(spec, i, backend)). Per-argument cases are
# instantiated once per tensor argument; layout cases once per fused backend runnable here.
INTEGER_DTYPES = [torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool]


def _dtype_case(dtype):
    def run(spec, i, backend):
        arg = spec.tensors[i]
        dtypes = [a.dtype for a in spec.tensors]
        dtypes[i] = dtype
        tensors = legal_tensors(spec)
        if dtype.is_complex:
            tensors[i] = tensors[i].to(dtype)
            expect_error(spec, tensors, TypeError, arg.name)
            return
        tensors[i] = arg.make(tuple(arg.shape), dtype)
        low = dtype in (torch.float16, torch.bfloat16)
        legal = (arg.kind == "mask" and not low) or dtype == torch.float32 or (
            low and arg.low_precision_cpu == "legal")
        if not legal:
            expect_error(spec, tensors, TypeError, arg.name)
            return
        if spec.same_dtype and dtype != spec.tensors[0].dtype:  # mixed dtypes are refused
            expect_error(spec, tensors, TypeError, spec.tensors[1].name)
            return
        out = check_legal(spec, tensors, what=str(dtype))
        if len(tensors) == 1:  # the result's dtype is what the reference gives for that dtype
            same = spec.reference(*[t.clone() for t in tensors])
            assert spec.output(out).dtype == spec.output(same).dtype
    return run


def _rank_case(spec, i, backend):
    arg = spec.tensors[i]
    for rank in arg.wrong_ranks():
        shape = (tuple(arg.shape) + (1,) * rank)[:rank] if rank <= len(arg.shape) else \
            (1,) * (rank - len(arg.shape)) + tuple(arg.shape)
        tensors = legal_tensors(spec)
        tensors[i] = arg.make(shape, arg.dtype)
        expect_error(spec, tensors, ValueError, arg.name)


def _empty_case(spec, i, backend):
    arg = spec.tensors[i]
    for dim in range(len(arg.shape)):
        shape = list(arg.shape)
        shape[dim] = 0
        tensors = legal_tensors(spec)
        tensors[i] = arg.make(tuple(shape), arg.dtype)
        expect_error(spec, tensors, ValueError, arg.name)


def _not_a_tensor_case(spec, i, backend):
    arg = spec.tensors[i]
    tensors = legal_tensors(spec)
    for bad in (tensors[i].tolist(), tensors[i].numpy()):
        tensors[i] = bad
        expect_error(spec, tensors, TypeError, arg.name)


def _value_case(value):
    def run(spec, i, backend):
        arg = spec.tensors[i]
        tensors = legal_tensors(spec)
        tensors[i].view(-1)[len(tensors[i].view(-1)) // 2] = value
        if arg.checks_values:
            expect_error(spec, tensors, ValueError, arg.name)
        else:
            check_legal(spec, tensors, what=f"{value} entry")
    return run


def _unchecked_nan_case(spec, i, backend):
    """With value checks off (geokernels.set_checks("never")) a NaN is not an error, but the op
    must still return (no crash, no hang) a result of the right shape."""
    tensors = legal_tensors(spec)
    tensors[i].view(-1)[0] = float("nan")
    old = geokernels.get_checks()
    geokernels.set_checks("never")
    try:
        out = spec.output(spec.call(*tensors))
    except (ValueError, TypeError):  # an op may still refuse (e.g. a NaN velocity check)
        return
    finally:
        geokernels.set_checks(old)
    ref = spec.output(spec.reference(*[_upcast(t) for t in tensors]))
    assert out.shape == ref.shape


def _one_by_one_case(spec, i, backend):
    shapes = [tuple(a.shape[:-2]) + (1, 1) for a in spec.tensors]
    check_legal(spec, legal_tensors(spec, shapes), backend=backend, what="1x1")


def _bad_shape_case(entry):
    def run(spec, i, backend):
        _, shapes, exc, name = entry
        expect_error(spec, legal_tensors(spec, shapes), exc, name)
    return run


def _legal_shape_case(entry):
    def run(spec, i, backend):
        _, shapes = entry
        check_legal(spec, legal_tensors(spec, shapes), backend=backend, what=str(shapes))
    return run


def _bad_param_case(entry):
    def run(spec, i, backend):
        _, params, exc, name = entry
        if params.get("backend") == "cuda" and torch.cuda.is_available():
            pytest.skip("backend='cuda' is legal for CUDA tensors on a CUDA machine")
        expect_error(spec, legal_tensors(spec), exc, name, params)
    return run


def _legal_param_case(entry):
    def run(spec, i, backend):
        _, params = entry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # backend="torch" says once that it is the reference
            check_legal(spec, legal_tensors(spec), params, backend=backend, what=str(params))
    return run


# layouts: (id, base shape from the legal shape, view of the base with the legal shape)
def _transposed(shape):
    return tuple(shape[:-2]) + (shape[-1], shape[-2]), lambda t: t.transpose(-1, -2)


def _strided(shape):
    return tuple(shape[:-1]) + (2 * shape[-1],), lambda t: t[..., ::2]


def _offset(shape):
    return (shape[0] + 1,) + tuple(shape[1:]), lambda t: t[1:]


def _expanded_batch(shape):
    return (1,) + tuple(shape[1:]), lambda t: t.expand(shape)


def _expanded_width(shape):
    return tuple(shape[:-1]) + (1,), lambda t: t.expand(shape)


def _channels_last(shape):
    if len(shape) != 4:
        return None
    return tuple(shape), lambda t: t.contiguous(memory_format=torch.channels_last)


def _channels_last_sliced(shape):  # channels-last storage, then a channel slice of it
    if len(shape) != 4:
        return None
    base = (shape[0], shape[1] + 1) + tuple(shape[2:])
    return base, lambda t: t.contiguous(memory_format=torch.channels_last)[:, 1:]


# the Triton interpreter is slow (seconds per launch): it runs these layouts only
TRITON_LAYOUTS = ("transposed", "expanded_width", "channels_last_sliced")

LAYOUTS = {"transposed": _transposed, "strided": _strided, "storage_offset": _offset,
           "expanded_batch": _expanded_batch, "expanded_width": _expanded_width,
           "channels_last": _channels_last, "channels_last_sliced": _channels_last_sliced}


def _layout_case(layout_name):
    def run(spec, i, backend):
        arg = spec.tensors[i]
        base_shape, view = LAYOUTS[layout_name](tuple(arg.shape))
        bases = legal_tensors(spec)
        bases[i] = arg.make(base_shape, arg.dtype)
        layouts = [None] * len(bases)
        layouts[i] = view
        assert view(bases[i]).shape == tuple(arg.shape)
        check_legal(spec, bases, layouts=layouts, backend=backend, what=layout_name)
    return run


def _layout_applies(layout_name):
    def applies(spec, arg):
        return LAYOUTS[layout_name](tuple(arg.shape)) is not None
    return applies


def _requires_grad_case(spec, i, backend):
    """A float input that requires grad: differentiable ops give the reference's gradient;
    the others (masks, scoring) return a result that does not require grad."""
    tensors = legal_tensors(spec)
    tensors[i].requires_grad_(True)
    out = spec.output(spec.call(*tensors))
    if spec.differentiable:
        assert out.requires_grad
        check_legal(spec, [t.detach() for t in tensors], what="requires_grad")
    else:
        assert not out.requires_grad, f"{spec.name} result requires grad"
        ref = spec.reference(*[_upcast(t.detach()) for t in tensors])
        _compare(spec, out, spec.output(ref), f"{spec.name} requires_grad input")


def _meta_case(spec, i, backend):
    """A tensor on the meta device: with other tensors on the CPU it is a device mix (error
    naming an argument); alone it must give a meta result of the reference's shape or an error
    naming it -- never a crash or a silent CPU result."""
    tensors = legal_tensors(spec)
    ref = spec.output(spec.reference(*[_upcast(t) for t in tensors]))
    tensors[i] = tensors[i].to("meta")
    if len(tensors) > 1:
        expect_error(spec, tensors, ValueError, spec.tensors[i].name)
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = spec.output(spec.call(*tensors))
    except (ValueError, TypeError) as exc:
        assert re.search(names(spec.tensors[i].name), str(exc)), str(exc)
        return
    assert out.device.type == "meta" and out.shape == ref.shape


def _cuda_mix_case(spec, i, backend):
    tensors = legal_tensors(spec)
    if len(tensors) > 1:
        tensors[i] = tensors[i].cuda()
        expect_error(spec, tensors, ValueError, spec.tensors[i].name)
    else:  # a CUDA input alone is legal; an explicit CPU backend for it is not
        ref = spec.output(spec.reference(*[_upcast(t) for t in tensors]))
        out = spec.output(spec.call(*[t.cuda() for t in tensors]))
        assert out.device.type == "cuda"
        _compare(spec, out.cpu(), ref, f"{spec.name} cuda")
        if spec.backend_op is not None:
            expect_error(spec, [t.cuda() for t in tensors], ValueError, "cpu",
                         dict(backend="cpu"))


ALWAYS = lambda spec, arg: True  # noqa: E731


def _case_table():
    per_arg = [
        ("not_a_tensor", ALWAYS, _not_a_tensor_case),
        ("rank", ALWAYS, _rank_case),
        ("empty", ALWAYS, _empty_case),
        ("nan", ALWAYS, _value_case(float("nan"))),
        ("inf", ALWAYS, _value_case(float("inf"))),
        ("neg_inf", ALWAYS, _value_case(float("-inf"))),
        ("nan_unchecked", ALWAYS, _unchecked_nan_case),
        ("requires_grad", ALWAYS, _requires_grad_case),
        ("meta", ALWAYS, _meta_case),
        ("cuda_mix", ALWAYS, _cuda_mix_case),
    ]
    for dtype in INTEGER_DTYPES + [torch.complex64, torch.float16, torch.bfloat16, torch.float32]:
        per_arg.append((f"dtype_{str(dtype).split('.')[-1]}", ALWAYS, _dtype_case(dtype)))
    layouts = [(f"layout_{name}", _layout_applies(name), _layout_case(name)) for name in LAYOUTS]
    return per_arg, layouts


def _params():
    per_arg, layouts = _case_table()
    params = []
    for spec in SPECS:
        for case_id, applies, run in per_arg:
            for i, arg in enumerate(spec.tensors):
                if applies(spec, arg):
                    suffix = f"-{arg.name}" if len(spec.tensors) > 1 else ""
                    marks = [pytest.mark.cuda, requires_cuda] if case_id == "cuda_mix" else []
                    params.append(pytest.param(spec, i, None, run,
                                               id=f"{spec.name}-{case_id}{suffix}", marks=marks))
        backends = [None]
        if spec.backend_op is not None:
            avail = _backend.available_backends(spec.backend_op, "cpu")
            backends += [b for b in spec.backends if b in avail and b != "cpu"]
        for backend in backends:
            tag = "" if backend is None else f"[{backend}]"
            marks = [pytest.mark.triton] if backend == "triton" else []
            for case_id, applies, run in layouts:
                if backend == "triton" and case_id[len("layout_"):] not in TRITON_LAYOUTS:
                    continue
                for i, arg in enumerate(spec.tensors):
                    if applies(spec, arg):
                        suffix = f"-{arg.name}" if len(spec.tensors) > 1 else ""
                        params.append(pytest.param(spec, i, backend, run, marks=marks,
                                                   id=f"{spec.name}{tag}-{case_id}{suffix}"))
            if backend != "triton":
                params.append(pytest.param(spec, 0, backend, _one_by_one_case, marks=marks,
                                           id=f"{spec.name}{tag}-one_by_one"))
        for entry in spec.bad_shapes:
            params.append(pytest.param(spec, 0, None, _bad_shape_case(entry),
                                       id=f"{spec.name}-shape_{entry[0]}"))
        for entry in spec.legal_shapes:
            params.append(pytest.param(spec, 0, None, _legal_shape_case(entry),
                                       id=f"{spec.name}-legal_shape_{entry[0]}"))
        for entry in spec.bad_params:
            params.append(pytest.param(spec, 0, None, _bad_param_case(entry),
                                       id=f"{spec.name}-param_{entry[0]}"))
        for entry in spec.legal_params:
            params.append(pytest.param(spec, 0, None, _legal_param_case(entry),
                                       id=f"{spec.name}-legal_param_{entry[0]}"))
    return params


PARAMS = _params()


@pytest.mark.parametrize("spec,arg_index,backend,run", PARAMS)
def test_matrix(spec, arg_index, backend, run):
    run(spec, arg_index, backend)


def test_matrix_covers_every_public_op():
    """Every public op of geokernels.ops has an entry in the table (a new op must add one)."""
    import geokernels.ops as ops

    public = {n for n in ops.__all__ if callable(getattr(ops, n))}
    covered = {s.name.split("[")[0] for s in SPECS}
    assert public <= covered, f"ops without a bad-input matrix entry: {sorted(public - covered)}"


def test_integer_tensors_cannot_require_grad():
    """The matrix's "requires_grad on integer inputs" case cannot reach an op: torch refuses to
    build such a tensor (integer masks are detached by construction)."""
    for dtype in INTEGER_DTYPES:
        with pytest.raises(RuntimeError, match="floating point|complex"):
            torch.zeros(2, dtype=dtype).requires_grad_(True)


def test_matrix_size():
    """Sanity: the table is populated (and reports its size in the test log)."""
    assert len(SPECS) >= 9
    assert len(PARAMS) >= 30 * len(SPECS)
