"""geokernels._files: atomic writes of checkpoints, metrics and reports."""
import json
import os
import stat

import pytest

from geokernels._files import write_atomic, write_json_atomic, write_text_atomic


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "metrics.json"          # the folder is created
    assert write_json_atomic(path, {"a": 1}) == os.fspath(path)
    assert json.loads(path.read_text()) == {"a": 1}
    write_json_atomic(path, {"b": float("nan")})
    assert path.read_text() == '{\n  "b": NaN\n}'
    write_text_atomic(path, "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["metrics.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"ok": True})
    with pytest.raises(ValueError):                   # json refuses NaN here: before any write
        write_json_atomic(path, {"x": float("nan")}, allow_nan=False)

    def half_then_fail(fh):
        fh.write('{"trunc')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half_then_fail)
    assert json.loads(path.read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_permissions_follow_the_umask(tmp_path):
    # tempfile.mkstemp would create 0600 files: checkpoints and results unreadable to the group
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "ckpt.pt", lambda fh: fh.write(b"\0"), binary=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
