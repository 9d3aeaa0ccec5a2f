"""Flow-matching training (SPEC 3): loss decreases, exact resume, checkpoints, errors, DDP."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from geokernels.anomaly import CheckpointError, TrainConfig, load_trained_model, train
from geokernels.anomaly import checkpoint as ckpt_mod
from geokernels.anomaly.train import lr_factor
from tests._util import single_thread

TINY = dict(base_width=8, channel_mults=(1, 2))


# tiny models: one thread is as fast, and immune to OpenMP barrier stalls on a loaded machine
_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _images(n=24, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.4 + 0.3
    ramp = torch.linspace(-0.1, 0.1, size).view(1, 1, 1, size)
    return (base + ramp + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def _dataset(images, labels=None):
    labels = labels if labels is not None else [0] * len(images)
    return [{"image": im, "label": int(y), "mask": torch.zeros(1, *im.shape[-2:])}
            for im, y in zip(images, labels)]


FAST = dict(preset="tiny", model_kwargs=TINY, batch_size=8, lr=5e-3, warmup_steps=3,
            ema_decay=0.9, progress=False, device="cpu", log_every=4)


def test_loss_decreases():
    result = train(_images(), steps=25, **FAST)
    losses = result.losses
    assert len(losses) == 25 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert result.step == 25 and not result.model.training
    assert all(not p.requires_grad for p in result.model.parameters())
    assert result.images_per_second > 0 and result.seconds_per_step > 0


def test_only_normal_images_are_used():
    imgs = _images(12)
    # anomalous samples are NaN: training must never touch them
    bad = torch.full_like(imgs[:4], float("nan"))
    ds = _dataset(torch.cat([imgs, bad]), [0] * 12 + [1] * 4)
    result = train(ds, steps=3, **FAST)
    assert all(math.isfinite(v) for v in result.losses)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    data = _images()
    opts = dict(FAST, steps=6, checkpoint_every=3, augment="flip+rot90")
    full = train(data, checkpoint=tmp_path / "full.pt", **opts)
    full_ckpt = torch.load(tmp_path / "full.pt", weights_only=True)

    # interrupt the second run right after its step-3 checkpoint is written
    real_save = ckpt_mod.save_atomic
    calls = []

    def save_then_die(obj, path):
        real_save(obj, path)
        calls.append(obj["step"])
        raise KeyboardInterrupt

    train_mod = sys.modules["geokernels.anomaly.train"]  # the package re-exports train()

    monkeypatch.setattr(train_mod, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(data, checkpoint=tmp_path / "run.pt", **opts)
    assert calls == [3]
    monkeypatch.setattr(train_mod, "save_atomic", real_save)
    resumed = train(data, checkpoint=tmp_path / "run.pt", resume=True, **opts)
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert resumed.losses == full.losses[3:]
    run_ckpt = torch.load(tmp_path / "run.pt", weights_only=True)
    for key in ("model", "ema"):
        for name, value in full_ckpt[key].items():
            assert torch.equal(value, run_ckpt[key][name]), (key, name)
    assert run_ckpt["step"] == full_ckpt["step"] == 6
    # no temporary files left behind by the atomic writes
    assert sorted(os.listdir(tmp_path)) == ["full.pt", "run.pt"]

    # resuming a finished run is a no-op that returns the same model
    again = train(data, checkpoint=tmp_path / "run.pt", resume=True, **opts)
    assert again.losses == [] and again.step == 6
    for name, value in _weights(again.model).items():
        assert torch.equal(value, run_ckpt["ema"][name])


def test_resume_with_other_model_config_is_an_error(tmp_path):
    data = _images(8)
    train(data, checkpoint=tmp_path / "c.pt", steps=2, **FAST)
    opts = dict(FAST, model_kwargs=dict(base_width=16, channel_mults=(1, 2)))
    with pytest.raises(ValueError, match="model config"):
        train(data, checkpoint=tmp_path / "c.pt", resume=True, steps=4, **opts)


def test_checkpoint_contents_and_loading(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    result = train(_images(8), checkpoint=path, steps=2, seed=3, **FAST)
    ck = torch.load(path, weights_only=True)
    for key in ("model_config", "model", "ema", "optimizer", "scheduler", "step", "rng",
                "train_config", "input_range", "format", "version"):
        assert key in ck, key
    assert ck["train_config"]["seed"] == 3 and ck["step"] == 2
    model, _ = load_trained_model(path)
    x, t = torch.rand(2, 3, 16, 16), torch.rand(2)
    assert torch.equal(model(x, t), result.model(x, t))


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_trained_model(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_trained_model(tmp_path / "empty.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_trained_model(tmp_path / "garbage.pt")
    good = tmp_path / "good.pt"
    train(_images(8), checkpoint=good, steps=1, **FAST)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_trained_model(tmp_path / "trunc.pt")
    torch.save({"format": "something else"}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a geokernels"):
        load_trained_model(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError):  # CheckpointError is a ValueError
        train(_images(8), checkpoint=tmp_path / "garbage.pt", resume=True, steps=2, **FAST)
    assert issubclass(CheckpointError, ValueError)


def test_bad_datasets_and_options():
    with pytest.raises(ValueError, match="empty"):
        train([], steps=1, **FAST)
    with pytest.raises(ValueError, match="empty"):
        train(torch.empty(0, 3, 16, 16), steps=1, **FAST)
    with pytest.raises(ValueError, match="no normal"):
        train(_dataset(_images(4), [1, 1, 1, 1]), steps=1, **FAST)
    with pytest.raises(ValueError, match="same shape"):
        train(_dataset([torch.rand(3, 16, 16), torch.rand(3, 8, 8)]), steps=1, **FAST)
    with pytest.raises(ValueError, match="multiples of 2"):
        train(torch.rand(4, 3, 15, 15), steps=1, **FAST)
    with pytest.raises(ValueError, match="NaN"):
        train(torch.full((4, 3, 16, 16), float("nan")), steps=1, **FAST)
    # a grayscale (N, H, W) stack trained as one N-channel image before
    with pytest.raises(ValueError, match=r"3-D tensor of shape \(16, 16, 16\).*x\[:, None\]"):
        train(torch.rand(16, 16, 16), steps=1, **FAST)
    from geokernels.models import VelocityUNet

    with pytest.raises(ValueError, match="channels"):
        train(torch.rand(4, 1, 16, 16), model=VelocityUNet(**TINY), steps=1,
              **{k: v for k, v in FAST.items() if k not in ("preset", "model_kwargs")})
    with pytest.raises(ValueError, match="batch_size"):
        train(_images(4), steps=1, **dict(FAST, batch_size=0))
    with pytest.raises(ValueError, match="augment"):
        train(_images(4), steps=1, augment="rotate", **FAST)
    with pytest.raises(TypeError, match="unknown training option"):
        train(_images(4), steps=1, stepz=3, **FAST)
    with pytest.raises(ValueError, match="empty dict"):
        train({}, steps=1, **FAST)


def test_non_square_images_are_refused():
    # the model records one image_size and the detector scores square images: a non-square
    # run trained a model that could not score its own training images
    with pytest.raises(ValueError, match="square"):
        train(torch.rand(8, 3, 16, 32), **dict(FAST, steps=1))


def test_class_conditional_training():
    data = {"a": _images(8, seed=1), "b": _dataset(_images(8, seed=2))}
    result = train(data, steps=2, **FAST)
    assert result.class_names == ["a", "b"] and result.model.num_classes == 2
    pooled = train(data, steps=2, class_conditional=False, **FAST)
    assert pooled.model.num_classes == 0 and pooled.class_names is None


def test_time_budget_lowers_the_step_count(tmp_path):
    result = train(_images(8), steps=10_000, time_budget_s=1e-3, checkpoint=tmp_path / "b.pt",
                   **FAST)
    assert result.step == 26 and len(result.losses) == 26  # probe steps 5-25, then stop
    ck = torch.load(tmp_path / "b.pt", weights_only=True)
    assert ck["train_config"]["steps"] == 26 and ck["step"] == 26
    with pytest.raises(ValueError, match="time_budget_s"):
        train(_images(8), steps=2, time_budget_s=0, **FAST)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(5, TrainConfig(steps=10, warmup_steps=0)) < 1.0


def test_seed_changes_run_and_is_reproducible():
    a = train(_images(8), steps=3, seed=1, **FAST)
    b = train(_images(8), steps=3, seed=1, **FAST)
    c = train(_images(8), steps=3, seed=2, **FAST)
    assert a.losses == b.losses and a.losses != c.losses
    # training leaves the caller's global RNG alone
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(_images(8), steps=1, **FAST)
    assert torch.equal(torch.rand(3), expected)


_DDP_OPTIONS = dict(preset="tiny", model_kwargs=dict(base_width=8, channel_mults=(1, 2)), steps=3,
                    batch_size=8, lr=3e-3, warmup_steps=1, ema_decay=0.9, progress=False,
                    device="cpu", log_every=1, augment="flip")

_DDP_SCRIPT = textwrap.dedent(f"""
    import sys, torch
    torch.set_num_threads(1)
    from geokernels.anomaly import train
    data = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    train(data, checkpoint=sys.argv[1], **{_DDP_OPTIONS!r})
    # a second train() in the same process (FlowMismatchDetector.fit per category does this):
    # the process group used to be destroyed and re-created, which hung or failed in gloo
    train(data, checkpoint=sys.argv[1] + ".again", **{_DDP_OPTIONS!r})
""")


@pytest.mark.slow
def test_torchrun_rank_takes_its_own_gpu(monkeypatch):
    # `torchrun ... --device cuda`: each rank must use cuda:LOCAL_RANK (set_device rejects a
    # device without an index, and DDP would put every rank on GPU 0); emulated without a GPU
    import torch.distributed as dist

    from geokernels.anomaly.train import _Dist

    picked = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    for asked in ("cuda", None if torch.cuda.is_available() else "cuda", "cuda:1"):
        picked.clear()
        ctx = _Dist(asked)
        assert ctx.device == torch.device("cuda", 1) and picked == [torch.device("cuda", 1)]
        assert ctx.rank == 1 and ctx.local_rank == 1


def test_torchrun_two_processes_match_single_process(tmp_path):
    """The same training under torchrun (2 CPU processes, Gloo) equals the 1-process run."""
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] +
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", str(script), str(tmp_path / "ddp.pt")]
    proc = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp.pt.again").exists()
    data = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    train(data, checkpoint=tmp_path / "one.pt", **_DDP_OPTIONS)
    a = torch.load(tmp_path / "ddp.pt", weights_only=True)
    b = torch.load(tmp_path / "one.pt", weights_only=True)
    assert a["world_size"] == 2 and b["world_size"] == 1
    for name, value in b["model"].items():
        # gradients are averaged over the two half-batches: equal up to summation order
        assert torch.allclose(a["model"][name], value, atol=2e-5, rtol=1e-4), name


def test_non_finite_loss_stops_training(monkeypatch):
    # a loss that turns NaN stops the run with a clear error (decided on the all-reduced mean,
    # so every torchrun rank stops alike)
    from geokernels.models import VelocityUNet

    real = VelocityUNet.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        out = real(self, *args, **kwargs)
        return out * float("nan") if len(calls) == 6 else out

    monkeypatch.setattr(VelocityUNet, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite by step 8"):
        train(_images(), **dict(FAST, steps=12))


def test_cudnn_benchmark_is_restored(monkeypatch):
    # CUDA training turns cudnn.benchmark on (fixed shapes); a process-wide flag must be given
    # back afterwards, also when the loop fails, or every later convolution of the caller changes
    train_mod = sys.modules[train.__module__]   # the package's `train` is the function

    real_loop = train_mod._train_loop

    def loop_as_on_cuda(*args, **kwargs):
        torch.backends.cudnn.benchmark = True       # what the loop does for a CUDA device
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_loop", loop_as_on_cuda)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    train(_images(8), **dict(FAST, steps=2))
    assert torch.backends.cudnn.benchmark is False

    def failing_loop(*args, **kwargs):
        torch.backends.cudnn.benchmark = True
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train_mod, "_train_loop", failing_loop)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(_images(8), **dict(FAST, steps=2))
    assert torch.backends.cudnn.benchmark is False



# ---- session-11 audit of the training pipeline ------------------------------------------------
def test_resume_applies_changed_optimizer_settings(tmp_path):
    """A resume with another lr / weight decay warned and then silently kept the old ones from
    the optimizer state, while the checkpoint recorded the new ones."""
    x = _images(8)
    train(x, steps=3, checkpoint=tmp_path / "a.pt", **FAST)
    torch.save(torch.load(tmp_path / "a.pt", weights_only=True), tmp_path / "b.pt")
    with pytest.warns(UserWarning, match="changed training options"):
        new = train(x, steps=6, checkpoint=tmp_path / "a.pt", resume=True,
                    **dict(FAST, lr=5e-2, weight_decay=0.5))
    with pytest.warns(UserWarning, match="changed training options"):
        old = train(x, steps=6, checkpoint=tmp_path / "b.pt", resume=True, **FAST)
    ck = torch.load(tmp_path / "a.pt", weights_only=True)
    assert ck["optimizer"]["param_groups"][0]["weight_decay"] == 0.5
    assert ck["scheduler"]["base_lrs"] == [5e-2] and ck["train_config"]["lr"] == 5e-2
    assert not all(torch.equal(p, q) for p, q in zip(new.model.parameters(), old.model.parameters()))


def test_resume_refuses_another_category_order(tmp_path):
    a, b = _images(8, seed=1), _images(8, seed=2)
    train({"brick": a, "grass": b}, steps=2, checkpoint=tmp_path / "c.pt", **FAST)
    with pytest.raises(ValueError, match=r"categories \['brick', 'grass'\].*same order"):
        train({"grass": b, "brick": a}, steps=4, checkpoint=tmp_path / "c.pt", resume=True, **FAST)


def test_a_diverged_run_does_not_overwrite_the_checkpoint_with_nan(tmp_path):
    x = _images(8)
    train(x, steps=2, checkpoint=tmp_path / "n.pt", **dict(FAST, checkpoint_every=3))
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match="non-finite by step"):
        train(x, steps=20, checkpoint=tmp_path / "n.pt", resume=True,
              **dict(FAST, lr=1e30, checkpoint_every=3))   # log_every 4: NaN saved at step 6
    ck = torch.load(tmp_path / "n.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert all(torch.isfinite(v).all() for v in ck["ema"].values())


def test_a_finished_time_budget_run_is_not_trained_again(tmp_path):
    """Re-running the same command with --resume gave itself a fresh budget and restarted the
    cosine schedule from a finished run."""
    first = train(_images(8), steps=10_000, time_budget_s=1e-3, checkpoint=tmp_path / "t.pt",
                  **FAST)
    again = train(_images(8), steps=10_000, time_budget_s=1e-3, checkpoint=tmp_path / "t.pt",
                  resume=True, **FAST)
    assert again.step == first.step == 26 and again.losses == []
    assert torch.load(tmp_path / "t.pt", weights_only=True)["budget_fitted"] is True


@pytest.mark.parametrize("make, match", [
    (lambda x: [{"image": (im * 255).to(torch.uint8), "label": 0} for im in x], "dtype torch.uint8"),
    (lambda x: x * 2 - 1, r"must be in \[0, 1\]"),
    (lambda x: [{"image": im * 255, "label": 0} for im in x], r"must be in \[0, 1\]"),
])
def test_images_outside_0_1_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        train(make(_images(8)), steps=1, **FAST)


def test_model_image_size_must_match_the_data():
    with pytest.raises(ValueError, match="image_size=16.*8x8"):
        train(_images(8, size=8), steps=1, **dict(FAST, model_kwargs=dict(TINY, image_size=16)))


def test_train_leaves_the_callers_rng_alone(tmp_path):
    x = _images(8)
    train(x, steps=2, checkpoint=tmp_path / "r.pt", **FAST)
    torch.manual_seed(123)
    with pytest.warns(UserWarning):
        train(x, steps=4, checkpoint=tmp_path / "r.pt", resume=True, **FAST)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
