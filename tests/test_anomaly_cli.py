"""`geokernels anomaly train | eval | score` end to end on a fake MVTec-AD tree."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from geokernels.cli import main
from tests._util import single_thread

CATEGORY = "widget"


_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _normal(rng, size):
    colour = rng.uniform(0.3, 0.7, 3)
    ramp = np.linspace(-0.1, 0.1, size)[None, :, None]
    img = colour[None, None] + ramp + rng.normal(0, 0.02, (size, size, 3))
    return np.clip(img, 0, 1)


def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    """root/widget/{train/good, test/good, test/spot, ground_truth/spot} with 24 px PNGs."""
    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(0)
    size = 24
    base = root / CATEGORY
    for i in range(40):
        _save(str(base / "train" / "good" / f"{i:03d}.png"), _normal(rng, size))
    for i in range(6):
        _save(str(base / "test" / "good" / f"{i:03d}.png"), _normal(rng, size))
    for i in range(6):
        img = _normal(rng, size)
        mask = np.zeros((size, size), np.uint8)
        r, c = rng.integers(2, size - 8, 2)
        img[r:r + 6, c:c + 6] = rng.uniform(0, 1, 3)
        mask[r:r + 6, c:c + 6] = 255
        _save(str(base / "test" / "spot" / f"{i:03d}.png"), img)
        os.makedirs(base / "ground_truth" / "spot", exist_ok=True)
        Image.fromarray(mask).save(base / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return root


TRAIN_CONFIG = {"comment": "tiny CLI test run", "dataset": "mvtec", "image_size": 16,
                "preset": "tiny", "base_width": 8, "channel_mults": [1, 2], "steps": 10,
                "batch_size": 16, "lr": 5e-3, "warmup_steps": 3, "ema_decay": 0.9,
                "checkpoint_every": 10, "holdout": 6}


def _train_argv(root, out, config):
    # --steps on the command line overrides the config's 10
    return ["anomaly", "train", "--config", str(config), "--root", str(root), "--categories",
            CATEGORY, "--steps", "30", "--device", "cpu", "--quiet", "--out", str(out)]


@pytest.fixture(scope="module")
def trained(mvtec_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = tmp_path_factory.mktemp("cfg") / "config.json"
    config.write_text(json.dumps(TRAIN_CONFIG))
    assert main(_train_argv(mvtec_root, out, config)) == 0
    return out, config


def test_train_writes_detector_checkpoint_and_log(trained):
    out, _ = trained
    assert sorted(os.listdir(out)) == ["detector.pt", "train.pt", "train_log.json"]
    log = json.loads((out / "train_log.json").read_text())
    run = log["runs"]["all"]
    assert run["steps"] == 30 and log["mode"] == "single"
    assert np.mean(run["last_losses"]) < np.mean(run["first_losses"])
    options = log["metadata"]["options"]
    assert options["steps"] == 30 and options["batch_size"] == 16 and options["image_size"] == 16
    assert log["metadata"]["holdout"] == 6 and log["parameters_per_model"] < 100_000


def test_train_resume_is_a_noop_when_finished(trained, mvtec_root):
    out, config = trained
    before = (out / "train.pt").read_bytes()
    assert main(_train_argv(mvtec_root, out, config) + ["--resume"]) == 0
    assert (out / "train.pt").read_bytes() == before


def test_eval_writes_table_json_and_overlays(trained, mvtec_root, tmp_path):
    out = tmp_path / "eval"
    argv = ["anomaly", "eval", "--checkpoint", str(trained[0] / "detector.pt"),
            "--dataset", "mvtec",
            "--root", str(mvtec_root), "--methods", "mismatch", "reconstruction",
            "calibrated_mismatch", "-K", "2", "-T", "4", "--overlays", "2", "--device", "cpu",
            "--quiet", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap"):
        assert 0.0 <= metrics[key] <= 1.0, key
        assert metrics[key] == metrics["methods"]["mismatch"][key]
        for method in ("mismatch", "reconstruction", "calibrated_mismatch"):
            value = metrics["methods"][method]["categories"][CATEGORY][key]
            assert math.isfinite(value) and 0 <= value <= 1
    entry = metrics["categories"][CATEGORY]
    assert entry["n_test"] == 12 and entry["n_defective"] == 6
    assert entry["image_auroc"] >= 0.6  # the spots are obvious; a 30-step model finds most
    calibrated = metrics["methods"]["calibrated_mismatch"]["categories"][CATEGORY]
    assert "held out" in calibrated["calibration"]
    assert calibrated["heatmaps_from"] == "the mismatch scoring pass"  # no second pass
    table = (out / "metrics.md").read_text()
    assert "| widget | mismatch |" in table and "| **mean** | reconstruction |" in table
    for method in ("mismatch", "reconstruction", "calibrated_mismatch"):
        png = out / "overlays" / f"{method}_{CATEGORY}.png"
        with Image.open(png) as im:
            assert im.size[0] == 3 * 16 + 4 and im.size[1] == 4 * 16 + 3 * 2



def test_eval_defaults_to_the_trained_categories(trained, mvtec_root, tmp_path):
    # a model trained on one category of a root holding two: eval without --categories scores
    # the one it was trained on (from the checkpoint's metadata), not everything under --root
    import shutil

    root = tmp_path / "two"
    shutil.copytree(mvtec_root, root)
    shutil.copytree(root / CATEGORY, root / "gadget")
    out = tmp_path / "eval_two"
    argv = ["anomaly", "eval", "--checkpoint", str(trained[0] / "detector.pt"), "--dataset",
            "mvtec", "--root", str(root), "-K", "2", "-T", "2", "--overlays", "0",
            "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert list(json.loads((out / "metrics.json").read_text())["categories"]) == [CATEGORY]
    assert main(argv[:-1] + [str(out) + "_all", "--categories", CATEGORY, "gadget"]) == 0
    assert sorted(json.loads((tmp_path / "eval_two_all" / "metrics.json").read_text())
                  ["categories"]) == ["gadget", CATEGORY]


def test_eval_smoothing_report_and_per_defect_pixel_auroc(trained, mvtec_root, tmp_path):
    out = tmp_path / "eval_smooth"
    argv = ["anomaly", "eval", "--checkpoint", str(trained[0] / "detector.pt"), "--dataset",
            "mvtec", "--root", str(mvtec_root), "-K", "2", "-T", "4", "--overlays", "0",
            "--device", "cpu", "--quiet", "--report-smoothing", "0", "1.5", "--out", str(out)]
    assert main(argv) == 0
    entry = json.loads((out / "metrics.json").read_text())["categories"][CATEGORY]
    # sigma 0 re-scores the unsmoothed heatmaps: exactly the main numbers
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert entry["smoothed"]["0"][key] == entry[key]
        assert 0 <= entry["smoothed"]["1.5"][key] <= 1
    assert entry["smoothed"]["1.5"]["pixel_auroc"] != entry["pixel_auroc"]
    assert set(entry["pixel_auroc_per_defect"]) == set(entry["image_auroc_per_defect"])
    assert "extra smoothing sigma" in (out / "metrics.md").read_text()
    with pytest.raises(SystemExit, match="report-smoothing"):
        main(argv[:-5] + ["--report-smoothing=-1", "--out", str(out)])

def test_score_prints_and_writes_heatmaps(trained, mvtec_root, tmp_path, capsys):
    good = mvtec_root / CATEGORY / "test" / "good" / "000.png"
    bad = mvtec_root / CATEGORY / "test" / "spot" / "000.png"
    out = tmp_path / "scores"
    assert main(["anomaly", "score", str(good), str(bad), "--checkpoint",
                 str(trained[0] / "detector.pt"), "-K", "2", "-T", "4", "--device", "cpu",
                 "--quiet", "--out", str(out)]) == 0
    lines = [l.split("\t") for l in capsys.readouterr().out.strip().splitlines()]
    assert [l[1] for l in lines] == [str(good), str(bad)]
    assert all(math.isfinite(float(l[0])) for l in lines)
    data = json.loads((out / "scores.json").read_text())
    assert len(data["scores"]) == 2
    # both inputs are named 000.png (MVTec numbers every defect folder from 000): the second
    # heatmap used to overwrite the first; now each is numbered and named in scores.json
    names = [row["heatmap"] for row in data["scores"]]
    assert names == ["0000_000_heatmap.npy", "0001_000_heatmap.npy"]
    first, second = (np.load(out / n) for n in names)
    assert first.shape == (16, 16) and not np.array_equal(first, second)
    assert all((out / n.replace(".npy", ".png")).exists() for n in names)


def test_score_decodes_like_the_loaders(trained, mvtec_root, tmp_path, capsys):
    # a 16-bit PNG: `score` clipped it to white (PIL convert("RGB")); the loaders scale it
    from pathlib import Path

    from geokernels.data._io import load_image
    from geokernels.models import FlowMismatchDetector

    rgb = np.asarray(Image.open(mvtec_root / CATEGORY / "test" / "spot" / "000.png"))
    path = tmp_path / "sixteen.png"
    Image.fromarray((rgb.mean(axis=2) * 257).astype(np.uint16)).save(path)
    assert main(["anomaly", "score", str(path), "--checkpoint", str(trained[0] / "detector.pt"),
                 "-K", "2", "-T", "4", "--device", "cpu", "--quiet"]) == 0
    cli_score = float(capsys.readouterr().out.split("\t")[0])
    det = FlowMismatchDetector.load(trained[0] / "detector.pt", device="cpu", K=2, T=4)
    image = load_image(Path(path), 16)[0]
    assert 0.2 < float(image.mean()) < 0.8
    assert cli_score == pytest.approx(float(det.score(image[None])[1][0]), rel=1e-5)  # %.6g


def test_score_paths_per_call(trained, mvtec_root, tmp_path, capsys):
    bad = mvtec_root / CATEGORY / "test" / "spot" / "000.png"
    scores = []
    for ppc in ("all", "1", "auto"):
        assert main(["anomaly", "score", str(bad), "--checkpoint", str(trained[0] / "detector.pt"),
                     "-K", "2", "-T", "4", "--device", "cpu", "--quiet", "--paths-per-call", ppc,
                     "--out", str(tmp_path / ppc)]) == 0
        scores.append(float(capsys.readouterr().out.split("\t")[0]))
    assert scores[1] == pytest.approx(scores[0], rel=1e-5) and \
        scores[2] == pytest.approx(scores[0], rel=1e-5)
    with pytest.raises(SystemExit):
        main(["anomaly", "score", str(bad), "--paths-per-call", "many", "--out", str(tmp_path)])
    capsys.readouterr()
    with pytest.raises(SystemExit, match="paths_per_call"):
        main(["anomaly", "score", str(bad), "--checkpoint", str(trained[0] / "detector.pt"),
              "--paths-per-call", "0", "--device", "cpu", "--out", str(tmp_path / "z")])


def test_cli_errors(trained, mvtec_root, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["anomaly", "eval", "--checkpoint", str(tmp_path / "missing.pt"), "--dataset",
              "mvtec", "--root", str(mvtec_root), "--out", str(tmp_path / "e")])
    (tmp_path / "corrupt.pt").write_bytes(b"garbage" * 50)
    with pytest.raises(SystemExit, match="corrupt"):
        main(["anomaly", "score", str(mvtec_root / CATEGORY / "test" / "good" / "000.png"),
              "--checkpoint", str(tmp_path / "corrupt.pt")])
    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(SystemExit, match="stepz"):
        main(["anomaly", "train", "--config", str(bad_config), "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="neither a file"):
        main(["anomaly", "train", "--config", "no-such-config", "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="needs --root"):
        main(["anomaly", "train", "--dataset", "visa", "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="needs --root"):
        main(["anomaly", "train", "--dataset", "mvtec", "--categories", "x", "--out",
              str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["anomaly", "score", str(tmp_path / "nope.png"), "--checkpoint",
              str(trained[0] / "detector.pt")])
    empty = tmp_path / "empty_root"
    (empty / "thing" / "train" / "good").mkdir(parents=True)
    (empty / "thing" / "test" / "good").mkdir(parents=True)
    with pytest.raises(SystemExit, match="(?i)empty|no image"):
        main(["anomaly", "train", "--dataset", "mvtec", "--root", str(empty), "--categories",
              "thing", "--steps", "1", "--quiet", "--out", str(tmp_path / "t2")])


@pytest.mark.parametrize("argv, match", [
    # ordinary mistakes: one 'error:' line, not a traceback (library ValueError/FileNotFoundError)
    (["eval", "--dataset", "textures", "--categories", "carpet"], "error: category must be one of"),
    (["train", "--dataset", "textures", "--categories", "carpet"], "error: category must be one of"),
    (["eval", "--dataset", "textures", "--device", "tpu"], "error: device must be"),
    (["train", "--dataset", "textures", "--device", "tpu"], "error: device must be"),
    (["eval", "--dataset", "mvtec", "--root", "{root}", "--categories", "carpet"],
     "error: category folder .*carpet does not exist"),
])
def test_cli_user_errors_are_one_line(mvtec_root, tmp_path, argv, match):
    argv = [a.replace("{root}", str(mvtec_root)) for a in argv]
    with pytest.raises(SystemExit, match=match):
        main(["anomaly", *argv, "--quiet", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("argv", [
    ["train", "--preset", "huge"], ["train", "--image-size", "0"], ["eval", "--limit", "-3"],
    ["eval", "--limit", "0"], ["eval", "--overlays", "-1"], ["eval", "--threads", "0"],
])
def test_cli_rejects_out_of_range_options(tmp_path, argv, capsys):
    if argv[0] == "train":  # were they accepted again, keep the run short
        argv = [*argv, "--steps", "1", "--num-train", "2", "--quiet"]
    with pytest.raises(SystemExit) as info:
        main(["anomaly", *argv, "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_bench_device_error_is_one_line():
    with pytest.raises(SystemExit, match="error: --device must be"):
        main(["bench", "--device", "tpu", "--quick"])


def test_shipped_training_config_is_valid():
    import argparse

    from geokernels.anomaly import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["anomaly", "train", "--config", "textures", "--steps", "7",
                              "--out", "x"])
    cli._apply_config(args)
    assert args.dataset == "textures" and args.preset == "tiny" and args.mode == "conditional"
    assert args.steps == 7  # an explicit flag wins over the config
    assert os.path.basename(cli.config_path("textures")) == "train_textures.json"


def test_config_does_not_override_a_flag_given_with_its_default_value(monkeypatch):
    """`--config textures --batch-size 32` trains with 32 although 32 is the flag's default."""
    import geokernels.anomaly.cli as acli
    from geokernels.cli import build_parser

    seen = {}
    monkeypatch.setattr(acli, "_set_threads", lambda args: (seen.update(vars(args)),
                                                           (_ for _ in ()).throw(SystemExit(0))))
    args = build_parser().parse_args(["anomaly", "train", "--config", "textures",
                                      "--batch-size", "32", "--out", "unused"])
    with pytest.raises(SystemExit):
        args.func(args)
    shipped = json.loads(open(acli.config_path("textures")).read())
    assert shipped["batch_size"] != 32
    assert seen["batch_size"] == 32                       # typed: wins
    assert seen["steps"] == shipped["steps"]              # not typed: from the config
    assert seen["image_size"] == shipped["image_size"]


def test_metrics_undefined_only_for_a_single_class():
    # NaN only where a metric is undefined (one class); a NaN heatmap or a size mismatch is an
    # error, not an "n/a" cell that the means over categories would silently leave out
    from geokernels.anomaly.cli import compute_metrics

    g = torch.Generator().manual_seed(0)
    heats = torch.rand(4, 8, 8, generator=g)
    masks = torch.zeros(4, 8, 8)
    masks[2:, 2:5, 3:6] = 1
    labels = torch.tensor([0, 0, 1, 1])
    m = compute_metrics(heats, heats.flatten(1).amax(1), masks, labels)
    assert all(0 <= v <= 1 for v in m.values())
    only_normal = compute_metrics(heats[:2], heats[:2].flatten(1).amax(1), masks[:2], labels[:2])
    assert all(v != v for v in only_normal.values())        # undefined: NaN, shown as n/a
    bad = heats.clone()
    bad[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(bad, heats.flatten(1).amax(1), masks, labels)
    with pytest.raises(ValueError):
        compute_metrics(heats[:, :4], heats.flatten(1).amax(1), masks, labels)


def test_limit_spreads_over_defect_types():
    # MVTec lists test images folder by folder: the first N defective ones were one defect type
    from geokernels.anomaly.cli import _limited

    class Fake:
        defects = ["good"] * 4 + ["crack"] * 5 + ["hole"] * 3 + ["scratch"] * 2

    labels = [int(d != "good") for d in Fake.defects]
    idx = _limited(Fake(), labels, 5)
    picked = [Fake.defects[i] for i in idx if labels[i]]
    assert sorted(picked) == ["crack", "crack", "hole", "hole", "scratch"]
    assert [i for i in idx if not labels[i]] == [0, 1, 2, 3]
    assert len(_limited(Fake(), labels, 100)) == len(labels)


def test_texture_calibration_note_does_not_claim_held_out_crops():
    """The texture photos have no normal rows outside training: the calibration crops are unused
    crops of the training rows, whose pixels the model was trained on. The note said 'not used in
    training' (read as held out), and the published calibrated figures inherited that."""
    from types import SimpleNamespace

    from geokernels.anomaly import cli as acli

    det = SimpleNamespace(metadata={"num_train": 3, "data_seed": 0})
    calib, note = acli._calibration_set(det, "textures", None, "brick", 16, 2)
    assert len(calib) == 2 and "not held out" in note and "overlap" in note
