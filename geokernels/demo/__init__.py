"""``geokernels demo``: the whole library on embedded data, with a visual report.

    from geokernels.demo import run_demo
    summary = run_demo("demo_out")          # or: geokernels demo --out demo_out

Four stages run in order, each isolated from the others' failures (see ``stages.py``):

* ``anomaly``: the shipped flow-matching detector scores the offline texture test set
  (heatmaps, image/pixel AUROC, AUPRO);
* ``convexity``: midpoint convexification and CGPM of concave, noisy masks (solidity);
* ``contour_flow``: CFSS iterations with the ground-truth contour flow on noisy shapes (Dice, BD);
* ``kernels``: each op's fused backend against the reference on this machine.

The output folder holds ``report.html`` (opens offline; figures are PNG files beside it, linked
relatively), ``summary.json`` (one key per stage; a failed stage has an ``"error"`` entry) and
``figures/``. Everything is generated from data inside the package: no download.
"""
from __future__ import annotations

import math
import os
import sys
import time
import traceback

import torch

from geokernels._backend import resolve_device  # re-exported: demo.resolve_device
from geokernels.demo import stages as _stages
from geokernels.demo.stages import StageContext, StageError, StageResult

SECTIONS = ("anomaly", "convexity", "contour_flow", "kernels")
MAX_STRING = 400  # summary.json holds short strings; the full traceback goes to the report

__all__ = ["run_demo", "SECTIONS", "failed_stages", "resolve_device"]


def _clean_metrics(metrics: dict) -> dict:
    """Flat JSON-safe values: finite floats / ints, short strings. Non-finite numbers become
    strings ("nan", "inf") so summary.json never holds a NaN passed off as a number."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
            value = value.item()
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int):
            out[str(key)] = value
        elif isinstance(value, float):
            out[str(key)] = value if math.isfinite(value) else str(value)
        else:
            text = str(value)
            out[str(key)] = text if len(text) <= MAX_STRING else text[:MAX_STRING - 3] + "..."
    return out


def failed_stages(summary: dict) -> list[str]:
    """Names of the sections of a summary that record an error."""
    return [name for name, section in summary.items() if "error" in section]


def _environment(device: torch.device) -> dict:
    import platform

    import geokernels
    from geokernels import _extension

    env = {
        "geokernels": geokernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu threads": torch.get_num_threads(),
        "extension built": _extension.compiled(),
        "CUDA kernels compiled": _extension.cuda_compiled(),
        "GEOKERNELS_BACKEND": os.environ.get("GEOKERNELS_BACKEND") or "(unset: auto)",
        "CPU cores / load average": _cores_and_load(),
    }
    if _extension.compiled():
        try:
            env["CPU SIMD"] = _extension.extension()._active_cpu_isa()
        except Exception:  # pragma: no cover - older builds
            pass
    return env


def _cores_and_load() -> str:
    load = _stages._load_average()
    return f"{os.cpu_count()} / {'n/a' if load is None else f'{load:.1f}'}"


def run_demo(out="demo_out", device="auto", quick: bool = False, progress: bool = True, *,
             checkpoint=None) -> dict:
    """Run every stage, write ``out/report.html`` and ``out/summary.json``; return the summary.

    Args:
        out: the report folder (created; existing report files are overwritten).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        quick: tiny sizes (a smoke test in well under a minute), not representative numbers.
        progress: show one tqdm progress bar per stage.
        checkpoint: a detector checkpoint for the anomaly stage instead of the shipped one.

    Returns:
        ``{"anomaly": {...}, "convexity": {...}, "contour_flow": {...}, "kernels": {...}}``: each
        a flat dict of finite numbers and short strings (``seconds`` / ``cpu_seconds``: the
        stage's wall and process CPU time). A stage that failed has ``"error"`` (and keeps the
        results it computed before failing); ``failed_stages(summary)`` lists them. A failing
        stage never stops the others.
    """
    from geokernels.demo.report import write_report

    from geokernels._backend import default_backend

    dev = resolve_device(device)
    default_backend()   # a bad GEOKERNELS_BACKEND is one error here, not one per stage
    out = os.fspath(out)
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    for stale in ("report.html", "summary.json"):   # an interrupted re-run must not leave the
        try:                                       # last run's report over this run's figures
            os.remove(os.path.join(out, stale))
        except FileNotFoundError:
            pass
    summary: dict[str, dict] = {}
    records: dict[str, dict] = {}
    started = time.perf_counter()
    cpu_started = time.process_time()
    names = [n for n in _stages.STAGES if n in SECTIONS]
    for position, name in enumerate(names, start=1):
        ctx = StageContext(out_dir=out, device=dev, quick=bool(quick), progress=bool(progress),
                           checkpoint=None if checkpoint is None else os.fspath(checkpoint),
                           name=name, position=position, count=len(names))
        t0, c0 = time.perf_counter(), time.process_time()
        error, trace = None, None
        try:
            returned = _stages.STAGES[name](ctx)
            if returned is not None and returned is not ctx.result:
                if not isinstance(returned, StageResult):
                    raise TypeError(f"stage {name!r} returned {type(returned).__name__}, not a "
                                    f"StageResult")
                ctx.result = returned
        except StageError as exc:   # an expected cause, explained by the message
            error = str(exc)
        except Exception as exc:    # a bug in a stage must not hide the others' results
            error = f"{type(exc).__name__}: {exc}"
            trace = traceback.format_exc()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        # what a failed stage computed before failing is kept (real numbers, flagged by "error")
        metrics = _clean_metrics(ctx.result.metrics)
        if error is not None:
            metrics = {"error": _clean_metrics({"e": error})["e"], **metrics}
            print(f"[{position}/{len(names)}] {name} FAILED: {error}", file=sys.stderr, flush=True)
        metrics.update(seconds=round(seconds, 3), cpu_seconds=round(cpu_seconds, 3))
        summary[name] = metrics
        records[name] = dict(result=ctx.result, error=error, traceback=trace, seconds=seconds,
                             cpu_seconds=cpu_seconds)
    for name in SECTIONS:  # a section the registry lacks is still reported (as an error)
        if name not in summary:
            summary[name] = {"error": f"no stage named {name!r} is registered"}
            records[name] = dict(result=StageResult(), error=summary[name]["error"],
                                 traceback=None, seconds=0.0, cpu_seconds=0.0)
    summary = {name: summary[name] for name in SECTIONS}
    timing = dict(seconds=time.perf_counter() - started,
                  cpu_seconds=time.process_time() - cpu_started)
    command = "geokernels demo" + (f" --device {device}" if device != "auto" else "") \
        + (" --quick" if quick else "") \
        + (f" --checkpoint {os.fspath(checkpoint)}" if checkpoint is not None else "")
    write_report(out, summary, records, _environment(dev), timing, quick=bool(quick),
                 command=command)
    return summary
