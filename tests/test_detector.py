"""FlowMismatchDetector (SPEC 3): scoring ranks defects above normals, persistence, baselines,
the mismatch-op contract, bad input."""
import os

import pytest
import torch

import geokernels
from geokernels.anomaly import CheckpointError, MismatchCalibration, reconstruction_heatmap
from geokernels.anomaly._compat import anomaly_score_op, flow_mismatch_op, metric
from geokernels.models import FlowMismatchDetector, VelocityUNet
from geokernels.models import detector as detector_mod
from tests._util import single_thread

SIZE = 16
TINY = dict(base_width=8, channel_mults=(1, 2))
FIT = dict(preset="tiny", model_kwargs=TINY, steps=40, batch_size=16, lr=5e-3, warmup_steps=5,
           ema_decay=0.9, progress=False)
SCORE = dict(K=3, T=5, batch_size=8)


_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def normal_images(n, seed, size=SIZE):
    """Toy "normal" class: flat random colour + a horizontal ramp + faint noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.4 + 0.3
    ramp = torch.linspace(-0.1, 0.1, size).view(1, 1, 1, size)
    return (base + ramp + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def defective_images(n, seed, size=SIZE):
    """Normal images with a 4x4 patch of a random other colour; returns (images, masks)."""
    g = torch.Generator().manual_seed(seed + 1000)
    x = normal_images(n, seed, size)
    masks = torch.zeros(n, size, size)
    for i in range(n):
        r, c = torch.randint(1, size - 5, (2,), generator=g).tolist()
        x[i, :, r:r + 4, c:c + 4] = torch.rand(3, 1, 1, generator=g)
        masks[i, r:r + 4, c:c + 4] = 1
    return x, masks


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    det = FlowMismatchDetector(device="cpu", **SCORE)
    ckpt = tmp_path_factory.mktemp("fit") / "train.pt"
    det.fit(normal_images(64, seed=0), checkpoint=ckpt, **FIT)
    return det, ckpt


def test_defects_score_above_normals(fitted):
    det, _ = fitted
    xn = normal_images(12, seed=1)
    xd, masks = defective_images(12, seed=2)
    hn, sn = det.score(xn)
    hd, sd = det.score(xd)
    assert hn.shape == (12, SIZE, SIZE) and sn.shape == (12,)
    assert hn.dtype == torch.float32 and hn.device.type == "cpu"
    labels = torch.cat([torch.zeros(12), torch.ones(12)])
    image_auroc = metric("auroc")(torch.cat([sn, sd]), labels)
    pixel_auroc = metric("auroc")(hd.flatten(), masks.flatten())
    assert image_auroc >= 0.85, image_auroc
    assert pixel_auroc >= 0.85, pixel_auroc
    assert (hd * masks).sum() / masks.sum() > 2 * (hd * (1 - masks)).sum() / (1 - masks).sum()


def test_scores_are_deterministic_and_use_the_score_op(fitted):
    det, _ = fitted
    x = normal_images(5, seed=3)
    h1, s1 = det.score(x)
    h2, s2 = det.score(list(x))  # list of (C, H, W) tensors
    assert torch.equal(h1, h2) and torch.equal(s1, s2)
    assert torch.equal(s1, anomaly_score_op()(h1, mode="max+topk", topk=0.01))
    h3, _ = det.score(x[2])  # a single (C, H, W) image
    assert h3.shape == (1, SIZE, SIZE)
    # noise is keyed by the image's index in the call: the batch size does not matter
    for method in ("mismatch", "reconstruction"):
        a, sa = det.score(x, method=method, batch_size=5)
        b, sb = det.score(x, method=method, batch_size=2)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), method


def test_paths_per_call_changes_speed_not_heatmaps(fitted, tmp_path):
    det, _ = fitted
    x = normal_images(3, seed=8)
    K = det.settings["K"]
    assert det.settings["paths_per_call"] == "auto" and det._paths_per_call() == 2 * K  # CPU
    base = det.score(x)[0]
    path = det.save(tmp_path / "d.pt")
    for ppc in (None, 1, K, 3 * K):
        other = FlowMismatchDetector.load(path, device="cpu", paths_per_call=ppc)
        assert other._paths_per_call() == ppc
        assert torch.allclose(other.score(x)[0], base, rtol=1e-5, atol=1e-6), ppc
    for bad in (0, -2, 1.5, True, "all"):
        with pytest.raises(ValueError, match="paths_per_call"):
            FlowMismatchDetector.load(path, device="cpu", paths_per_call=bad)


def test_detector_matches_mismatch_contract(fitted):
    """score() = flow_mismatch(model on [-1,1] images) = the SPEC 3 formula with explicit noise."""
    det, _ = fitted
    model = det.members[None]
    x = normal_images(2, seed=4)
    heat, _ = det.score(x, batch_size=2)
    K, T, r = det.settings["K"], det.settings["T"], det.settings["r"]
    op = flow_mismatch_op()
    direct = op(model, x * 2 - 1, K=K, T=T, agg="min", r=r, seed=det.settings["seed"])
    assert torch.allclose(heat, direct, rtol=1e-5, atol=1e-6)
    # literal SPEC 3 loop with explicit noise vs the op given the same noise
    noise = torch.randn(2, K, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    xm = x * 2 - 1
    expected = torch.zeros(2, SIZE, SIZE)
    with torch.no_grad():
        for j in range(1, T + 1):
            t = j / (T + 1)
            deltas = []
            for k in range(K):
                xt = (1 - t) * noise[:, k] + t * xm
                v = model(xt, torch.full((2,), t))
                deltas.append(((v - (xm - noise[:, k])) ** 2).sum(1))
            expected += t ** r * torch.stack(deltas).min(0).values
    expected /= T
    got = op(model, xm, K=K, T=T, agg="min", r=r, noise=noise)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_save_load_round_trip_identical_scores(fitted, tmp_path):
    det, train_ckpt = fitted
    x = torch.cat([normal_images(3, seed=6), defective_images(3, seed=7)[0]])
    h, s = det.score(x)
    path = det.save(tmp_path / "det.pt")
    assert os.listdir(tmp_path) == ["det.pt"]
    loaded = FlowMismatchDetector.load(path, device="cpu")
    h2, s2 = loaded.score(x)
    assert torch.equal(h, h2) and torch.equal(s, s2)
    assert loaded.settings == det.settings
    # a training checkpoint loads too (its EMA weights), with the settings given here
    from_train = FlowMismatchDetector.load(train_ckpt, device="cpu", **SCORE)
    h3, s3 = from_train.score(x)
    assert torch.equal(h, h3) and torch.equal(s, s3)
    # overrides change the scoring settings
    k1 = FlowMismatchDetector.load(path, device="cpu", K=1)
    assert k1.settings["K"] == 1 and not torch.equal(k1.score(x)[0], h)


def test_pretrained_loads_the_packaged_file(fitted, tmp_path, monkeypatch):
    det, _ = fitted
    asset = tmp_path / "geokernels" / "assets"
    asset.mkdir(parents=True)
    monkeypatch.setattr(FlowMismatchDetector, "pretrained_path",
                        staticmethod(lambda name="textures": str(asset / "x.pt")))
    with pytest.raises(FileNotFoundError, match="not shipped"):
        FlowMismatchDetector.pretrained()
    det.save(asset / "x.pt")
    loaded = FlowMismatchDetector.pretrained(device="cpu")
    x = normal_images(2, seed=8)
    assert torch.equal(loaded.score(x)[1], det.score(x)[1])


def test_shipped_checkpoint_when_present():
    with pytest.raises(ValueError, match="name"):
        FlowMismatchDetector.pretrained_path("imagenet")
    path = FlowMismatchDetector.pretrained_path()
    if not os.path.exists(path):
        with pytest.raises(FileNotFoundError, match="geokernels anomaly train"):
            FlowMismatchDetector.pretrained()
        return
    det = FlowMismatchDetector.pretrained(device="cpu", K=1, T=2)
    size = next(iter(det.members.values())).config["image_size"]
    cat = None if det.categories is None else det.categories[0]
    heat, score = det.score(torch.full((1, 3, size, size), 0.5), category=cat)
    assert heat.shape == (1, size, size) and torch.isfinite(score).all()


def test_reconstruction_baseline(fitted):
    det, _ = fitted
    xn = normal_images(8, seed=9)
    xd, masks = defective_images(8, seed=10)
    hn, sn = det.score(xn, method="reconstruction")
    hd, sd = det.score(xd, method="reconstruction")
    assert hn.shape == (8, SIZE, SIZE) and torch.isfinite(hd).all() and (hd >= 0).all()
    assert torch.equal(det.score(xn, method="reconstruction")[0], hn)
    assert (hd * masks).sum() / masks.sum() > (hd * (1 - masks)).sum() / (1 - masks).sum()
    # smooth_sigma smooths the baseline's heatmaps as it smooths the mismatch's
    det.settings["smooth_sigma"] = 1.5
    try:
        smoothed = det.score(xn, method="reconstruction")[0]
    finally:
        det.settings["smooth_sigma"] = 0.0
    torch.testing.assert_close(smoothed, geokernels.smooth_heatmap(hn, 1.5))
    # explicit noise, Euler: one step from t0 is x_t0 + (1 - t0) v  (the formula, checked)
    model = det.members[None]
    x = xn[:2] * 2 - 1
    noise = torch.randn(1, *x.shape, generator=torch.Generator().manual_seed(0))
    h = reconstruction_heatmap(model, x, t0=0.5, steps=1, solver="euler", noise=noise)
    with torch.no_grad():
        z = 0.5 * noise[0] + 0.5 * x
        z = z + 0.5 * model(z, torch.full((2,), 0.5))
    assert torch.allclose(h, ((z - x) ** 2).sum(1), atol=1e-6)
    with pytest.raises(ValueError, match="t0"):
        reconstruction_heatmap(model, x, t0=1.0)
    with pytest.raises(ValueError, match="solver"):
        reconstruction_heatmap(model, x, solver="rk4")


def test_reconstruction_survives_reused_output_buffers(fitted):
    # a CUDA-graph compiled model (compile="reduce-overhead") returns the same output buffer on
    # every call, overwritten by the next replay: emulated here, Heun must give the same map
    model = fitted[0].members[None]

    class OneBuffer(torch.nn.Module):
        def forward(self, z, t):
            out = model(z, t)
            if not hasattr(self, "buf"):
                self.buf = torch.empty_like(out)
            return self.buf.copy_(out)

    x = normal_images(2, seed=11) * 2 - 1
    with torch.no_grad():
        for solver in ("heun", "euler"):
            want = reconstruction_heatmap(model, x, steps=3, solver=solver, seed=4)
            got = reconstruction_heatmap(OneBuffer(), x, steps=3, solver=solver, seed=4)
            assert torch.equal(got, want), solver


def test_calibrated_variant(fitted, tmp_path):
    det = FlowMismatchDetector.load(fitted[0].save(tmp_path / "d.pt"), device="cpu")
    x = normal_images(4, seed=11)
    with pytest.raises(RuntimeError, match="calibrate"):
        det.score(x, method="calibrated_mismatch")
    det.calibrate(normal_images(10, seed=12), stats_sigma=2.0)
    h, s = det.score(x, method="calibrated_mismatch")
    assert h.shape == (4, SIZE, SIZE) and torch.isfinite(h).all() and (h >= 0).all()
    # the same numbers from the mismatch heatmaps, without model calls
    h2, s2 = det.calibrated_from_mismatch(det.score(x)[0])
    assert torch.equal(h2, h) and torch.equal(s2, s)
    with pytest.raises(ValueError, match="heatmaps"):
        det.calibrated_from_mismatch(torch.zeros(SIZE, SIZE))
    with pytest.raises(RuntimeError, match="calibrate"):
        fitted[0].calibrated_from_mismatch(h)
    # the default method is unchanged by calibration
    assert torch.equal(det.score(x)[0], fitted[0].score(x)[0])
    det.save(tmp_path / "cal.pt")
    again = FlowMismatchDetector.load(tmp_path / "cal.pt", device="cpu")
    assert torch.equal(again.score(x, method="calibrated_mismatch")[0], h)
    # two-sided: a heatmap far below the normal level is flagged like one far above
    cal = MismatchCalibration(stats_sigma=0.0, min_std=1e-3).fit(
        torch.ones(5, 4, 4) + 0.1 * torch.arange(5.0).view(5, 1, 1))
    low, high = cal.transform(torch.full((1, 4, 4), 0.2)), cal.transform(torch.full((1, 4, 4), 6.0))
    mid = cal.transform(torch.full((1, 4, 4), 1.2))
    assert (low > 5 * mid).all() and (high > 5 * mid).all()


def test_class_conditional_and_per_category(tmp_path):
    data = {"a": normal_images(16, seed=13), "b": 1 - normal_images(16, seed=14)}
    fit = dict(FIT, steps=3)
    cond = FlowMismatchDetector(device="cpu", **SCORE).fit(data, **fit)
    assert cond.categories == ["a", "b"] and cond.members[None].num_classes == 2
    x = normal_images(2, seed=15)
    ha, _ = cond.score(x, category="a")
    hb, _ = cond.score(x, category="b")
    assert not torch.equal(ha, hb)
    assert torch.equal(cond.score(x, category=1)[0], hb)
    # calibrations of a conditional model are per category and survive save/load (they were
    # all collapsed onto one key: "needs calibrate() first" after loading)
    cond.calibrate(normal_images(6, seed=16), category="a", stats_sigma=1.0)
    cond.calibrate(1 - normal_images(6, seed=17), category="b", stats_sigma=1.0)
    cal_a = cond.score(x, category="a", method="calibrated_mismatch")[0]
    cal_b = cond.score(x, category="b", method="calibrated_mismatch")[0]
    cond.save(tmp_path / "cond.pt")
    again = FlowMismatchDetector.load(tmp_path / "cond.pt", device="cpu")
    assert torch.equal(again.score(x, category="a", method="calibrated_mismatch")[0], cal_a)
    assert torch.equal(again.score(x, category="b", method="calibrated_mismatch")[0], cal_b)
    with pytest.raises(ValueError, match="category is required"):
        cond.score(x)
    with pytest.raises(ValueError, match="unknown category"):
        cond.score(x, category="c")
    per = FlowMismatchDetector(device="cpu", **SCORE).fit(data, class_conditional=False, **fit)
    assert per.categories == ["a", "b"] and set(per.members) == {"a", "b"}
    with pytest.raises(ValueError, match="category is required"):
        per.score(x)
    assert per.score(x, category="b")[0].shape == (2, SIZE, SIZE)


def test_compiled_scoring_compiles_once_per_model(monkeypatch):
    # compile=...: one graph per model for all categories, and a short last batch is padded to
    # the batch size instead of compiling (and capturing CUDA graphs) again; emulated with a
    # torch.compile that records what it is given and the row counts the model then sees
    data = {"a": normal_images(16, seed=13), "b": 1 - normal_images(16, seed=14)}
    plain = FlowMismatchDetector(device="cpu", **SCORE).fit(data, **dict(FIT, steps=3))
    compiled, rows = [], set()

    class Recorder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x_t, t, cond=None):
            rows.add(x_t.shape[0])
            return self.model(x_t, t, cond)

    def fake_compile(model, **kwargs):
        compiled.append(kwargs)
        return Recorder(model)

    monkeypatch.setattr(torch, "compile", fake_compile)
    fast = FlowMismatchDetector(plain.members[None], class_names=["a", "b"], device="cpu",
                                compile="reduce-overhead", paths_per_call=None,
                                **dict(SCORE, batch_size=4))
    x = normal_images(6, seed=16)                     # batches of 4 and 2 (padded to 4)
    for cat in ("a", "b", "a"):
        h, s = fast.score(x, category=cat)
        want_h, want_s = plain.score(x, category=cat)
        assert torch.allclose(h, want_h, rtol=1e-5, atol=1e-6) and h.shape == (6, SIZE, SIZE)
        assert torch.allclose(s, want_s, rtol=1e-5, atol=1e-6)
    assert compiled == [dict(mode="reduce-overhead", dynamic=False)]
    assert rows == {4 * SCORE["K"]}


def test_bad_input(fitted, tmp_path):
    det, _ = fitted
    with pytest.raises(ValueError, match="images must have shape"):
        det.score(torch.rand(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match=f"{SIZE}x{SIZE}"):
        det.score(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        det.score(torch.rand(2, 3, SIZE, SIZE) * 255)
    with pytest.raises(ValueError, match="NaN"):
        det.score(torch.full((1, 3, SIZE, SIZE), float("nan")))
    with pytest.raises(ValueError, match="empty"):
        det.score(torch.rand(0, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="empty"):
        det.score([])
    with pytest.raises(TypeError, match="floating"):
        det.score(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="method"):
        det.score(torch.rand(1, 3, SIZE, SIZE), method="magic")
    with pytest.raises(RuntimeError, match="fit"):
        FlowMismatchDetector(device="cpu").score(torch.rand(1, 3, SIZE, SIZE))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        FlowMismatchDetector.load(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        FlowMismatchDetector.load(tmp_path / "bad.pt")
    good = det.save(tmp_path / "good.pt")
    data = open(good, "rb").read()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        FlowMismatchDetector.load(tmp_path / "trunc.pt")
    with pytest.raises(ValueError, match="empty"):
        FlowMismatchDetector(device="cpu").fit([], **FIT)
    with pytest.raises(ValueError, match="K"):
        FlowMismatchDetector(K=0)
    with pytest.raises(ValueError, match="agg"):
        FlowMismatchDetector(agg="max")
    with pytest.raises(TypeError, match="unknown detector setting"):
        FlowMismatchDetector(KK=3)
    with pytest.raises(TypeError, match="VelocityUNet"):
        FlowMismatchDetector(model=torch.nn.Linear(2, 2))


def test_top_level_exports():
    assert geokernels.FlowMismatchDetector is FlowMismatchDetector
    assert detector_mod.FlowMismatchDetector is FlowMismatchDetector
    assert isinstance(FlowMismatchDetector(VelocityUNet(**TINY), device="cpu").members[None],
                      VelocityUNet)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_bf16_and_compiled_scoring(tmp_path):
    det = FlowMismatchDetector(device="cuda", **SCORE)
    det.fit(normal_images(64, seed=0), checkpoint=tmp_path / "c.pt", **dict(FIT, steps=20))
    assert det.last_train_result.config.precision == "auto"  # bf16 autocast on CUDA
    x = torch.cat([normal_images(4, seed=1), defective_images(4, seed=2)[0]])
    h32, s32 = det.score(x)
    assert h32.device.type == "cpu" and torch.isfinite(h32).all()
    fast = FlowMismatchDetector.load(det.save(tmp_path / "d.pt"), device="cuda",
                                     precision="bf16", compile="reduce-overhead")
    h16, s16 = fast.score(x)
    h16b, _ = fast.score(x)  # replayed CUDA graphs give the same numbers
    assert torch.equal(h16, h16b)
    assert torch.corrcoef(torch.stack([h16.flatten(), h32.flatten()]))[0, 1] > 0.95
    cpu = FlowMismatchDetector.load(tmp_path / "d.pt", device="cpu")
    assert torch.corrcoef(torch.stack([cpu.score(x)[1], s32]))[0, 1] > 0.9
