"""flow_mismatch / anomaly_score (SPEC.md 3): every backend and aggregation vs the reference loop,
closed-form mismatches of the exact flow-matching velocity of a Gaussian, the population
identity (denoising term + ((1-t)/t)^2 Fisher divergence) by Monte Carlo, determinism across
runs / chunks / batch splits / CPU builds, and bad input."""
import math

import numpy as np
import pytest
import torch

import geokernels
from geokernels import reference
from tests._util import (assert_close_rel, backend_device_params, backends_for, cpu_build,
                         requires_cuda)

AGGS = ["min", "mean", "median", "quantile:0.3", "quantile:1"]


# ---- velocity fields --------------------------------------------------------------------------
class MixingModel:
    """A nonlinear velocity with channel and spatial mixing, built from elementwise ops only so
    that its output for an image does not depend on the batch it is in (chunk tests need that).
    Uses cond (one scalar per image) when given."""

    def __init__(self, C, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(C, C, generator=g, dtype=torch.float64) / C
        self.bias = torch.randn(C, generator=g, dtype=torch.float64)

    def __call__(self, x_t, t, cond):
        C = x_t.shape[1]
        mix, bias = self.mix.to(x_t), self.bias.to(x_t)
        chans = []
        for c in range(C):
            acc = bias[c] + t[:, None, None] * x_t[:, c]
            for c2 in range(C):
                acc = acc + mix[c, c2] * torch.tanh(x_t[:, c2])
            chans.append(acc)
        v = torch.stack(chans, dim=1) + 0.25 * x_t.roll(1, dims=-1) - 0.5 * x_t.roll(-1, dims=-2)
        if cond is not None:
            v = v * cond.to(x_t)[:, None, None, None]
        return v


def gaussian_velocity(mu, s):
    """Exact flow-matching velocity E[x - eps | x_t] of data N(mu, s^2 I) on x_t = (1-t) eps + t x:
    v(y, t) = mu + a_t (y - t mu), a_t = (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2)."""

    def model(y, t, cond):
        tt = t.to(torch.float64)[:, None, None, None]
        a = (tt * s**2 - (1 - tt)) / ((1 - tt) ** 2 + tt**2 * s**2)
        return (mu.to(y) + a.to(y) * (y - tt.to(y) * mu.to(y))).to(y.dtype)

    return model


def _cpu_backends():
    return ["cpu"] + (["triton"] if "triton" in backends_for("flow_mismatch", "cpu") else [])


def _inputs(B, C, H, W, K, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    noise = torch.randn(B, K, C, H, W, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), noise.to(device=device, dtype=dtype)


# ---- parity with the reference loop -----------------------------------------------------------
@pytest.mark.parametrize("device,backend", backend_device_params("flow_mismatch"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("agg", AGGS)
def test_matches_reference_explicit_noise(device, backend, dtype, agg):
    small = backend == "triton" and device == "cpu"  # interpreter: keep it tiny
    cases = [(2, 3, 5, 7, 3, 2)] if small else [(2, 3, 5, 7, 3, 4), (1, 1, 17, 23, 8, 3),
                                                 (3, 2, 8, 8, 5, 2)]
    for B, C, H, W, K, T in cases:
        x, noise = _inputs(B, C, H, W, K, dtype, device)
        model = MixingModel(C)
        ref = reference.flow_mismatch(model, x.cpu().double(), K=K, T=T, agg=agg, r=1.5,
                                      noise=noise.cpu().double())
        out = geokernels.flow_mismatch(model, x, K=K, T=T, agg=agg, r=1.5, noise=noise, backend=backend)
        assert out.shape == (B, H, W) and out.dtype == dtype and out.device == x.device
        assert_close_rel(out, ref, dtype, factor=3, what=f"{(B, C, H, W, K, T)} {agg}")


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("agg", ["min", "median", "quantile:0.3", "quantile:1", "mean"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_many_paths(backend, agg, chunk):
    # K = 40: past the pairwise count's tile (Triton counts against re-read columns, with the
    # fused path going through a mismatch buffer), min/max without counting; chunk < K takes
    # the aggregate path; exact ties from repeated noise draws
    B, C, H, W, K, T = 2, 2, 3, 5, 40, 2
    x, noise = _inputs(B, C, H, W, K, torch.float64)
    noise[:, 20:30] = noise[:, 0:10]
    model = MixingModel(C)
    ref = reference.flow_mismatch(model, x, K=K, T=T, agg=agg, noise=noise)
    for dtype in (torch.float64, torch.float32):
        out = geokernels.flow_mismatch(model, x.to(dtype), K=K, T=T, agg=agg, noise=noise.to(dtype),
                                       chunk=chunk, backend=backend)
        assert_close_rel(out, ref, dtype, factor=3, what=f"{agg} {dtype}")


@pytest.mark.parametrize("backend", _cpu_backends())
def test_regenerated_noise_matches_reference(backend):
    """noise=None: the kernels' stream equals flow_mismatch_noise, and the reference's float64
    evaluation of the documented stream to float32 rounding."""
    B, C, H, W, K, T = 2, 2, 6, 5, 3, 3
    x, _ = _inputs(B, C, H, W, K, torch.float64)
    model = MixingModel(C)
    out = geokernels.flow_mismatch(model, x, K=K, T=T, agg="median", seed=5, image_index_offset=4,
                                   backend=backend)
    eps = geokernels.flow_mismatch_noise(x, K=K, seed=5, image_index_offset=4, backend=backend)
    exact = reference.flow_mismatch(model, x, K=K, T=T, agg="median", noise=eps)
    assert_close_rel(out, exact, torch.float64, factor=10 if backend == "triton" else 1)
    documented = reference.flow_mismatch(model, x, K=K, T=T, agg="median", seed=5, image_index_offset=4)
    assert_close_rel(out, documented, torch.float32, factor=1)


def test_torch_backend_is_the_reference():
    x, noise = _inputs(2, 1, 4, 4, 2, torch.float64)
    model = MixingModel(1)
    out = geokernels.flow_mismatch(model, x, K=2, T=2, noise=noise, backend="torch")
    ref = reference.flow_mismatch(model, x, K=2, T=2, noise=noise)
    assert torch.equal(out, ref)


def test_cond_per_image():
    B, C, H, W, K = 3, 2, 5, 6, 4
    x, noise = _inputs(B, C, H, W, K, torch.float64)
    cond = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    model = MixingModel(C)
    ref = reference.flow_mismatch(model, x, K=K, T=3, noise=noise, cond=cond)
    for chunk in (None, 2, K, 2 * K):
        out = geokernels.flow_mismatch(model, x, K=K, T=3, noise=noise, cond=cond, chunk=chunk,
                                       backend="cpu")
        assert_close_rel(out, ref, torch.float64, what=f"chunk={chunk}")


def test_smoothing_matches_scipy():
    from scipy import ndimage

    heat = torch.rand(2, 13, 9, dtype=torch.float64)
    for sigma in (0.5, 1.3, 4.0):  # 4.0: the kernel radius (16) exceeds the map
        want = np.stack([ndimage.gaussian_filter(h, sigma) for h in heat.numpy()])
        got = geokernels.smooth_heatmap(heat, sigma)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(reference.gaussian_smooth(heat, sigma).numpy(), want,
                                   rtol=1e-12, atol=1e-14)
    # through flow_mismatch: smoothing is applied to H
    x, noise = _inputs(1, 1, 8, 8, 2, torch.float64)
    model = MixingModel(1)
    raw = geokernels.flow_mismatch(model, x, K=2, T=2, noise=noise, backend="cpu")
    smooth = geokernels.flow_mismatch(model, x, K=2, T=2, noise=noise, smooth_sigma=1.5, backend="cpu")
    np.testing.assert_allclose(smooth[0].numpy(), ndimage.gaussian_filter(raw[0].numpy(), 1.5),
                               rtol=1e-12, atol=1e-14)


# ---- determinism ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _cpu_backends())
def test_identical_across_chunks_and_batch_splits(backend):
    B, C, H, W, K = 3, 2, 7, 9, 4
    if backend == "triton":  # the interpreter is slow: tiny
        B, C, H, W, K = 2, 1, 4, 5, 3
    x, _ = _inputs(B, C, H, W, K, torch.float32)
    model = MixingModel(C)
    kw = dict(K=K, T=2, agg="quantile:0.5", seed=11, backend=backend, noise_cache=False)
    full = geokernels.flow_mismatch(model, x, **kw)
    chunks = (1, 3, K, K + 1, 2 * K) if backend == "cpu" else (2,)
    for chunk in chunks:
        assert torch.equal(geokernels.flow_mismatch(model, x, chunk=chunk, **kw), full), chunk
    # scoring a dataset in batches: image_index_offset keeps each image's noise
    parts = [geokernels.flow_mismatch(model, x[:1], **kw),
             geokernels.flow_mismatch(model, x[1:], image_index_offset=1, **kw)]
    assert torch.equal(torch.cat(parts), full)
    assert torch.equal(geokernels.flow_mismatch(model, x, **kw), full)  # run to run


@pytest.mark.parametrize("backend", _cpu_backends())
def test_noise_cache_gives_identical_heatmaps(backend):
    """Drawing each group's noise once (noise_cache=True) or regenerating it inside both kernels
    at every step (False) reads the same stream: identical heatmaps, for every chunking."""
    B, C, H, W, K = (2, 2, 5, 7, 3) if backend == "triton" else (3, 3, 9, 11, 4)
    x, _ = _inputs(B, C, H, W, K, torch.float64 if backend == "cpu" else torch.float32)
    model = MixingModel(C)
    for agg in ("min", "median") if backend == "cpu" else ("median",):
        kw = dict(K=K, T=2, agg=agg, seed=3, backend=backend)
        regenerated = geokernels.flow_mismatch(model, x, noise_cache=False, **kw)
        for chunk in (None, K) if backend == "cpu" else (None,):
            cached = geokernels.flow_mismatch(model, x, noise_cache=True, chunk=chunk, **kw)
            assert torch.equal(cached, regenerated), (agg, chunk)


def test_deterministic_across_threads_and_isa():
    x, _ = _inputs(2, 3, 33, 35, 3, torch.float32)
    model = MixingModel(3)
    kw = dict(K=3, T=2, agg="median", backend="cpu")
    outs = [geokernels.flow_mismatch(model, x, **kw)]
    with cpu_build("auto", threads=1):
        outs.append(geokernels.flow_mismatch(model, x, **kw))
    with cpu_build("base"):
        base = geokernels.flow_mismatch(model, x, **kw)
    assert torch.equal(outs[0], outs[1])
    # same noise bits in both builds; only the path/reduction arithmetic may round differently
    torch.testing.assert_close(base, outs[0], rtol=1e-5, atol=1e-6)


# ---- analytic velocity fields -----------------------------------------------------------------
def _gaussian_setup(C=2, H=6, W=5):
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(C, H, W, generator=g, dtype=torch.float64)
    return mu, 0.7


@pytest.mark.parametrize("backend,agg", [(b, a) for b in _cpu_backends() for a in AGGS
                                          if b == "cpu" or a in ("min", "quantile:0.3")])
def test_gaussian_closed_form_per_path(backend, agg):
    """For the exact velocity of N(mu, s^2 I), each path's mismatch has the closed form
    sum_c ((mu - x)(1 - a t) + eps (1 + a (1 - t)))^2: checked with the kernels' own noise."""
    mu, s = _gaussian_setup()
    B, K, T, r = 2, 5, 3, 2.0
    x = torch.rand(B, *mu.shape, dtype=torch.float64)
    out = geokernels.flow_mismatch(gaussian_velocity(mu, s), x, K=K, T=T, agg=agg, r=r, seed=8,
                                   backend=backend)
    eps = geokernels.flow_mismatch_noise(x, K=K, seed=8, backend=backend)  # (B, K, C, H, W)
    heat = torch.zeros(B, *mu.shape[1:], dtype=torch.float64)
    for j in range(1, T + 1):
        t = j / (T + 1)
        a = (t * s**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * s**2)
        per_path = (((mu - x)[:, None] * (1 - a * t) + eps * (1 + a * (1 - t))) ** 2).sum(dim=2)
        heat += t**r * _aggregate(per_path, agg)
    heat /= T
    assert_close_rel(out, heat, torch.float64, factor=1e3 if backend == "triton" else 10)


def _aggregate(per_path, agg):
    from geokernels.reference.flow_mismatch import aggregate

    return aggregate(per_path, agg)


def test_population_identity_monte_carlo():
    """E over test images x ~ N(mu_q, s_q^2) and noise of the mismatch of the exact normal-data
    velocity = irreducible denoising term of the test path + ((1-t)/t)^2 * Fisher divergence
    between the test-path and normal-path scores (SPEC 3), per coordinate, at t = 1/4, 1/2, 3/4."""
    mu, s = 0.3, 0.8        # normal data N(mu, s^2)
    mu_q, s_q = -0.4, 1.3   # test data N(mu_q, s_q^2)
    B, H, W, K = 8, 32, 32, 16
    g = torch.Generator().manual_seed(12)
    x = mu_q + s_q * torch.randn(B, 1, H, W, generator=g, dtype=torch.float64)
    model = gaussian_velocity(torch.full((1, H, W), mu, dtype=torch.float64), s)
    for T in (1, 3):
        # r = 0 and agg = "mean": H = (1/T) sum_j mean_k delta_jk, one unbiased sample per pixel
        heat = geokernels.flow_mismatch(model, x, K=K, T=T, agg="mean", r=0.0, seed=T, backend="cpu")
        expected = 0.0
        for j in range(1, T + 1):
            t = j / (T + 1)
            var_p = (1 - t) ** 2 + t**2 * s**2      # normal-path marginal N(t mu, var_p)
            var_q = (1 - t) ** 2 + t**2 * s_q**2    # test-path marginal N(t mu_q, var_q)
            # E Var(x - eps | x_t) under the test path: the irreducible denoising term
            denoise = s_q**2 + 1 - (t * s_q**2 - (1 - t)) ** 2 / var_q
            # E_q |grad log p_t - grad log q_t|^2
            fisher = var_q * (1 / var_q - 1 / var_p) ** 2 + t**2 * (mu_q - mu) ** 2 / var_p**2
            identity = denoise + ((1 - t) / t) ** 2 * fisher
            # the same expectation straight from the closed-form mismatch (algebra check)
            a = (t * s**2 - (1 - t)) / var_p
            direct = ((mu - mu_q) ** 2 + s_q**2) * (1 - a * t) ** 2 + (1 + a * (1 - t)) ** 2
            assert math.isclose(identity, direct, rel_tol=1e-12)
            expected += identity / T
        sample = heat.reshape(-1)
        stderr = sample.std().item() / math.sqrt(sample.numel())
        assert abs(sample.mean().item() - expected) < 4 * stderr, (T, sample.mean().item(), expected, stderr)


def test_point_mass_test_distribution_has_no_denoising_term():
    """A single test image: the mismatch expectation is exactly ((1-t)/t)^2 * Fisher divergence;
    checked with many paths (agg mean over K = 4096) on a few pixels."""
    mu, s = torch.tensor(0.2, dtype=torch.float64), 0.5
    x = torch.tensor([[[[1.5, -0.3, 0.2]]]], dtype=torch.float64)  # (1, 1, 1, 3)
    K = 4096
    heat = geokernels.flow_mismatch(gaussian_velocity(mu.expand(1, 1, 3), s), x, K=K, T=1,
                                    agg="mean", r=0.0, seed=1, backend="cpu")
    t = 0.5
    var_p = (1 - t) ** 2 + t**2 * s**2
    var_q = (1 - t) ** 2
    fisher = var_q * (1 / var_q - 1 / var_p) ** 2 + t**2 * (x.reshape(-1) - mu) ** 2 / var_p**2
    expected = ((1 - t) / t) ** 2 * fisher
    # delta = (A + B eps)^2 with known A, B: its standard deviation bounds the MC error
    a = (t * s**2 - (1 - t)) / var_p
    A, Bc = (mu - x.reshape(-1)) * (1 - a * t), 1 + a * (1 - t)
    std = torch.sqrt(2 * Bc**4 + 4 * A**2 * Bc**2)
    assert (heat.reshape(-1) - expected).abs().max() < 4 * std.max() / math.sqrt(K)


# ---- anomaly_score ----------------------------------------------------------------------------
def test_anomaly_score_modes():
    heat = torch.rand(3, 10, 10, dtype=torch.float64)
    flat = heat.reshape(3, -1).numpy()
    top1 = np.sort(flat, axis=1)[:, ::-1][:, :1].mean(axis=1)  # ceil(0.01 * 100) = 1
    np.testing.assert_allclose(geokernels.anomaly_score(heat).numpy(), flat.max(1) + top1)
    np.testing.assert_allclose(geokernels.anomaly_score(heat, mode="max").numpy(), flat.max(1))
    top7 = np.sort(flat, axis=1)[:, ::-1][:, :7].mean(axis=1)  # 0.07 * 100 is 7, not 7.000...01
    np.testing.assert_allclose(geokernels.anomaly_score(heat, mode="topk_mean", topk=0.07).numpy(), top7)
    big = torch.rand(2, 128, 128)
    k = 164  # ceil(0.01 * 16384)
    want = big.reshape(2, -1).max(1).values + big.reshape(2, -1).topk(k).values.mean(1)
    torch.testing.assert_close(geokernels.anomaly_score(big), want)
    torch.testing.assert_close(reference.anomaly_score(big), want)
    assert geokernels.anomaly_score(heat[0]).shape == ()


# ---- non-finite velocities --------------------------------------------------------------------
def _poisoned(value, path=1):
    """A model that returns `value` at one pixel of one path (the others stay finite)."""
    base = MixingModel(1)

    def model(x_t, t, cond):
        v = base(x_t, t, None).clone()
        v[min(path, v.shape[0] - 1), 0, 1, 2] = value
        return v

    return model


@pytest.mark.parametrize("backend", _cpu_backends() + ["torch"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("agg", ["min", "median"])
def test_nonfinite_velocities_raise(backend, value, agg):
    x = torch.rand(1, 1, 4, 5)
    with pytest.raises(ValueError, match="NaN or Inf velocities"):
        geokernels.flow_mismatch(_poisoned(value), x, K=3, T=2, agg=agg, backend=backend)
    with pytest.raises(ValueError, match="NaN or Inf velocities"):
        geokernels.flow_mismatch(_poisoned(value), x, K=3, T=2, agg=agg, chunk=2, backend=backend)


@pytest.mark.parametrize("agg", AGGS)
def test_unchecked_nan_propagates(agg):
    """With value checks off, a NaN velocity makes its pixel NaN for every aggregation (the
    kernels never drop it silently)."""
    x = torch.rand(1, 1, 4, 5)
    geokernels.set_checks("never")
    try:
        out = geokernels.flow_mismatch(_poisoned(float("nan")), x, K=3, T=2, agg=agg, backend="cpu")
    finally:
        geokernels.set_checks("cpu")
    assert torch.isnan(out[0, 1, 2]) and torch.isnan(out).sum() == 1


# ---- torch.library integration ----------------------------------------------------------------
def test_opcheck():
    x, noise = _inputs(2, 2, 3, 5, 3, torch.float64)
    ops = torch.ops.geokernels
    torch.library.opcheck(ops.philox4x32_10.default, (torch.randint(0, 2**32, (5, 4)), 3))
    torch.library.opcheck(ops.flow_mismatch_noise.default, (x, 3, 1, 3))
    for nz in (None, noise):
        torch.library.opcheck(ops.flow_mismatch_paths.default, (x, nz, 0.25, 7, 1, 3, 2, 3))
        v = torch.rand(4, 2, 3, 5, dtype=torch.float64)
        torch.library.opcheck(ops.flow_mismatch_delta.default, (v, x, nz, 7, 1, 3, 1))
        v = torch.rand(6, 2, 3, 5, dtype=torch.float64)
        torch.library.opcheck(ops.flow_mismatch_accumulate_.default,
                              (torch.zeros(2, 3, 5, dtype=torch.float64), v, x, nz, 0.5, 7, 1, 3, 2, False))
    torch.library.opcheck(ops.flow_mismatch_aggregate_.default,
                          (torch.zeros(2, 3, 5, dtype=torch.float64), torch.rand(2, 3, 3, 5, dtype=torch.float64),
                           0.5, 1, True))


@pytest.mark.triton
def test_opcheck_triton():
    if "triton" not in backends_for("flow_mismatch", "cpu"):
        pytest.skip("triton not usable on CPU here")
    from geokernels.triton import flow_mismatch as tfm

    x, noise = _inputs(1, 1, 3, 4, 2, torch.float32)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(tfm.paths, (x, noise, 0.5, 1, 0, 2, 0, 2), test_utils=utils)
    torch.library.opcheck(tfm.accumulate_, (torch.zeros(1, 3, 4), torch.rand(2, 1, 3, 4), x, None,
                                            0.5, 1, 0, 2, 2, False), test_utils=utils)


def test_torch_compile_fullgraph():
    x, _ = _inputs(2, 1, 6, 7, 2, torch.float32)

    def model(x_t, t, cond):
        return 0.5 * x_t + t[:, None, None, None]

    f = torch.compile(lambda inp: geokernels.flow_mismatch(model, inp, K=2, T=2, backend="cpu") * 2,
                      fullgraph=True)
    torch.testing.assert_close(f(x), geokernels.flow_mismatch(model, x, K=2, T=2, backend="cpu") * 2)


def test_progress_bar_runs(capsys):
    x = torch.rand(2, 1, 4, 4)
    out = geokernels.flow_mismatch(MixingModel(1), x, K=2, T=3, chunk=2, progress=True, backend="cpu")
    assert out.shape == (2, 4, 4)
    assert "flow_mismatch" in capsys.readouterr().err


# ---- bad input --------------------------------------------------------------------------------
def _model(x_t, t, cond):
    return x_t


BAD = [
    (dict(K=0), ValueError, "K"),
    (dict(K=2.5), TypeError, "K"),
    (dict(T=0), ValueError, "T"),
    (dict(agg="max"), ValueError, "agg"),
    (dict(agg="quantile:0"), ValueError, "agg"),
    (dict(agg="quantile:1.5"), ValueError, "agg"),
    (dict(agg="quantile:-0.2"), ValueError, "agg"),
    (dict(agg="quantile:abc"), ValueError, "agg"),
    (dict(agg=None), TypeError, "agg"),
    (dict(r=float("nan")), ValueError, "r"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(chunk=0), ValueError, "chunk"),
    (dict(smooth_sigma=-1.0), ValueError, "smooth_sigma"),
    (dict(image_index_offset=-1), ValueError, "image_index_offset"),
    (dict(image_index_offset=2**32 - 1), ValueError, "image_index_offset"),
    (dict(noise=torch.rand(2, 3, 1, 4, 4)), ValueError, "noise"),
    (dict(noise=torch.full((2, 2, 1, 4, 4), float("nan"))), ValueError, "noise"),
    (dict(cond=torch.rand(3)), ValueError, "cond"),
    (dict(backend="metal"), ValueError, "backend"),
    (dict(noise_cache="yes"), TypeError, "noise_cache"),
    (dict(model=lambda x_t, t, c: x_t[:, :, :2]), ValueError, "model"),
    (dict(model=lambda x_t, t, c: x_t[:1]), ValueError, "model"),
    (dict(model=lambda x_t, t, c: x_t.numpy()), TypeError, "model"),
    (dict(model=lambda x_t, t, c: (x_t > 0)), TypeError, "model"),
    (dict(model="not callable"), TypeError, "model"),
    (dict(x=torch.rand(2, 4, 4)), ValueError, "x"),
    (dict(x=torch.full((2, 1, 4, 4), float("inf"))), ValueError, "x"),
    (dict(x=torch.zeros(2, 1, 4, 4, dtype=torch.int64)), TypeError, "x"),
]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kwargs,exc,name", BAD, ids=[f"{b[1].__name__}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(backend, kwargs, exc, name):
    kwargs = dict(kwargs)
    model = kwargs.pop("model", _model)
    x = kwargs.pop("x", torch.rand(2, 1, 4, 4))
    kwargs.setdefault("backend", backend)
    with pytest.raises(exc, match=name):
        geokernels.flow_mismatch(model, x, K=kwargs.pop("K", 2), T=kwargs.pop("T", 2), **kwargs)


def test_backend_cuda_needs_cuda_tensors():
    if torch.cuda.is_available():
        pytest.skip("covered by the CUDA tests")
    with pytest.raises(ValueError, match="cuda"):
        geokernels.flow_mismatch(_model, torch.rand(1, 1, 4, 4), K=2, T=2, backend="cuda")


def test_anomaly_score_bad_input():
    with pytest.raises(ValueError, match="mode"):
        geokernels.anomaly_score(torch.rand(1, 4, 4), mode="mean")
    with pytest.raises(ValueError, match="topk"):
        geokernels.anomaly_score(torch.rand(1, 4, 4), topk=0.0)
    with pytest.raises(ValueError, match="topk"):
        geokernels.anomaly_score(torch.rand(1, 4, 4), topk=1.5)
    with pytest.raises(ValueError, match="heatmap"):
        geokernels.anomaly_score(torch.rand(4))
    with pytest.raises(ValueError, match="heatmap"):
        geokernels.anomaly_score(torch.full((1, 2, 2), float("nan")))
    with pytest.raises(TypeError, match="heatmap"):
        geokernels.anomaly_score(torch.ones(1, 2, 2, dtype=torch.int32))


def test_raw_ops_reject_bad_input():
    """Direct torch.ops calls are checked in C++ too: no out-of-range path, no wrong shape."""
    ops = torch.ops.geokernels
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="path_start"):
        ops.flow_mismatch_paths(x, None, 0.5, 0, 0, 2, 3, 2)
    with pytest.raises(ValueError, match="num_paths"):
        ops.flow_mismatch_paths(x, None, 0.5, 0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="image_offset"):
        ops.flow_mismatch_noise(x, 0, 2**32 - 1, 2)
    with pytest.raises(ValueError, match="v must have shape"):
        ops.flow_mismatch_accumulate_(torch.zeros(2, 4, 4), torch.rand(3, 1, 4, 4), x, None, 1.0, 0, 0, 2, 1, False)
    with pytest.raises(ValueError, match="rank"):
        ops.flow_mismatch_accumulate_(torch.zeros(2, 4, 4), torch.rand(4, 1, 4, 4), x, None, 1.0, 0, 0, 2, 3, False)
    with pytest.raises(ValueError, match="heat must have shape"):
        ops.flow_mismatch_accumulate_(torch.zeros(2, 4, 5), torch.rand(4, 1, 4, 4), x, None, 1.0, 0, 0, 2, 1, False)
    with pytest.raises(TypeError, match="heat must have dtype"):
        ops.flow_mismatch_aggregate_(torch.zeros(2, 4, 4).double(), torch.rand(2, 2, 4, 4), 1.0, 1, False)
    with pytest.raises(ValueError, match="noise must have shape"):
        ops.flow_mismatch_delta(torch.rand(2, 1, 4, 4), x, torch.rand(2, 2, 1, 4, 5), 0, 0, 2, 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.flow_mismatch_paths(x.half(), None, 0.5, 0, 0, 2, 0, 1)


# ---- CUDA (run by benchmarks/gpu_check.sh on a GPU machine) -------------------------------------
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("agg", AGGS)
def test_cuda_matches_cpu_and_reference(agg):
    B, C, H, W, K, T = 3, 3, 33, 29, 5, 3  # H*W odd: quads straddle Philox groups
    for dtype in (torch.float32, torch.float64):
        x, noise = _inputs(B, C, H, W, K, dtype)
        model = MixingModel(C)
        cpu = geokernels.flow_mismatch(model, x, K=K, T=T, agg=agg, seed=4, backend="cpu")
        for be in ("cuda", "triton"):
            gpu = geokernels.flow_mismatch(model, x.cuda(), K=K, T=T, agg=agg, seed=4, backend=be)
            assert_close_rel(gpu, cpu.double(), dtype, factor=10, what=f"{be} vs cpu {agg}")
            ref = reference.flow_mismatch(model, x.double(), K=K, T=T, agg=agg, noise=noise.double())
            out = geokernels.flow_mismatch(model, x.cuda(), K=K, T=T, agg=agg, noise=noise.cuda(), backend=be)
            assert_close_rel(out, ref, dtype, factor=10, what=f"{be} explicit noise {agg}")
            for chunk in (2, K, 2 * K):
                again = geokernels.flow_mismatch(model, x.cuda(), K=K, T=T, agg=agg, seed=4, chunk=chunk, backend=be)
                assert torch.equal(again, gpu), (be, chunk)


@requires_cuda
@pytest.mark.cuda
def test_cuda_large_k_and_low_precision():
    x, noise = _inputs(1, 2, 9, 11, 100, torch.float64)
    model = MixingModel(2)
    ref = reference.flow_mismatch(model, x, K=100, T=2, agg="quantile:0.25", noise=noise)
    out = geokernels.flow_mismatch(model, x.cuda(), K=100, T=2, agg="quantile:0.25", noise=noise.cuda(), backend="cuda")
    assert_close_rel(out, ref, torch.float64)  # > 48 KB of shared columns: global-buffer path
    for dtype in (torch.float16, torch.bfloat16):
        out = geokernels.flow_mismatch(model, x.cuda().to(dtype), K=4, T=2, agg="median", backend="cuda")
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_large_k_half_keeps_mismatches_in_float32(dtype):
    """K > 96 on CUDA takes a global (B, K, H, W) buffer; it was in x's dtype, so every mismatch
    was rounded to half before the rank (unlike K <= 96 and Triton) and one above 65504 became
    inf, which the checks reported as 'NaN or Inf velocities' from a finite model."""
    x = torch.rand(1, 1, 5, 6, device="cuda").to(dtype)

    def loud(x_t, t, cond):   # |v - (x - eps)| ~ 300: mismatches ~ 9e4, finite in float32
        return torch.full_like(x_t, 300.0)

    geokernels.set_checks("always")
    try:
        out = geokernels.flow_mismatch(loud, x, K=100, T=2, agg="median", backend="cuda")
    finally:
        geokernels.set_checks("cpu")
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.min() > 1e4
    model = MixingModel(1)
    a = geokernels.flow_mismatch(model, x, K=100, T=2, agg="median", backend="cuda")
    b = geokernels.flow_mismatch(model, x, K=100, T=2, agg="median", backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_heatmaps_do_not_depend_on_chunk_or_noise_cache(backend, dtype):
    """For float16/bfloat16 x, chunk < K (mismatches through the delta op) and noise_cache=True
    (eps cached in x's dtype) each rounded in half precision what the default path keeps in
    float32: heatmaps moved by ~1e-3 relative with a memory/speed option."""
    x = torch.rand(3, 2, 7, 9, device="cuda").to(dtype)
    model = MixingModel(2)
    base = geokernels.flow_mismatch(model, x, K=6, T=3, agg="median", backend=backend)
    for kwargs in ({"chunk": 4}, {"chunk": 1}, {"noise_cache": True}):
        out = geokernels.flow_mismatch(model, x, K=6, T=3, agg="median", backend=backend, **kwargs)
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6, msg=str(kwargs))


@requires_cuda
@pytest.mark.cuda
def test_cuda_nonfinite_checks():
    x = torch.rand(1, 1, 4, 5, device="cuda")
    geokernels.set_checks("always")
    try:
        with pytest.raises(ValueError, match="NaN or Inf velocities"):
            geokernels.flow_mismatch(_poisoned(float("nan")), x, K=3, T=2, backend="cuda")
    finally:
        geokernels.set_checks("cpu")
    out = geokernels.flow_mismatch(_poisoned(float("nan")), x, K=3, T=2, agg="median", backend="cuda")
    assert torch.isnan(out[0, 1, 2]) and torch.isnan(out).sum() == 1
