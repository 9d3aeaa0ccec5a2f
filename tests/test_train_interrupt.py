"""`geokernels anomaly train` survives being killed mid-run (issue 8).

A training subprocess is SIGKILLed half-way through writing a checkpoint (the worst moment: the
temporary file is partly written). The last complete checkpoint must still load, ``--resume``
must finish the run, and the result must equal an uninterrupted run bit for bit (weights,
optimiser state, losses). A truncated or corrupt checkpoint given to ``--resume`` is a clear
error naming the file.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, KILL_AT = 12, 5

TRAIN_ARGS = ["anomaly", "train", "--dataset", "textures", "--categories", "brick",
              "--image-size", "16", "--num-train", "8", "--preset", "tiny", "--base-width", "8",
              "--channel-mults", "1", "2", "--blocks-per-level", "1", "--steps", str(STEPS),
              "--batch-size", "4", "--warmup-steps", "2", "--checkpoint-every", "1",
              "--precision", "fp32", "--device", "cpu", "--threads", "1", "--quiet"]

# Runs the CLI in-process, but torch.save of the step-KILL_AT checkpoint writes part of the
# temporary file and then SIGKILLs its own process (no cleanup handlers run).
_KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from geokernels.cli import main

    kill_at = int(os.environ["GEOKERNELS_TEST_KILL_AT"])
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == kill_at:
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    sys.exit(main(sys.argv[1:]))
""")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("GEOKERNELS_TEST_KILL_AT", None)
    return env


def _cli(args, env=None, script=None):
    cmd = [sys.executable] + (["-c", script] if script else ["-m", "geokernels"]) + args
    return subprocess.run(cmd, env=env or _env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _cli_in_process(args) -> int:
    """The CLI in this process (cheaper than a fresh interpreter); restores torch's threads."""
    from geokernels.cli import main

    threads = torch.get_num_threads()
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for idx in opt_a:
        for name, value in opt_a[idx].items():
            other = opt_b[idx][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (idx, name)
    assert a["scheduler"] == b["scheduler"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("interrupt")
    full, run = base / "full", base / "run"

    env = _env()
    env["GEOKERNELS_TEST_KILL_AT"] = str(KILL_AT)
    killed = _cli(TRAIN_ARGS + ["--out", str(run)], env=env, script=_KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    after_kill = sorted(os.listdir(run))
    ckpt_after_kill = _load(run / "train.pt")

    # only the killed run needs its own process; resuming and the reference run are the same
    # CLI code in this one
    assert _cli_in_process(TRAIN_ARGS + ["--out", str(run), "--resume"]) == 0
    assert _cli_in_process(TRAIN_ARGS + ["--out", str(full)]) == 0
    return dict(full=full, run=run, after_kill=after_kill, ckpt_after_kill=ckpt_after_kill)


def test_kill_mid_write_leaves_the_last_complete_checkpoint(runs):
    # the half-written temporary file is there, train.pt is the step before, intact
    assert "train.pt" in runs["after_kill"]
    assert any(name.startswith("train.pt.") and name.endswith(".tmp")
               for name in runs["after_kill"]), runs["after_kill"]
    assert "detector.pt" not in runs["after_kill"]  # the run really died mid-way
    assert runs["ckpt_after_kill"]["step"] == KILL_AT - 1


def test_resume_equals_uninterrupted_run(runs):
    full, run = _load(runs["full"] / "train.pt"), _load(runs["run"] / "train.pt")
    assert full["step"] == run["step"] == STEPS
    _assert_same_state(full, run)
    # the losses of the resumed part equal the uninterrupted run's last steps
    log_full = json.loads((runs["full"] / "train_log.json").read_text())["runs"]["all"]
    log_run = json.loads((runs["run"] / "train_log.json").read_text())["runs"]["all"]
    resumed_losses = log_run["last_losses"]
    assert log_run["steps"] == STEPS and len(resumed_losses) == min(10, STEPS - KILL_AT + 1)
    assert resumed_losses == log_full["last_losses"][-len(resumed_losses):]
    # and the shipped detector (EMA weights) is identical
    det_full = _load(runs["full"] / "detector.pt")
    det_run = _load(runs["run"] / "detector.pt")
    for (ka, va), (kb, vb) in zip(sorted(det_full["members"].items()),
                                  sorted(det_run["members"].items())):
        assert ka == kb
        for name in va["ema"]:
            assert torch.equal(va["ema"][name], vb["ema"][name]), name


def test_resume_from_truncated_checkpoint_is_a_clear_error(runs, tmp_path):
    data = (runs["full"] / "train.pt").read_bytes()
    out = tmp_path / "truncated"
    out.mkdir()
    (out / "train.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit) as info:  # one line naming the file, no traceback
        _cli_in_process(TRAIN_ARGS + ["--out", str(out), "--resume"])
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message
    assert str(out / "train.pt") in message and "corrupt" in message, message
