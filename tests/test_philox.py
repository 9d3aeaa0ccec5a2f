"""The counter-based noise of flow_mismatch (SPEC.md 3; stream documented in philox.h):
Philox4x32-10 known answers, the documented layout and Box-Muller formulas, bit-identical
streams across the CPU builds (and CUDA/Triton on a GPU), and statistical sanity."""
import math

import numpy as np
import pytest
import torch

import geokernels
from geokernels import reference
from tests._util import backends_for, cpu_build, requires_cuda

# Random123 known-answer tests for philox4x32 with 10 rounds: (counter, key, output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _seed(key):
    return key[0] | (key[1] << 32)


def _signed(seed):  # the int64 schema value with the same bits
    return seed - 2**64 if seed >= 2**63 else seed


@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_known_answers(counter, key, expected):
    ref = reference.philox4x32_10(np.array([counter]), _seed(key))
    assert tuple(int(v) for v in ref[0]) == expected
    out = torch.ops.geokernels.philox4x32_10(torch.tensor([counter], dtype=torch.int64),
                                            _signed(_seed(key)))
    assert tuple(out[0].tolist()) == expected


def test_raw_stream_matches_reference():
    rng = np.random.default_rng(1)
    counters = rng.integers(0, 2**32, size=(1000, 4), dtype=np.uint64)
    for seed in (0, 7, 2**32 + 5, 2**64 - 1):
        ref = reference.philox4x32_10(counters, seed).astype(np.int64)
        out = torch.ops.geokernels.philox4x32_10(torch.from_numpy(counters.astype(np.int64)), _signed(seed))
        assert np.array_equal(out.numpy(), ref)


def _noise(x, K, seed=0, offset=0, backend="cpu"):
    return geokernels.flow_mismatch_noise(x, K=K, seed=seed, image_index_offset=offset, backend=backend)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 3), (3, 2, 16, 16)])
@pytest.mark.parametrize("seed", [0, 12345, 2**63 + 11])
def test_noise_follows_documented_stream(shape, seed):
    """Layout and formulas: eps[b, k] element e = lane e%4 of Philox(e//4, 0, offset+b, k)."""
    x = torch.zeros(shape, dtype=torch.float64)
    out = _noise(x, K=3, seed=seed, offset=5)
    ref = reference.flow_mismatch_noise(*shape[:1], 3, *shape[1:], seed=seed, image_index_offset=5)
    # float32 polynomials vs float64 libm: equal to a few float32 ulps
    err = (out - ref).abs() / (1 + ref.abs())
    assert err.max().item() < 2e-6, err.max().item()
    assert out.dtype == torch.float64 and torch.equal(out, out.float().double())  # float32 values


def test_cpu_builds_bit_identical():
    """Scalar (baseline) and AVX2 builds produce the same bits (explicit-fma discipline)."""
    x = torch.zeros(2, 3, 19, 21)  # odd sizes: partial groups at every path boundary
    outs = []
    for isa in ("base", "auto"):
        with cpu_build(isa):
            outs.append(_noise(x, K=3, seed=99, offset=7))
    assert torch.equal(outs[0], outs[1])


def test_deterministic_and_split_invariant():
    x = torch.zeros(5, 2, 9, 11)
    full = _noise(x, K=4, seed=3)
    assert torch.equal(full, _noise(x, K=4, seed=3))
    # image index = image_index_offset + b: a batch split sees the same noise
    assert torch.equal(full[2:4], _noise(x[2:4], K=4, seed=3, offset=2))
    assert torch.equal(full[:, :2], _noise(x, K=2, seed=3))  # path k does not depend on K
    # different seeds, images and paths give different streams
    other = _noise(x, K=4, seed=4)
    assert not torch.equal(full, other)
    assert not torch.equal(full[0, 0], full[1, 0]) and not torch.equal(full[0, 0], full[0, 1])


def test_float32_and_float64_see_the_same_noise():
    x32 = torch.zeros(1, 2, 8, 8)
    assert torch.equal(_noise(x32, 2).double(), _noise(x32.double(), 2))


def test_statistics():
    """2^20 normals from one seed: moments and a Kolmogorov-Smirnov test against N(0, 1);
    no correlation between neighbouring elements, paths or images."""
    from scipy import stats

    x = torch.zeros(4, 1, 256, 256)
    eps = _noise(x, K=4, seed=2024).double()  # (4, 4, 1, 256, 256)
    v = eps.reshape(-1).numpy()
    n = v.size
    # u in (0, 1) exclusive: every value is finite and |eps| <= sqrt(-2 ln 2^-24)
    assert np.isfinite(v).all() and np.abs(v).max() <= math.sqrt(2 * 24 * math.log(2))
    assert abs(v.mean()) < 5 / math.sqrt(n)
    assert abs(v.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(v)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(v)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(v, "norm").pvalue > 1e-3
    flat = eps.reshape(16, -1)
    for a, b in [(flat[0, :-1], flat[0, 1:]),        # neighbouring elements (lanes, groups)
                 (flat[0], flat[1]),                  # paths of one image
                 (flat[0], flat[4])]:                 # images
        corr = np.corrcoef(a.numpy(), b.numpy())[0, 1]
        assert abs(corr) < 5 / math.sqrt(a.numel()), corr
    # lanes are identically distributed (cos and sin halves, both Philox word pairs)
    lanes = v.reshape(-1, 4)
    for lane in range(4):
        assert stats.kstest(lanes[:, lane], "norm").pvalue > 1e-3


@pytest.mark.triton
def test_triton_noise_matches_cpu():
    if "triton" not in backends_for("flow_mismatch", "cpu"):
        pytest.skip("triton not usable on CPU here")
    x = torch.zeros(2, 2, 5, 7)
    tri = _noise(x, K=2, seed=2**40 + 3, offset=1, backend="triton")
    cpu = _noise(x, K=2, seed=2**40 + 3, offset=1, backend="cpu")
    # the interpreter evaluates tl.fma as a*b + c (two roundings): equal to float32 rounding
    torch.testing.assert_close(tri, cpu, rtol=2e-6, atol=2e-6)


@requires_cuda
@pytest.mark.cuda
def test_cuda_streams_identical():
    rng = np.random.default_rng(3)
    counters = torch.from_numpy(rng.integers(0, 2**32, size=(4096, 4), dtype=np.uint64).astype(np.int64))
    for seed in (0, 2**63 + 1):
        cpu = torch.ops.geokernels.philox4x32_10(counters, _signed(seed))
        gpu = torch.ops.geokernels.philox4x32_10(counters.cuda(), _signed(seed))
        assert torch.equal(cpu, gpu.cpu())
    x = torch.zeros(3, 3, 33, 29)  # H*W odd: quads straddle Philox groups
    for dtype in (torch.float32, torch.float64):
        cpu = _noise(x.to(dtype), K=5, seed=77, offset=9, backend="cpu")
        gpu = _noise(x.to(dtype).cuda(), K=5, seed=77, offset=9, backend="cuda")
        assert torch.equal(cpu, gpu.cpu()), (cpu - gpu.cpu()).abs().max()
        tri = _noise(x.to(dtype).cuda(), K=5, seed=77, offset=9, backend="triton")
        assert torch.equal(cpu, tri.cpu()), (cpu - tri.cpu()).abs().max()
