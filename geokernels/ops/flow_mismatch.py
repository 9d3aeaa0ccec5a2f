"""Flow Mismatching anomaly scoring: public API and fake kernels (SPEC.md 3).

``flow_mismatch`` drives any velocity model through the fused kernels, one time step at a time:

    for each group of images (``chunk`` bounds the paths per model call):
        for j = 1 .. T:                                  t_j = j / (T + 1)
            x_t  = flow_mismatch_paths(x, t_j, ...)      (B*K, C, H, W), eps_k regenerated
            v    = model(x_t, t_j, cond)
            heat += t_j^r / T * agg_k sum_c (v - (x - eps_k))^2   (fused, eps_k regenerated again)

so the noise is never stored (it is a pure function of (seed, image index, k), see
csrc/include/geokernels/philox.h), the (K, T, C, H, W) stack never exists, and peak memory is
the model's input and output for one call. On the C++ CPU backend, where Philox + Box-Muller
costs more than the memory passes, ``noise_cache`` (default there) draws a group's K noise
tensors once from the same stream instead of 2T times: one more model input of memory, same
heatmaps. There is no autograd: scoring is inference.
"""
from __future__ import annotations

import math
from fractions import Fraction
from numbers import Integral

import torch

from geokernels import _checks, _extension
from geokernels._backend import register_op, resolve
from geokernels.ops._autocast import autocast_device, float32_under_autocast, upcast
from geokernels.ops._validate import check_choice, check_image, check_int, check_maps, check_real
from geokernels.reference.flow_mismatch import flow_mismatch as _reference_flow_mismatch
from geokernels.reference.flow_mismatch import flow_mismatch_noise as _reference_noise

register_op("flow_mismatch", ("cpu", "cuda", "triton"))
register_op("flow_mismatch_noise", ("cpu", "cuda", "triton"))

AGGREGATIONS = ("min", "mean", "median", "quantile:<alpha>")
SCORE_MODES = ("max+topk", "max", "topk_mean")
_MAX_INDEX = 2**32  # image and path indices are 32-bit Philox counter words


# ---- argument parsing ---------------------------------------------------------------------------
def parse_agg(agg, K: int) -> tuple[int, bool]:
    """(rank, mean) of an aggregation: rank = the 1-based order statistic the kernels select
    ("min" -> 1, "median" -> the lower median (K-1)//2 + 1 as torch.median, "quantile:a" ->
    ceil(a*K) with a read as an exact decimal); mean=True for "mean"."""
    if not isinstance(agg, str):
        raise TypeError(f"agg must be a str, one of {AGGREGATIONS}, got {type(agg).__name__}")
    if agg == "mean":
        return 1, True
    if agg == "min":
        return 1, False
    if agg == "median":
        return (K - 1) // 2 + 1, False
    if agg.startswith("quantile:"):
        text = agg.split(":", 1)[1].strip()
        try:
            alpha = Fraction(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"agg quantile must be a number in (0, 1], got {agg!r}") from None
        if not 0 < alpha <= 1:
            raise ValueError(f"agg quantile must lie in (0, 1], got {agg!r}")
        return max(1, math.ceil(alpha * K)), False
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def _check_seed(seed) -> int:
    """A seed in [0, 2^64), returned as the int64 with the same bits (the schema type)."""
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def _check_offset(offset, B: int) -> int:
    offset = check_int(offset, "image_index_offset", min_value=0)
    if offset + B > _MAX_INDEX:
        raise ValueError(f"image_index_offset + B must be <= 2^32, got {offset} + {B}")
    return offset


def _check_noise(noise, x: torch.Tensor, K: int):
    if noise is None:
        return None
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    want = (x.shape[0], K) + tuple(x.shape[1:])
    if tuple(noise.shape) != want:
        raise ValueError(f"noise must have shape (B, K, C, H, W) = {want}, got {tuple(noise.shape)}")
    if noise.device != x.device:
        raise ValueError(f"noise must be on the device of x ({x.device}), got {noise.device}")
    _checks.check_finite(noise, "noise")
    return noise.to(x.dtype).contiguous()


def _heat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---- the backends' kernel sets ------------------------------------------------------------------
class _CppKernels:
    """torch.ops.geokernels.* (C++ CPU or CUDA kernels, picked by the dispatcher)."""

    noise = staticmethod(lambda *a: torch.ops.geokernels.flow_mismatch_noise(*a))
    paths = staticmethod(lambda *a: torch.ops.geokernels.flow_mismatch_paths(*a))
    delta = staticmethod(lambda *a: torch.ops.geokernels.flow_mismatch_delta(*a))
    accumulate_ = staticmethod(lambda *a: torch.ops.geokernels.flow_mismatch_accumulate_(*a))
    aggregate_ = staticmethod(lambda *a: torch.ops.geokernels.flow_mismatch_aggregate_(*a))


def _kernels(backend: str):
    if backend == "triton":
        from geokernels.triton import flow_mismatch as _triton_fm

        return _triton_fm
    return _CppKernels


# ---- model calls --------------------------------------------------------------------------------
def _expand_cond(cond, B: int, K: int):
    """Per-path conditioning: a tensor with one entry per image is repeated for its K paths
    (path n = b*K + k gets cond[b]); anything else (None, a 0-dim tensor, a Python value) is
    passed to every call unchanged."""
    if isinstance(cond, torch.Tensor) and cond.dim() >= 1:
        if cond.shape[0] != B:
            raise ValueError(f"cond must have one entry per image (leading dimension B = {B}), "
                             f"got shape {tuple(cond.shape)}")
        return cond.repeat_interleave(K, dim=0)
    return cond


def _slice_cond(cond_paths, start: int, stop: int):
    if isinstance(cond_paths, torch.Tensor) and cond_paths.dim() >= 1:
        return cond_paths[start:stop]
    return cond_paths


def _check_velocity(v, x_t: torch.Tensor) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"model must return a torch.Tensor of velocities, got {type(v).__name__}")
    if tuple(v.shape) != tuple(x_t.shape):
        raise ValueError(f"model must return velocities of the shape of its input x_t "
                         f"{tuple(x_t.shape)}, got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"model must return floating-point velocities, got dtype {v.dtype}")
    if v.device != x_t.device:
        raise ValueError(f"model must return velocities on {x_t.device}, got {v.device}")
    return v.to(x_t.dtype) if v.dtype != x_t.dtype else v


def _call_model(model, x_t: torch.Tensor, t: float, cond):
    t_vec = torch.full((x_t.shape[0],), t, dtype=x_t.dtype, device=x_t.device)
    return _check_velocity(model(x_t, t_vec, cond), x_t)


def _checked_model(model, check_values: bool):
    """The model as the reference loop calls it, with the fused path's output checks."""

    def call(x_t, t, cond):
        v = _check_velocity(model(x_t, t, cond), x_t)
        if check_values and not bool(torch.isfinite(v).all()):
            _raise_nonfinite(float(t[0]))
        return v

    return call


def _raise_nonfinite(t: float):
    raise ValueError(f"model returned NaN or Inf velocities (at t = {t:.6g}); the mismatch "
                     "heatmap would be meaningless")


# ---- the driver ---------------------------------------------------------------------------------
def _score_fused(kern, model, x, K, T, rank, mean, r, seed, cond, noise, chunk, offset, progress,
                 noise_cache):
    B, C, H, W = x.shape
    heat = torch.zeros(B, H, W, dtype=_heat_dtype(x.dtype), device=x.device)
    chunk = B * K if chunk is None else chunk
    check_values = _checks.values_checked(x)
    images_per_call = max(1, chunk // K)
    cond_paths = _expand_cond(cond, B, K)
    steps = [(j / (T + 1), (j / (T + 1)) ** r / T) for j in range(1, T + 1)]
    groups = [(b0, min(b0 + images_per_call, B)) for b0 in range(0, B, images_per_call)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups) * T, desc="flow_mismatch", unit="step")
    for b0, b1 in groups:
        xg = x[b0:b1]
        ng = noise[b0:b1] if noise is not None else None
        if ng is None and noise_cache and chunk >= K and heat.dtype == x.dtype:
            # the group's K noise tensors, drawn once from the same stream and read by the
            # explicit-noise kernels for all T steps (one model input's worth of memory)
            ng = kern.noise(xg, seed, offset + b0, K)
        hg = heat[b0:b1]
        for t, w in steps:
            if chunk >= K:  # all K paths of the group's images in one model call: fused reduction
                x_t = kern.paths(xg, ng, t, seed, offset + b0, K, 0, (b1 - b0) * K)
                v = _call_model(model, x_t, t, _slice_cond(cond_paths, b0 * K, b1 * K))
                del x_t
                bad = kern.accumulate_(hg, v, xg, ng, w, seed, offset + b0, K, rank, mean)
                del v  # before the next step's x_t exists
            else:  # one image's paths over several calls: (1, K, H, W) mismatch buffer
                delta = torch.empty(1, K, H, W, dtype=_heat_dtype(x.dtype), device=x.device)
                for k0 in range(0, K, chunk):
                    k1 = min(k0 + chunk, K)
                    x_t = kern.paths(xg, ng, t, seed, offset + b0, K, k0, k1 - k0)
                    v = _call_model(model, x_t, t, _slice_cond(cond_paths, b0 * K + k0, b0 * K + k1))
                    del x_t
                    delta[0, k0:k1] = kern.delta(v, xg, ng, seed, offset + b0, K, k0)
                    del v
                bad = kern.aggregate_(hg, delta, w, rank, mean)
            if check_values and bool(bad):
                _raise_nonfinite(t)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return heat


def flow_mismatch(
    model,
    x: torch.Tensor,
    K: int = 8,
    T: int = 24,
    agg: str = "min",
    r: float = 2.0,
    seed: int = 0,
    cond=None,
    noise: torch.Tensor | None = None,
    chunk: int | None = None,
    smooth_sigma: float = 0.0,
    image_index_offset: int = 0,
    backend: str = "auto",
    progress: bool = False,
    noise_cache: bool | None = None,
) -> torch.Tensor:
    """Flow-mismatch anomaly heatmaps (SPEC.md 3).

    H(p) = (1/T) sum_{j=1..T} t_j^r * agg_k sum_c (v(x_t, t_j)_c(p) - (x - eps_k)_c(p))^2 with
    t_j = j/(T+1) and x_t = (1 - t_j) eps_k + t_j x on K noise paths per image.

    Args:
        model: velocity field, called as ``model(x_t, t, cond)`` with x_t (N, C, H, W) and t (N,)
            (N paths per call, t constant within a call); must return (N, C, H, W) velocities.
            Called under torch.no_grad().
        x: (B, C, H, W) test images, float32/float64 (float16/bfloat16 on CUDA).
        K: noise paths per image (>= 1). T: interior time steps (>= 1).
        agg: "min" (default), "mean", "median" (lower median, as torch.median) or
            "quantile:alpha" (the ceil(alpha*K)-th smallest, alpha in (0, 1]).
        r: time weight exponent, w(t) = t^r.
        seed: noise seed in [0, 2^64). eps_k of image b is the documented Philox stream of
            (seed, image_index_offset + b, k) (see flow_mismatch_noise); identical on every
            backend and for every chunk/batch split.
        cond: model conditioning: a tensor with one entry per image (leading dim B) is repeated
            for its K paths; anything else (None, a Python value) is passed through unchanged.
        noise: explicit (B, K, C, H, W) noise used instead of the generator (to reproduce other
            code's numbers); converted to x's dtype.
        chunk: at most this many paths per model call (default all B*K). chunk >= K scores
            chunk // K whole images per call; chunk < K splits one image's paths.
        smooth_sigma: Gaussian smoothing of H as scipy.ndimage.gaussian_filter (reflect border,
            truncate 4); 0 = off.
        image_index_offset: global index of x[0], so that scoring a dataset in batches gives the
            same noise, hence the same heatmaps, as scoring it at once.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (the reference loop).
        progress: show a tqdm bar over (image groups x time steps).
        noise_cache: False regenerates eps_k inside both kernels at every time step (no noise
            tensor exists at all); True draws each image group's K noise tensors once, from the
            same stream, and reuses them for the T steps (one extra model input of memory, 2T
            times fewer Philox evaluations). None (default) = True on the C++ CPU backend, where
            the generator is the bottleneck, False on CUDA/Triton, where it is free. The
            heatmaps are identical either way. Ignored when chunk < K, and for float16/bfloat16
            x (a cache in x's dtype would round eps; the kernels regenerate it in float32).

    Returns:
        (B, H, W) heatmaps; dtype of x (float32 for float16/bfloat16 inputs).

    Raises ValueError if the model returns NaN/Inf velocities (checked per
    geokernels.set_checks: always on CPU tensors, opt-in on CUDA; unchecked NaN propagates into H).
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t, cond), got {type(model).__name__}")
    if autocast_device((x,), {}) is not None:
        # autocast policy (ops/_autocast.py): the reduction runs in float32, the model calls
        # keep the caller's autocast
        x, noise = upcast(x), upcast(noise)
    check_image(x, "x")
    if x.device.type == "meta":
        raise ValueError("x is a meta tensor: flow_mismatch runs the model on real values")
    K = check_int(K, "K", min_value=1)
    if K > _MAX_INDEX:
        raise ValueError(f"K must be <= 2^32, got {K}")
    T = check_int(T, "T", min_value=1)
    rank, mean = parse_agg(agg, K)
    r = check_real(r, "r")
    seed_i64 = _check_seed(seed)
    offset = _check_offset(image_index_offset, x.shape[0])
    noise = _check_noise(noise, x, K)
    if chunk is not None:
        chunk = check_int(chunk, "chunk", min_value=1)
    smooth_sigma = check_real(smooth_sigma, "smooth_sigma", min_value=0.0)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if noise_cache is not None and not isinstance(noise_cache, bool):
        raise TypeError(f"noise_cache must be a bool or None, got {type(noise_cache).__name__}")
    _expand_cond(cond, x.shape[0], 1)  # one entry per image, whatever the backend
    be = resolve("flow_mismatch", backend, x)
    with torch.no_grad():
        if be == "torch":
            heat = _reference_flow_mismatch(_checked_model(model, _checks.values_checked(x)), x, K, T, agg,
                                            r, int(seed), cond, noise, 0.0, offset)
        else:
            if noise_cache is None:
                noise_cache = be == "cpu"
            heat = _score_fused(_kernels(be), model, x.contiguous(), K, T, rank, mean, r, seed_i64,
                                cond, noise, chunk, offset, progress, bool(noise_cache))
        return smooth_heatmap(heat, smooth_sigma)


@float32_under_autocast
def flow_mismatch_noise(x: torch.Tensor, K: int = 8, seed: int = 0, image_index_offset: int = 0,
                        backend: str = "auto") -> torch.Tensor:
    """The noise eps (B, K, C, H, W) that flow_mismatch regenerates for images x (SPEC.md 3).

    Values are float32 normals from the Philox stream documented in
    csrc/include/geokernels/philox.h, returned in x's dtype (exact for float32/float64; float16
    and bfloat16 round them, where flow_mismatch itself keeps them in float32). The C++ and
    CUDA backends, and compiled Triton, return identical bits (Triton's CPU interpreter may
    differ in the last bit); backend="torch" evaluates the same formulas in numpy float64,
    within a few float32 ulps of them.
    """
    check_image(x, "x", values=False)
    K = check_int(K, "K", min_value=1)
    seed_i64 = _check_seed(seed)
    offset = _check_offset(image_index_offset, x.shape[0])
    be = resolve("flow_mismatch_noise", backend, x)
    if be == "torch":
        B, C, H, W = x.shape
        return _reference_noise(B, K, C, H, W, int(seed), offset).to(
            torch.float32).to(device=x.device, dtype=x.dtype)
    # only x's shape, dtype and device matter: no gradient flows to x
    return _kernels(be).noise(x.detach().contiguous(), seed_i64, offset, K)


@float32_under_autocast
def smooth_heatmap(heat: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian smoothing of (B, H, W) maps, equal to scipy.ndimage.gaussian_filter(sigma) per
    map (mode "reflect", radius int(truncate*sigma + 0.5)); separable, in the map's dtype."""
    check_maps(heat, "heat")
    sigma = check_real(sigma, "sigma", min_value=0.0)
    truncate = check_real(truncate, "truncate", min_value=0.0)
    if sigma == 0:
        return heat
    B, H, W = heat.shape
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).to(device=heat.device, dtype=heat.dtype)

    def reflected(n):  # scipy "reflect": d c b a | a b c d | d c b a, any radius
        i = torch.arange(-radius, n + radius, device=heat.device) % (2 * n)
        return torch.where(i < n, i, 2 * n - 1 - i)

    kernel = weights.view(1, 1, -1)
    out = heat.index_select(1, reflected(H))  # (B, H + 2R, W): filter along rows (axis 0)
    out = torch.nn.functional.conv1d(out.permute(0, 2, 1).reshape(B * W, 1, -1), kernel)
    out = out.view(B, W, H).permute(0, 2, 1)
    out = out.index_select(2, reflected(W))  # then along columns (axis 1)
    out = torch.nn.functional.conv1d(out.reshape(B * H, 1, -1), kernel)
    return out.view(B, H, W).contiguous()


def _topk_count(topk, n):
    """ceil(topk * n), at least 1, with topk read as the exact decimal it prints as (0.07 * 100
    is 7, not the 8 that float rounding gives). Under torch.compile a topk that changed between
    calls is a symbolic float, which has no decimal text: there the float product is taken
    2**-50 (relative) low, more than its rounding error, which gives the same k for every topk
    with at most 7 decimal places on maps of up to 10**8 pixels."""
    if torch.compiler.is_compiling():
        return max(1, math.ceil(topk * n * (1.0 - 2.0 ** -50)))
    # exact, in integers, and traceable when n is symbolic
    frac = Fraction(str(topk))
    return max(1, -((-frac.numerator * n) // frac.denominator))


@float32_under_autocast
def anomaly_score(heatmap: torch.Tensor, mode: str = "max+topk", topk: float = 0.01) -> torch.Tensor:
    """Image anomaly scores from heatmaps (SPEC.md 3).

    Args:
        heatmap: (B, H, W) (or (H, W)) maps, e.g. from flow_mismatch.
        mode: "max+topk" = max_p H + mean of the top ceil(topk*H*W) values (default), "max",
            or "topk_mean".
        topk: fraction of pixels in (0, 1] (read as an exact decimal: ceil(0.01 * 16384) = 164).

    Returns:
        (B,) scores (a 0-dim tensor for a 2-D heatmap), dtype of the heatmap.
    """
    if not isinstance(heatmap, torch.Tensor):
        raise TypeError(f"heatmap must be a torch.Tensor, got {type(heatmap).__name__}")
    if not heatmap.is_floating_point():
        raise TypeError(f"heatmap must be a floating-point tensor, got dtype {heatmap.dtype}")
    if heatmap.dim() not in (2, 3) or heatmap.numel() == 0:
        raise ValueError(f"heatmap must have shape (B, H, W) or (H, W), non-empty, got "
                         f"{tuple(heatmap.shape)}")
    check_choice(mode, "mode", SCORE_MODES)
    topk = check_real(topk, "topk", min_value=0.0, min_inclusive=False, max_value=1.0)
    _checks.check_finite(heatmap, "heatmap")
    flat = heatmap.reshape(-1, heatmap.shape[-2] * heatmap.shape[-1])
    k = _topk_count(topk, flat.shape[1])
    mx = flat.amax(dim=1)
    if mode == "max":
        out = mx
    else:
        top = flat.topk(k, dim=1).values.mean(dim=1)
        out = top if mode == "topk_mean" else mx + top
    return out.reshape(()) if heatmap.dim() == 2 else out


# ---- fake kernels (torch.compile / meta tensors) ------------------------------------------------
def _noise_fake(x, seed, image_offset, num_paths):
    B, C, H, W = x.shape
    return x.new_empty((B, num_paths, C, H, W))


def _paths_fake(x, noise, t, seed, image_offset, num_paths, path_start, path_count):
    return x.new_empty((path_count,) + tuple(x.shape[1:]))


def _delta_fake(v, x, noise, seed, image_offset, num_paths, path_start):
    return x.new_empty((v.shape[0],) + tuple(x.shape[2:]), dtype=_heat_dtype(x.dtype))


def _accumulate_fake(heat, v, x, noise, weight, seed, image_offset, num_paths, rank, mean):
    return heat.new_empty((), dtype=torch.bool)


def _aggregate_fake(heat, delta, weight, rank, mean):
    return heat.new_empty((), dtype=torch.bool)


if _extension.compiled():
    _extension.require_ops("philox4x32_10", "flow_mismatch_noise", "flow_mismatch_paths",
                           "flow_mismatch_delta", "flow_mismatch_accumulate_",
                           "flow_mismatch_aggregate_")
    torch.library.register_fake("geokernels::philox4x32_10")(
        lambda counters, seed: torch.empty_like(counters, memory_format=torch.contiguous_format))
    torch.library.register_fake("geokernels::flow_mismatch_noise")(_noise_fake)
    torch.library.register_fake("geokernels::flow_mismatch_paths")(_paths_fake)
    torch.library.register_fake("geokernels::flow_mismatch_delta")(_delta_fake)
    torch.library.register_fake("geokernels::flow_mismatch_accumulate_")(_accumulate_fake)
    torch.library.register_fake("geokernels::flow_mismatch_aggregate_")(_aggregate_fake)
