"""geokernels segment: end-to-end training on every prior, resume, evaluation metrics against
hand-computed cases, deterministic datasets, bad input."""
import json
import math
import os

import numpy as np
import pytest
import torch

from geokernels.segment import PRIORS, TrainConfig, evaluate, make_dataset, segmentation_metrics, train
from geokernels.segment.train import CHECKPOINT_NAME

TINY = dict(steps=2, batch_size=4, size=32, train_length=8, depth=1, width=4, cfss_iters=3,
            cgpm_steps=3, checkpoint_every=1)


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- end to end -------------------------------------------------------------------------------

@pytest.mark.parametrize("prior", PRIORS)
def test_train_and_eval_each_prior(tmp_path, prior):
    cfg = TrainConfig(dataset="shapes", prior=prior, **TINY)
    info = train(cfg, str(tmp_path / "run"), progress=False, log=lambda *_: None)
    ckpt = tmp_path / "run" / CHECKPOINT_NAME
    assert ckpt.exists() and info["steps"] == 2 and len(info["history"]) == 2
    assert all(math.isfinite(h["loss"]) for h in info["history"])
    if prior in ("qc1", "qc2", "cf", "cfss"):
        assert all(h["prior"] > 0 for h in info["history"])  # the prior term is really there
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    result = evaluate(str(ckpt), str(tmp_path / "eval"), length=4, progress=False)
    assert result["refine"] == ("cgpm" if prior == "cgpm" else "none")
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["n_images"] == 4 and len(written["per_image"]) == 4
    for key in ("dice", "iou", "hd95", "bd", "bdsd", "solidity"):
        per = [row[key] for row in written["per_image"]]
        assert all(math.isfinite(v) for v in per)
        assert written["mean"][key] == pytest.approx(np.mean(per))
    assert (tmp_path / "eval" / "metrics.md").read_text().startswith("# segment eval")
    assert (tmp_path / "eval" / "overlays.png").exists()


def test_cgpm_refinement_is_cgpm_of_the_logits(tmp_path):
    from geokernels import cgpm
    from geokernels.segment.evaluate import load_model, predict_probs

    train(TrainConfig(dataset="shapes", prior="cgpm", prior_weight=2.0, **TINY), str(tmp_path),
          progress=False)
    model, cfg, _ = load_model(str(tmp_path / CHECKPOINT_NAME))
    x = torch.stack([make_dataset("shapes", "test", size=32, length=2)[i][0] for i in range(2)])
    refined = predict_probs(model, cfg, x, refine="cgpm")
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(refined, cgpm(logits, steps=3, weight=2.0))
    assert not torch.allclose(refined, torch.sigmoid(logits))


def test_resume_continues_exactly(tmp_path):
    full = TrainConfig(dataset="shapes", prior="qc2", **{**TINY, "steps": 4})
    train(full, str(tmp_path / "a"), progress=False)
    half = TrainConfig(dataset="shapes", prior="qc2", **TINY)  # 2 steps
    train(half, str(tmp_path / "b"), progress=False)
    train(full, str(tmp_path / "b"), resume=True, progress=False)
    a = torch.load(tmp_path / "a" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert a["step"] == b["step"] == 4
    assert _state_equal(a["model"], b["model"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_existing_checkpoint_needs_resume_and_matching_settings(tmp_path):
    train(TrainConfig(dataset="shapes", prior="none", **TINY), str(tmp_path), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(dataset="shapes", prior="none", **TINY), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="prior='none' \\(now 'qc2'\\)"):
        train(TrainConfig(dataset="shapes", prior="qc2", **TINY), str(tmp_path), resume=True,
              progress=False)


# ---- metrics against hand-computed cases ------------------------------------------------------

def _square(r0, c0, side=4, n=10):
    m = torch.zeros(1, 1, n, n, dtype=torch.uint8)
    m[..., r0:r0 + side, c0:c0 + side] = 1
    return m


def test_metrics_identical_masks():
    gt = _square(2, 2)
    m = segmentation_metrics(gt, gt)
    assert m["dice"].item() == 1.0 and m["iou"].item() == 1.0
    assert m["hd95"].item() == 0.0 and m["bd"].item() == 0.0 and m["bdsd"].item() == 0.0
    assert m["solidity"].item() == 1.0 and m["empty_pred"].item() == 0.0


def test_metrics_square_shifted_by_one_column():
    # gt rows/cols 2..5; pred cols 3..6. |P & G| = 12, |P| = |G| = 16, |P | G| = 20.
    gt, pred = _square(2, 2), _square(2, 3)
    m = segmentation_metrics(pred, gt)
    assert m["dice"].item() == pytest.approx(24 / 32)
    assert m["iou"].item() == pytest.approx(12 / 20)
    # surfaces: 12 pixels each; 6 of each lie on the other's surface (distance 0), 6 at distance 1
    # -> the 95th percentile of 12 zeros and 12 ones is 1
    assert m["hd95"].item() == pytest.approx(1.0)
    # pred's inner boundary: 6 pixels on gt's inner boundary (df 0), 4 outside gt in column 6
    # (df 1), 2 inside gt at (3,3), (4,3) (EDT 2): BD = 8/12, BDSD = sqrt(12/12 - (8/12)^2)
    assert m["bd"].item() == pytest.approx(8 / 12)
    assert m["bdsd"].item() == pytest.approx(math.sqrt(1 - (8 / 12) ** 2))
    assert m["solidity"].item() == 1.0


def test_metrics_empty_prediction_is_a_finite_worst_case():
    gt = _square(2, 2)
    m = segmentation_metrics(torch.zeros_like(gt), gt)
    diag = math.hypot(10, 10)
    assert m["dice"].item() == 0.0 and m["empty_pred"].item() == 1.0
    assert m["hd95"].item() == pytest.approx(diag) and m["bd"].item() == pytest.approx(diag)
    # dropping an object must not look "more convex": an empty prediction has solidity 0
    assert m["solidity"].item() == 0.0 and m["gt_solidity"].item() == 1.0


def test_metrics_concave_solidity_matches_skimage():
    from skimage.measure import regionprops

    pred = _square(2, 2, side=6)
    pred[..., 2:5, 2:5] = 0  # an L-shape: 36 - 9 = 27 pixels
    m = segmentation_metrics(pred, pred)
    expected = regionprops(pred[0, 0].numpy())[0].solidity
    assert m["solidity"].item() == pytest.approx(expected) and m["solidity"].item() < 0.95


# ---- datasets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["shapes", "coins"])
def test_datasets_deterministic_by_seed(name):
    a = make_dataset(name, "train", size=32, length=3, data_seed=5)
    b = make_dataset(name, "train", size=32, length=3, data_seed=5)
    c = make_dataset(name, "train", size=32, length=3, data_seed=6)
    for i in range(3):
        (xa, ya), (xb, yb), (xc, _) = a[i], b[i], c[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)
        assert xa.shape == (1, 32, 32) and ya.shape == (1, 32, 32)
        assert set(ya.unique().tolist()) <= {0.0, 1.0} and ya.sum() > 0
    test = make_dataset(name, "test", size=32, length=3, data_seed=5)
    assert not torch.equal(test[0][0], a[0][0])


def test_coins_instances_and_split():
    from geokernels.data import CoinsSegmentation, coin_instances

    photo, labels = coin_instances()
    assert photo.shape == labels.shape == (303, 384) and labels.max() == 24
    areas = np.bincount(labels.ravel())[1:]
    assert areas.min() > 900 and areas.max() < 3500
    train_coins = set(CoinsSegmentation("train").coins)
    test_coins = set(CoinsSegmentation("test").coins)
    assert len(train_coins) == 18 and len(test_coins) == 6 and not train_coins & test_coins
    # the centre coin fills a central blob; the crop is about 1.5-1.9 diameters wide
    ds = CoinsSegmentation("test", size=48, augment=False)
    image, mask = ds[0]
    assert mask[0, 24, 24] == 1 and 0.15 < mask.mean() < 0.4


# ---- bad input --------------------------------------------------------------------------------

def _write_folder(root, n=3, size=(20, 20), mask_size=None, mask_values=(0, 255)):
    from PIL import Image

    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "masks", exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.random(size) * 255).astype(np.uint8)
        ms = mask_size or size
        mask = np.full(ms, mask_values[0], np.uint8)
        mask[ms[0] // 4: 3 * ms[0] // 4, ms[1] // 4: 3 * ms[1] // 4] = mask_values[1]
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")


def test_folder_dataset_trains_and_evaluates(tmp_path):
    _write_folder(tmp_path / "data")
    cfg = TrainConfig(dataset="folder", root=str(tmp_path / "data"), prior="cf",
                      **{**TINY, "train_length": None, "size": 24})
    train(cfg, str(tmp_path / "run"), progress=False)
    with pytest.warns(UserWarning, match="no --val-root"):
        result = evaluate(str(tmp_path / "run" / CHECKPOINT_NAME), None, progress=False)
    assert result["n_images"] == 3


def test_folder_mask_size_mismatch_names_the_file(tmp_path):
    _write_folder(tmp_path / "data", mask_size=(20, 18))
    cfg = TrainConfig(dataset="folder", root=str(tmp_path / "data"), **TINY)
    with pytest.raises(ValueError, match=r"mask .*im0\.png.* has size"):
        train(cfg, str(tmp_path / "run"), progress=False)


def test_folder_non_binary_mask_names_the_file(tmp_path):
    _write_folder(tmp_path / "data", mask_values=(0, 128))
    cfg = TrainConfig(dataset="folder", root=str(tmp_path / "data"), **{**TINY, "train_length": None})
    with pytest.raises(ValueError, match=r"mask .*im0\.png.* is not binary.*--mask-threshold"):
        train(cfg, str(tmp_path / "run"), progress=False)
    # --mask-threshold reaches the loader in training and evaluation
    cfg = TrainConfig(dataset="folder", root=str(tmp_path / "data"), mask_threshold=100,
                      **{**TINY, "train_length": None})
    train(cfg, str(tmp_path / "run"), progress=False)
    with pytest.warns(UserWarning, match="training folder"):
        result = evaluate(str(tmp_path / "run" / CHECKPOINT_NAME), None, progress=False)
    assert result["mean"]["gt_solidity"] == 1.0  # the 0/128 squares, binarised
    # the folder evaluated is recorded, and the training folder is named as such
    assert result["root"] == str(tmp_path / "data") and "training folder" in result["evaluated_on"]
    # more images than the folder holds: an error, not a silent cap
    big = TrainConfig(dataset="folder", root=str(tmp_path / "data"), mask_threshold=100,
                      **{**TINY, "train_length": 8})
    with pytest.raises(ValueError, match="asked for 8 images"):
        train(big, str(tmp_path / "run8"), progress=False)


def test_empty_folder_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "data" / "images")
    os.makedirs(tmp_path / "data" / "masks")
    cfg = TrainConfig(dataset="folder", root=str(tmp_path / "data"), **TINY)
    with pytest.raises(ValueError, match="root: no images"):
        train(cfg, str(tmp_path / "run"), progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prior="convex"), "prior must be one of"),
    (dict(base_loss="focal"), "base_loss must be one of"),
    (dict(prior="qc2", prior_weight=-1.0), "prior_weight must be"),
    (dict(steps=-1), "steps must be"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(dataset="folder"), "root: --dataset folder needs --root"),
    (dict(dataset="mnist"), "dataset must be one of"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(train_length=0), "train_length must be"),
    (dict(prior="cf", prior_weight=1.5), "must be in \\[0, 1\\]"),
    (dict(mask_threshold=0.5), "mask_threshold: only --dataset folder"),
    (dict(norm="instance", size=16, depth=4), "depth: a depth-4 U-Net pools size 16 down to 1x1"),
    (dict(norm="batch", size=16, depth=4, batch_size=1), "depth"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_cli_errors_name_the_argument(tmp_path, capsys):
    from geokernels.cli import main

    with pytest.raises(SystemExit, match="root"):
        main(["segment", "train", "--dataset", "folder", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["segment", "eval", "--checkpoint", str(tmp_path / "missing.pt"), "--out",
              str(tmp_path / "e")])
    with pytest.raises(SystemExit, match="device"):
        main(["segment", "train", "--steps", "1", "--device", "bogus", "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="mask_threshold"):
        main(["segment", "train", "--mask-threshold", "0.5", "--out", str(tmp_path / "m")])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="could not be read"):
        main(["segment", "eval", "--checkpoint", str(tmp_path / "bad.pt"), "--out",
              str(tmp_path / "e")])


def test_cli_train_eval_roundtrip(tmp_path, capsys):
    from geokernels.cli import main

    out = tmp_path / "run"
    assert main(["segment", "train", "--dataset", "coins", "--prior", "qc1", "--steps", "2",
                 "--batch-size", "2", "--size", "32", "--train-length", "4", "--depth", "1",
                 "--width", "4", "--out", str(out), "--no-progress"]) == 0
    assert main(["segment", "eval", "--checkpoint", str(out / CHECKPOINT_NAME), "--out",
                 str(tmp_path / "eval"), "--length", "3", "--backend", "torch",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["backend"] == "torch"
    printed = capsys.readouterr().out
    assert "| Dice |" in printed and (tmp_path / "eval" / "overlays.png").exists()


def test_results_table(tmp_path):
    from geokernels.segment.table import run_table

    settings = {k: v for k, v in TINY.items() if k != "checkpoint_every"}
    result = run_table(str(tmp_path), datasets=("shapes",), priors=("none", "cgpm", "qc2"),
                       seeds=(0,), command="geokernels segment table ...", progress=False,
                       log=lambda *_: None, eval_length=4, **settings)
    table = result["table"]["shapes"]
    assert list(table) == ["none", "cgpm", "qc2"] and table["none"]["dice"][2] == 1
    md = (tmp_path / "results.md").read_text()
    assert "| cgpm | 1 |" in md and "geokernels segment table ..." in md
    delta = result["deltas_vs_none"]["shapes"]["qc2"]["dice"]
    assert delta[0] == pytest.approx(table["qc2"]["dice"][0] - table["none"]["dice"][0])
    assert "Paired differences vs no prior" in md
    # the cgpm row refines the "none" model: no second network is trained
    assert not (tmp_path / "shapes" / "cgpm" / "seed0" / CHECKPOINT_NAME).exists()
    # collecting again trains nothing and gives the same table
    again = run_table(str(tmp_path), datasets=("shapes",), priors=("none", "cgpm", "qc2"),
                      seeds=(0, 1), progress=False, collect_only=True, eval_length=4, **settings)
    assert again["table"]["shapes"] == table
    # runs made with other settings are never tabulated under the new ones
    for change in ({"steps": 3}, {"lr": 1e-3}, {"eval_length": 5}):
        kwargs = {**settings, "eval_length": 4, **change}
        with pytest.raises(ValueError, match="made with other settings"):
            run_table(str(tmp_path), datasets=("shapes",), priors=("none", "cgpm", "qc2"),
                      seeds=(0,), progress=False, log=lambda *_: None, **kwargs)


def test_table_cgpm_row_finishes_an_interrupted_none_run(tmp_path):
    """The cgpm row evaluated whatever "none" checkpoint it found, even one left mid-training."""
    from geokernels.segment.table import run_table

    settings = {k: v for k, v in TINY.items() if k != "checkpoint_every"}
    partial = TrainConfig(dataset="shapes", prior="none", seed=0, **{**settings, "steps": 1})
    train(partial, str(tmp_path / "shapes" / "none" / "seed0"), progress=False)
    result = run_table(str(tmp_path), datasets=("shapes",), priors=("cgpm",), seeds=(0,),
                       progress=False, log=lambda *_: None, eval_length=4, **settings)
    assert [r["steps_trained"] for r in result["runs"]] == [2]


# ---- objectives (SPEC 2.3 / 2.5) ----------------------------------------------------------------

def test_default_cf_and_cfss_objectives_are_the_spec_ones():
    import torch.nn.functional as F

    from geokernels import contour_flow_loss
    from geokernels.models import CFSSNet
    from geokernels.segment.train import build_model, ground_truth_flow, training_loss

    x, y = (torch.stack(t) for t in zip(*[make_dataset("shapes", "train", size=32, length=2)[i]
                                          for i in range(2)]))
    flows = ground_truth_flow(y)
    torch.manual_seed(0)
    cfg = TrainConfig(prior="cf", **TINY)
    assert cfg.base_loss == "bce" and cfg.prior_weight == 0.6
    model = build_model(cfg)
    loss, _ = training_loss(model, cfg, x, y, flows)
    logits = model(x)
    spec = 0.4 * F.binary_cross_entropy_with_logits(logits, y) + 0.6 * contour_flow_loss(logits, flows)
    torch.testing.assert_close(loss, spec)
    cfg = TrainConfig(prior="cfss", **TINY)
    model = build_model(cfg)
    assert cfg.base_loss == "bce" and isinstance(model, CFSSNet)
    loss, _ = training_loss(model, cfg, x, y, flows)
    torch.testing.assert_close(loss, model.loss({"image": x, "mask": y, "flow": flows})[0])
    assert TrainConfig(prior="qc2").base_loss == "bce+dice"


def test_old_cf_checkpoint_is_not_resumed_under_the_new_objective(tmp_path):
    cfg = TrainConfig(prior="cf", **TINY)
    train(cfg, str(tmp_path), progress=False)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    state["version"] = 1
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="version-1 objective"):
        train(TrainConfig(prior="cf", **{**TINY, "steps": 3}), str(tmp_path), resume=True,
              progress=False)


# ---- backend, device, eval options -------------------------------------------------------------

def test_backend_is_chosen_at_eval_and_resume_not_pinned_by_the_checkpoint(tmp_path):
    """A model trained with one op backend (e.g. cuda on a GPU box) evaluates and resumes with
    another; the eval backend defaults to "auto"."""
    cfg = TrainConfig(prior="cfss", backend="torch", **TINY)
    train(cfg, str(tmp_path), progress=False)
    ckpt = str(tmp_path / CHECKPOINT_NAME)
    a = evaluate(ckpt, None, refine="cgpm", length=2, progress=False)
    b = evaluate(ckpt, None, refine="cgpm", length=2, backend="torch", progress=False)
    assert a["backend"] == "auto" and b["backend"] == "torch"
    for k in ("dice", "hd95"):
        assert a["mean"][k] == pytest.approx(b["mean"][k], abs=1e-6)
    train(TrainConfig(prior="cfss", backend="auto", **{**TINY, "steps": 3}), str(tmp_path),
          resume=True, progress=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        evaluate(ckpt, None, length=2, backend="gpu", progress=False)


def test_device_and_batch_size_errors_name_the_argument(tmp_path):
    cfg = TrainConfig(prior="none", **TINY)
    with pytest.raises(ValueError, match="device"):
        train(cfg, str(tmp_path / "a"), device="bogus", progress=False)
    train(cfg, str(tmp_path / "b"), progress=False)
    ckpt = str(tmp_path / "b" / CHECKPOINT_NAME)
    for kwargs, match in ((dict(device="tpu"), "device"), (dict(batch_size=0), "batch_size"),
                          (dict(overlays=-1), "overlays"), (dict(length=0), "length")):
        with pytest.raises(ValueError, match=match):
            evaluate(ckpt, None, progress=False, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            evaluate(ckpt, None, device="cuda", progress=False)


def test_eval_counts_empty_predictions_and_overlays_exactly(tmp_path):
    from PIL import Image

    from geokernels.segment.evaluate import format_markdown

    # 15 of 22 empty: int(15 / 22 * 22) printed 14
    legacy = {"dataset": "shapes", "prior": "none", "refine": "none", "checkpoint": "x",
              "n_images": 22, "mean": {"dice": 0.5, "empty_pred": 15 / 22}}
    assert "15 empty predictions" in format_markdown(legacy)
    train(TrainConfig(prior="none", **TINY), str(tmp_path), progress=False)
    res = evaluate(str(tmp_path / CHECKPOINT_NAME), str(tmp_path / "e"), length=6, overlays=5,
                   progress=False)
    assert res["n_empty_pred"] == round(res["mean"]["empty_pred"] * 6)
    assert f"{res['n_empty_pred']} empty predictions" in (tmp_path / "e" / "metrics.md").read_text()
    # 5 images: two rows of 4 tiles (the old code showed 4 images for --overlays 1..7)
    h, w = Image.open(tmp_path / "e" / "overlays.png").size[::-1]
    tile = 32 * 2 + 2
    assert (h, w) == (2 * tile, 4 * tile)
    assert not [f for f in os.listdir(tmp_path / "e") if f.endswith(".tmp")]


def test_table_with_one_seed_shows_no_spread():
    from geokernels.segment.table import format_table

    row = {k: (0.5, 0.0, 1) for k in ("dice", "iou", "hd95", "bd", "solidity", "gt_solidity",
                                      "empty_pred")}
    md = format_table({"shapes": {"none": row}})
    assert "0.5000 ± n/a" in md and "± 0.0000" not in md
