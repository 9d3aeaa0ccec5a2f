"""One table of the public ops, for the hardening tests (bad-input matrix, properties, threads).

Each ``OpSpec`` says how to call a public op and its reference on the same tensors, which tensor
arguments it takes (name, a legal shape, how to draw legal values, which dtypes are legal), which
parameter values are out of range (with the error and the argument name it must carry) and which
edge values are legal (then the op must equal the reference). Adding an op is one entry in
``SPECS``; ops that are not on this branch yet (other families land later) are left out by
``_available``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

import geokernels
from geokernels import reference

# the function reference.flow_mismatch shadows its submodule's name: import the module itself
_ref_fm_module = importlib.import_module("geokernels.reference.flow_mismatch")


# ---- table types ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorArg:
    """A tensor argument: its name (errors must name it), a legal shape, legal values."""

    name: str
    shape: tuple
    make: Callable[[tuple, torch.dtype], torch.Tensor]
    dtype: torch.dtype = torch.float64
    # "float": floating dtypes only; "mask": bool and every real dtype are legal (values 0/1)
    kind: str = "float"
    # NaN/Inf entries: True = rejected with ValueError naming the argument; False = legal
    checks_values: bool = True
    # float16/bfloat16 on CPU: "error" (TypeError naming it) or "legal" (equals the reference)
    low_precision_cpu: str = "error"
    channel_dim: int | None = 1   # None: the argument has no channel dimension
    batch_dim: int = 0
    legal_ranks: tuple = ()       # ranks accepted besides len(shape)
    channel_factor: int = 1       # channels = factor * C of the first tensor (flows: 2C)

    def wrong_ranks(self) -> list[int]:
        """The nearest illegal ranks below and above the legal one(s)."""
        legal = {len(self.shape), *self.legal_ranks}
        below = [r for r in range(min(legal) - 1, 0, -1) if r not in legal][:1]
        above = [r for r in range(max(legal) + 1, 8) if r not in legal][:1]
        return below + above


@dataclass
class OpSpec:
    name: str
    call: Callable            # call(*tensors, **params) -> output (the public op)
    reference: Callable       # reference(*tensors, **params) -> output (the oracle)
    tensors: list
    differentiable: bool = False
    exact: bool = False       # outputs equal the reference bit for bit (else relative error)
    rtol_factor: float = 1.0
    rtol_dtype: torch.dtype | None = None  # tolerance row of tests._util.RTOL (default: output's)
    bad_params: list = field(default_factory=list)    # (id, params, exception, name)
    legal_params: list = field(default_factory=list)  # (id, params)
    bad_shapes: list = field(default_factory=list)    # (id, shapes per tensor, exception, name)
    legal_shapes: list = field(default_factory=list)  # (id, shapes per tensor)
    # the tensor that carries the result (ops returning tuples / sweeps)
    output: Callable = staticmethod(lambda out: out)
    backends: tuple = ()          # fused backends the layout cases also run on (besides auto)
    backend_params: dict = field(default_factory=dict)  # backend -> params keeping it cheap
    # the op's registered name in geokernels._backend (for the backend list); None: pure torch
    backend_op: str | None = None
    # all tensors must share the first one's dtype (else TypeError naming the second)
    same_dtype: bool = False


# ---- value makers --------------------------------------------------------------------------------
def uniform(shape, dtype):
    return torch.rand(shape, dtype=torch.float64).to(dtype)


def normal(shape, dtype):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def binary(shape, dtype):
    m = torch.rand(shape) > 0.5
    return m if dtype == torch.bool else m.to(dtype)


def positive(shape, dtype):
    return (torch.rand(shape, dtype=torch.float64) * 3 + 0.1).to(dtype)


# ---- flow mismatch helpers -----------------------------------------------------------------------
def velocity_model(x_t, t, cond):
    """A fixed, cheap, non-trivial velocity field (depends on x_t, t and neighbouring pixels)."""
    return 0.7 * x_t - 0.3 * t.view(-1, 1, 1, 1) * x_t.roll(1, dims=-1) + 0.1


FM_DEFAULTS = dict(K=3, T=2, agg="min", r=2.0, seed=11, smooth_sigma=0.0, image_index_offset=0)
_FM_REFERENCE_KEYS = set(FM_DEFAULTS)


def _fm_call(x, noise=None, **params):
    params = dict(FM_DEFAULTS, **params)
    return geokernels.flow_mismatch(params.pop("model", velocity_model), x, noise=noise, **params)


def _fm_reference(x, noise=None, **params):
    params = dict(FM_DEFAULTS, **params)
    backend = params.get("backend", "auto")
    params = {k: v for k, v in params.items() if k in _FM_REFERENCE_KEYS}
    if noise is None:
        # the backend's float32 noise stream (the flow_mismatch_noise entry checks it against
        # the documented float64 stream to float32 rounding), so that float64 heatmaps compare
        # to 1e-12 (the Triton interpreter rounds its fma twice: its stream differs in the
        # last float32 bit from the C++ one)
        noise = geokernels.flow_mismatch_noise(
            x, params["K"], params["seed"], params["image_index_offset"],
            backend=backend if backend in ("cpu", "triton", "cuda") else "auto")
    return reference.flow_mismatch(velocity_model, x, noise=noise, **params)


def _noise_call(x, **params):
    params = dict(dict(K=3, seed=5), **params)
    return geokernels.flow_mismatch_noise(x, **params)


def _noise_reference(x, **params):
    params = dict(dict(K=3, seed=5, image_index_offset=0), **params)
    params.pop("backend", None)
    B, C, H, W = x.shape
    return _ref_fm_module.flow_mismatch_noise(
        B, params["K"], C, H, W, params["seed"], params["image_index_offset"]).to(
            torch.float32).to(x.dtype)


def _strip_backend(fn):
    def call(*tensors, **params):
        params.pop("backend", None)
        return fn(*tensors, **params)

    return call


def _drop(fn, *names):
    def call(*tensors, **params):
        for name in names:
            params.pop(name, None)
        return fn(*tensors, **params)

    return call


def _cff_reference(mask, threshold=None, **params):
    params.pop("backend", None)
    if threshold is not None:
        mask = mask > threshold
    return reference.contour_flow_field(mask, **params)


# ---- the table -----------------------------------------------------------------------------------
_NAN = float("nan")
_INF = float("inf")

IMAGE = (2, 3, 5, 6)


def _specs() -> list[OpSpec]:
    specs = [
        OpSpec(
            name="qc2_loss",
            call=lambda u, **p: geokernels.qc2_loss(u, **dict(dict(reduction="none"), **p)),
            reference=_strip_backend(
                lambda u, **p: reference.qc2_loss(u, **dict(dict(reduction="none"), **p))),
            tensors=[TensorArg("u", IMAGE, uniform)],
            differentiable=True,
            backend_op="qc2_loss",
            backends=("cpu", "triton"),
            bad_params=[
                ("margin_nan", dict(margin=_NAN), ValueError, "margin"),
                ("margin_inf", dict(margin=_INF), ValueError, "margin"),
                ("beta_zero", dict(beta=0.0), ValueError, "beta"),
                ("beta_negative", dict(beta=-1.0), ValueError, "beta"),
                ("beta_str", dict(beta="1"), TypeError, "beta"),
                ("eps_negative", dict(eps=-1e-8), ValueError, "eps"),
                ("grad_threshold_negative", dict(grad_threshold=-1.0), ValueError, "grad_threshold"),
                ("activation", dict(activation="tanh"), ValueError, "activation"),
                ("reduction", dict(reduction="max"), ValueError, "reduction"),
                ("backend", dict(backend="metal"), ValueError, "backend"),
                ("backend_cuda_on_cpu", dict(backend="cuda"), ValueError, "cuda"),
            ],
            legal_params=[
                ("eps_zero_relu", dict(eps=0.0, activation="relu")),
                ("mean", dict(reduction="mean")),
                ("sum_softplus_linear", dict(reduction="sum", beta=40.0, margin=1.0)),
                ("backend_torch", dict(backend="torch")),
            ],
            legal_shapes=[("one_channel", [(3, 1, 4, 7)]), ("many_channels", [(1, 5, 6, 4)]),
                          ("one_row", [(1, 2, 1, 9)]), ("one_column", [(2, 1, 8, 1)])],
        ),
        OpSpec(
            name="midpoint_convexify",
            call=lambda u, **p: geokernels.midpoint_convexify(u, **dict(dict(radius=2.0), **p)),
            reference=_strip_backend(
                lambda u, **p: reference.midpoint_convexify(u, **dict(dict(radius=2.0), **p))),
            tensors=[TensorArg("u", IMAGE, uniform)],
            differentiable=True,
            exact=True,
            backend_op="midpoint_convexify",
            backends=("cpu", "triton"),
            # the Triton interpreter costs ~1 s per sweep on a loaded CPU: two sweeps suffice
            backend_params={"triton": dict(max_iters=2)},
            output=lambda out: out[0] if isinstance(out, tuple) else out,
            bad_params=[
                ("radius_negative", dict(radius=-1.0), ValueError, "radius"),
                ("radius_nan", dict(radius=_NAN), ValueError, "radius"),
                ("radius_huge", dict(radius=1e6), ValueError, "radius"),
                ("radius_str", dict(radius="2"), TypeError, "radius"),
                ("max_iters_negative", dict(max_iters=-1), ValueError, "max_iters"),
                ("max_iters_float", dict(max_iters=2.5), TypeError, "max_iters"),
                ("max_iters_bool", dict(max_iters=True), TypeError, "max_iters"),
                ("tol_negative", dict(tol=-1e-3), ValueError, "tol"),
                ("tol_nan", dict(tol=_NAN), ValueError, "tol"),
                ("mode", dict(mode="gauss-seidel"), ValueError, "mode"),
                ("return_sweeps_int", dict(return_sweeps=1), TypeError, "return_sweeps"),
                ("backend", dict(backend="metal"), ValueError, "backend"),
            ],
            legal_params=[
                ("radius_zero", dict(radius=0.0)),
                ("radius_below_one", dict(radius=0.5)),
                ("radius_three", dict(radius=3.0)),
                ("max_iters_zero", dict(max_iters=0)),
                ("max_iters_one", dict(max_iters=1)),
                ("tol_zero", dict(tol=0.0)),
                ("return_sweeps", dict(return_sweeps=True)),
            ],
            legal_shapes=[("one_row", [(1, 2, 1, 9)]), ("one_column", [(2, 1, 8, 1)])],
        ),
        OpSpec(
            name="distance_transform",
            call=lambda m, **p: geokernels.distance_transform(m, **p),
            reference=_strip_backend(lambda m, **p: reference.distance_transform(m, **p)),
            tensors=[TensorArg("mask", IMAGE, binary, kind="mask", low_precision_cpu="legal")],
            exact=True,
            backend_op="distance_transform",
            backends=("cpu",),
            bad_params=[
                ("dtype_int", dict(dtype=torch.int32), TypeError, "dtype"),
                ("dtype_half", dict(dtype=torch.float16), TypeError, "dtype"),
                ("dtype_str", dict(dtype="float32"), TypeError, "dtype"),
                ("invert_int", dict(invert=1), TypeError, "invert"),
                ("no_background", dict(no_background="zero"), ValueError, "no_background"),
                ("backend_triton", dict(backend="triton"), ValueError, "backend"),
            ],
            legal_params=[
                ("invert", dict(invert=True)),
                ("float64", dict(dtype=torch.float64)),
                ("no_background_scipy", dict(no_background="scipy")),
            ],
            legal_shapes=[("one_row", [(1, 2, 1, 9)]), ("one_column", [(2, 1, 8, 1)])],
        ),
        OpSpec(
            name="contour_flow_field",
            call=lambda m, **p: geokernels.contour_flow_field(m, **p),
            reference=_cff_reference,
            tensors=[TensorArg("mask", IMAGE, binary, kind="mask", low_precision_cpu="legal")],
            exact=True,
            backend_op="contour_flow_field",
            backends=("cpu",),
            bad_params=[
                ("stencil", dict(stencil="backward"), ValueError, "stencil"),
                ("smooth_sigma_negative", dict(smooth_sigma=-1.0), ValueError, "smooth_sigma"),
                ("smooth_sigma_nan", dict(smooth_sigma=_NAN), ValueError, "smooth_sigma"),
                ("threshold_nan", dict(threshold=_NAN), ValueError, "threshold"),
                ("threshold_str", dict(threshold="0.5"), TypeError, "threshold"),
                ("dtype_int", dict(dtype=torch.int64), TypeError, "dtype"),
                ("backend", dict(backend="metal"), ValueError, "backend"),
            ],
            legal_params=[
                ("central", dict(stencil="central")),
                ("smoothed", dict(smooth_sigma=1.0)),
                ("float64", dict(dtype=torch.float64)),
                ("threshold", dict(threshold=0.5)),
            ],
            legal_shapes=[("one_row", [(1, 2, 1, 9)]), ("one_column", [(2, 1, 8, 1)])],
        ),
        OpSpec(
            name="flow_mismatch",
            call=_fm_call,
            reference=_fm_reference,
            tensors=[TensorArg("x", (2, 2, 5, 6), normal)],
            backend_op="flow_mismatch",
            backends=("cpu", "triton"),
            bad_params=[
                ("K_zero", dict(K=0), ValueError, "K"),
                ("K_float", dict(K=1.5), TypeError, "K"),
                ("T_zero", dict(T=0), ValueError, "T"),
                ("T_negative", dict(T=-3), ValueError, "T"),
                ("agg_unknown", dict(agg="max"), ValueError, "agg"),
                ("agg_not_str", dict(agg=3), TypeError, "agg"),
                ("agg_quantile_zero", dict(agg="quantile:0"), ValueError, "agg"),
                ("agg_quantile_above_one", dict(agg="quantile:1.5"), ValueError, "agg"),
                ("agg_quantile_negative", dict(agg="quantile:-0.2"), ValueError, "agg"),
                ("agg_quantile_text", dict(agg="quantile:half"), ValueError, "agg"),
                ("r_nan", dict(r=_NAN), ValueError, "r"),
                ("seed_negative", dict(seed=-1), ValueError, "seed"),
                ("seed_too_big", dict(seed=2**64), ValueError, "seed"),
                ("seed_float", dict(seed=1.0), TypeError, "seed"),
                ("chunk_zero", dict(chunk=0), ValueError, "chunk"),
                ("smooth_sigma_negative", dict(smooth_sigma=-0.5), ValueError, "smooth_sigma"),
                ("offset_negative", dict(image_index_offset=-1), ValueError, "image_index_offset"),
                ("offset_overflow", dict(image_index_offset=2**32 - 1), ValueError,
                 "image_index_offset"),
                ("progress_int", dict(progress=1), TypeError, "progress"),
                ("noise_cache_int", dict(noise_cache=1), TypeError, "noise_cache"),
                ("model_not_callable", dict(model=3), TypeError, "model"),
                ("model_wrong_shape", dict(model=lambda x_t, t, c: x_t[:, :1]), ValueError, "model"),
                ("model_nan", dict(model=lambda x_t, t, c: x_t * _NAN), ValueError, "model"),
                ("cond_wrong_batch", dict(cond=torch.zeros(5)), ValueError, "cond"),
                ("backend", dict(backend="metal"), ValueError, "backend"),
            ],
            legal_params=[
                ("K1_T1", dict(K=1, T=1)),
                ("agg_mean", dict(agg="mean")),
                ("agg_median", dict(agg="median")),
                ("agg_quantile_one", dict(agg="quantile:1")),
                ("agg_quantile_half", dict(agg="quantile:0.5")),
                ("chunk_one", dict(chunk=1)),
                ("chunk_four", dict(chunk=4)),
                ("no_noise_cache", dict(noise_cache=False)),
                ("smoothed", dict(smooth_sigma=1.0)),
                ("offset", dict(image_index_offset=7)),
                ("seed_top_bit", dict(seed=2**63 + 5)),
            ],
            legal_shapes=[("one_channel", [(3, 1, 4, 7)])],
        ),
        OpSpec(
            name="flow_mismatch[noise]",
            call=_fm_call,
            reference=_fm_reference,
            tensors=[TensorArg("x", (2, 2, 5, 6), normal),
                     TensorArg("noise", (2, 3, 2, 5, 6), normal, channel_dim=2,
                               low_precision_cpu="legal")],
            backend_op="flow_mismatch",
            backends=("cpu", "triton"),
            bad_shapes=[
                ("noise_wrong_channels", [(2, 2, 5, 6), (2, 3, 3, 5, 6)], ValueError, "noise"),
                ("noise_wrong_K", [(2, 2, 5, 6), (2, 4, 2, 5, 6)], ValueError, "noise"),
                ("noise_wrong_batch", [(2, 2, 5, 6), (1, 3, 2, 5, 6)], ValueError, "noise"),
            ],
            legal_params=[("agg_median", dict(agg="median")), ("chunk_two", dict(chunk=2))],
        ),
        OpSpec(
            name="flow_mismatch_noise",
            call=_noise_call,
            reference=_noise_reference,
            # only x's shape, dtype and device matter: NaN/Inf values are legal
            tensors=[TensorArg("x", (2, 2, 5, 6), normal, checks_values=False)],
            # float32 normals; the reference evaluates the same formulas in float64
            rtol_dtype=torch.float32,
            backend_op="flow_mismatch",
            backends=("cpu", "triton"),
            bad_params=[
                ("K_zero", dict(K=0), ValueError, "K"),
                ("seed_negative", dict(seed=-4), ValueError, "seed"),
                ("seed_too_big", dict(seed=2**64), ValueError, "seed"),
                ("offset_negative", dict(image_index_offset=-1), ValueError, "image_index_offset"),
                ("offset_overflow", dict(image_index_offset=2**32), ValueError,
                 "image_index_offset"),
            ],
            legal_params=[("K1", dict(K=1)), ("offset", dict(image_index_offset=9)),
                          ("seed_top_bit", dict(seed=2**64 - 1))],
        ),
        OpSpec(
            name="smooth_heatmap",
            call=lambda h, **p: geokernels.smooth_heatmap(h, **dict(dict(sigma=1.5), **p)),
            reference=lambda h, **p: reference.gaussian_smooth(h, **dict(dict(sigma=1.5), **p)),
            tensors=[TensorArg("heat", (2, 7, 6), positive, channel_dim=None,
                               low_precision_cpu="legal")],
            differentiable=True,
            bad_params=[
                ("sigma_negative", dict(sigma=-1.0), ValueError, "sigma"),
                ("sigma_nan", dict(sigma=_NAN), ValueError, "sigma"),
                ("truncate_negative", dict(truncate=-1.0), ValueError, "truncate"),
                ("truncate_inf", dict(truncate=_INF), ValueError, "truncate"),
            ],
            legal_params=[("sigma_zero", dict(sigma=0.0)), ("sigma_large", dict(sigma=9.0)),
                          ("truncate_zero", dict(truncate=0.0))],
        ),
        OpSpec(
            name="anomaly_score",
            call=lambda h, **p: geokernels.anomaly_score(h, **p),
            reference=lambda h, **p: reference.anomaly_score(h, **p),
            tensors=[TensorArg("heatmap", (2, 7, 6), positive, channel_dim=None,
                               low_precision_cpu="legal", legal_ranks=(2,))],
            differentiable=True,
            bad_params=[
                ("mode", dict(mode="mean"), ValueError, "mode"),
                ("topk_zero", dict(topk=0.0), ValueError, "topk"),
                ("topk_above_one", dict(topk=1.5), ValueError, "topk"),
                ("topk_negative", dict(topk=-0.1), ValueError, "topk"),
                ("topk_nan", dict(topk=_NAN), ValueError, "topk"),
                ("topk_str", dict(topk="0.1"), TypeError, "topk"),
            ],
            legal_params=[("topk_one", dict(topk=1.0)), ("max", dict(mode="max")),
                          ("topk_mean", dict(mode="topk_mean", topk=0.3))],
        ),
    ]
    if hasattr(geokernels, "qc1_loss"):  # the D-Convexity losses (dconvex-losses branch)
        specs.append(OpSpec(
            name="qc1_loss",
            call=lambda u, **p: geokernels.qc1_loss(u, **dict(dict(window=3, reduction="none"), **p)),
            reference=_drop(lambda u, **p: reference.qc1_loss(
                u, **dict(dict(window=3, reduction="none"), **p)), "backend"),
            tensors=[TensorArg("u", IMAGE, uniform)],
            differentiable=True,
            backend_op="qc1_loss",
            bad_params=[
                ("window_even", dict(window=4), ValueError, "window"),
                ("window_zero", dict(window=0), ValueError, "window"),
                ("window_negative", dict(window=-3), ValueError, "window"),
                ("window_float", dict(window=3.0), TypeError, "window"),
                ("reduction", dict(reduction="max"), ValueError, "reduction"),
                ("backend", dict(backend="metal"), ValueError, "backend"),
            ],
            legal_params=[("window_one", dict(window=1)), ("window_seven", dict(window=7)),
                          ("mean", dict(reduction="mean")), ("sum", dict(reduction="sum"))],
            legal_shapes=[("one_row", [(1, 2, 1, 9)]), ("one_column", [(2, 1, 8, 1)])],
        ))
    if hasattr(geokernels, "fidelity_loss"):
        specs.append(OpSpec(
            name="fidelity_loss",
            call=lambda u, u0, **p: geokernels.fidelity_loss(u, u0, **p),
            reference=lambda u, u0, **p: reference.fidelity_loss(u, u0, **p),
            tensors=[TensorArg("u", IMAGE, uniform), TensorArg("u0", IMAGE, uniform)],
            differentiable=True,
            same_dtype=True,
            bad_shapes=[("u0_other_shape", [IMAGE, (2, 3, 5, 7)], ValueError, "u0")],
        ))
    if hasattr(geokernels, "cgpm"):
        specs.append(OpSpec(
            name="cgpm",
            # 3 unrolled Adam steps keep the reference cheap
            call=lambda x, **p: geokernels.cgpm(x, **dict(dict(steps=3), **p)),
            reference=_drop(lambda x, **p: reference.cgpm(x, **dict(dict(steps=3), **p)),
                            "backend"),
            tensors=[TensorArg("logits", IMAGE, normal)],
            rtol_factor=10,  # unrolled iterations
            backend_op="cgpm",
            bad_params=[
                ("steps_negative", dict(steps=-1), ValueError, "steps"),
                ("steps_float", dict(steps=2.5), TypeError, "steps"),
                ("lr_negative", dict(lr=-1e-2), ValueError, "lr"),
                ("lr_nan", dict(lr=_NAN), ValueError, "lr"),
                ("method", dict(method="c3"), ValueError, "method"),
                ("weight_negative", dict(weight=-1.0), ValueError, "weight"),
                ("betas_above_one", dict(betas=(0.9, 1.5)), ValueError, "betas"),
                ("betas_not_pair", dict(betas=0.9), TypeError, "betas"),
                ("adam_eps_zero", dict(adam_eps=0.0), ValueError, "adam_eps"),
                ("return_history_int", dict(return_history=1), TypeError, "return_history"),
                ("unknown_loss_kwarg", dict(window=3), TypeError, "window"),
                ("backend", dict(backend="metal"), ValueError, "backend"),
            ],
            legal_params=[("steps_zero", dict(steps=0)), ("relu", dict(activation="relu")),
                          ("c1", dict(method="c1", window=3))],
        ))
    if hasattr(geokernels, "contour_flow_loss"):
        specs.append(OpSpec(
            name="contour_flow_loss",
            call=lambda x, f, **p: geokernels.contour_flow_loss(
                x, f, **dict(dict(reduction="none"), **p)),
            reference=_drop(lambda x, f, **p: reference.contour_flow_loss(
                x, f, **dict(dict(reduction="none"), **p)), "backend"),
            tensors=[TensorArg("logits", (2, 2, 5, 6), normal),
                     TensorArg("flow", (2, 4, 5, 6), normal, channel_factor=2)],
            differentiable=True,
            backend_op="contour_flow_loss",
            backends=("cpu", "triton"),
            bad_shapes=[
                ("flow_channels_not_2C", [(2, 2, 5, 6), (2, 3, 5, 6)], ValueError, "flow"),
                ("flow_other_size", [(2, 2, 5, 6), (2, 4, 5, 7)], ValueError, "flow"),
                ("flow_other_batch", [(2, 2, 5, 6), (1, 4, 5, 6)], ValueError, "flow"),
            ],
            bad_params=[
                ("eps_zero", dict(eps=0.0), ValueError, "eps"),
                ("eps_negative", dict(eps=-1.0), ValueError, "eps"),
                ("eps_nan", dict(eps=_NAN), ValueError, "eps"),
                ("reduction", dict(reduction="max"), ValueError, "reduction"),
                ("backend", dict(backend="metal"), ValueError, "backend"),
            ],
            legal_params=[("mean", dict(reduction="mean")), ("sum", dict(reduction="sum")),
                          ("eps_large", dict(eps=0.5))],
            legal_shapes=[("one_channel", [(3, 1, 4, 7), (3, 2, 4, 7)])],
        ))
    if hasattr(geokernels, "cfss_iterate"):
        specs.append(OpSpec(
            name="cfss_iterate",
            # 3 iterations keep the reference loop cheap; iters is varied by legal_params
            call=lambda o, t, **p: geokernels.cfss_iterate(o, t, **dict(dict(iters=3), **p)),
            reference=_drop(lambda o, t, **p: reference.cfss_iterate(
                o, t, **dict(dict(iters=3), **p)), "backend", "checkpoint"),
            tensors=[TensorArg("o", (2, 1, 5, 6), normal),
                     TensorArg("T", (2, 2, 5, 6), normal, channel_factor=2)],
            differentiable=True,
            rtol_factor=10,  # unrolled iterations
            backend_op="cfss_iterate",
            backends=("cpu",),
            bad_shapes=[
                ("T_channels_not_2C", [(2, 1, 5, 6), (2, 1, 5, 6)], ValueError, "T"),
                ("T_other_size", [(2, 1, 5, 6), (2, 2, 6, 6)], ValueError, "T"),
            ],
            bad_params=[
                ("iters_negative", dict(iters=-1), ValueError, "iters"),
                ("iters_float", dict(iters=1.5), TypeError, "iters"),
                ("halfsize_negative", dict(halfsize=-1), ValueError, "halfsize"),
                ("eps_zero", dict(eps=0.0), ValueError, "eps"),
                ("eps_negative", dict(eps=-1.0), ValueError, "eps"),
                ("sigma_zero", dict(sigma=0.0), ValueError, "sigma"),
                ("sigma_negative", dict(sigma=-2.0), ValueError, "sigma"),
                ("tau_nan", dict(tau=_NAN), ValueError, "tau"),
                ("lam_inf", dict(lam=_INF), ValueError, "lam"),
                ("lam_str", dict(lam="1"), TypeError, "lam"),
                ("q_nonneg_int", dict(q_nonneg=1), TypeError, "q_nonneg"),
                ("checkpoint_unknown", dict(checkpoint="never"), ValueError, "checkpoint"),
                ("checkpoint_zero", dict(checkpoint=0), ValueError, "checkpoint"),
                ("checkpoint_float", dict(checkpoint=1.5), TypeError, "checkpoint"),
                ("backend", dict(backend="metal"), ValueError, "backend"),
            ],
            legal_params=[
                ("iters_zero", dict(iters=0)), ("iters_one", dict(iters=1)),
                ("q_nonneg", dict(q_nonneg=True)), ("halfsize_zero", dict(halfsize=0)),
                ("scalars", dict(eps=0.5, tau=0.3, lam=2.0, sigma=1.5)),
                ("checkpoint_store", dict(checkpoint="store")),
                ("checkpoint_recompute", dict(checkpoint="recompute", iters=5)),
                ("checkpoint_every_2", dict(checkpoint=2, iters=5)),
            ],
            legal_shapes=[("two_classes", [(1, 2, 4, 7), (1, 4, 4, 7)])],
        ))
    return specs


def _available(spec: OpSpec) -> bool:
    return hasattr(geokernels, spec.name.split("[")[0])


SPECS = [s for s in _specs() if _available(s)]
SPECS_BY_NAME = {s.name: s for s in SPECS}
