"""Atomic file writes: a temporary file in the destination's folder, flushed to disk, then moved
into place with ``os.replace`` (atomic on POSIX and Windows). A reader, a kill or a full disk
never leaves a truncated checkpoint, metrics.json or report behind, and resumable loops that
test ``os.path.exists`` never take half a file for a finished one."""
from __future__ import annotations

import json
import os
import uuid
from typing import IO, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[IO], object],
                 binary: bool = False) -> str:
    """Call ``write(fh)`` on a temporary file next to ``path``, then move it onto ``path``.

    The temporary file is created like any other (permissions from the umask, unlike
    ``tempfile.mkstemp``'s 0600) and removed if ``write`` raises. Returns ``path`` as a str."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    return write_atomic(path, lambda fh: fh.write(text))


def write_json_atomic(path: str | os.PathLike, obj, **dump_kwargs) -> str:
    """``json.dump(obj, indent=2, **dump_kwargs)`` atomically; the object is serialised before
    the file is touched, so a value json cannot encode leaves the old file as it was."""
    text = json.dumps(obj, **{"indent": 2, **dump_kwargs})
    return write_text_atomic(path, text)
