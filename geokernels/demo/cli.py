"""``geokernels demo [--out DIR] [--device auto|cpu|cuda] [--quick] [--checkpoint PATH]``."""
from __future__ import annotations

import os
import sys


def _run(args) -> int:
    import time

    from geokernels.demo import failed_stages, resolve_device, run_demo

    from geokernels._backend import default_backend

    try:
        resolve_device(args.device)
        default_backend()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = _unusable_folder(args.out)
    if problem:
        print(f"error: --out {args.out!r} {problem}", file=sys.stderr)
        return 2
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        print(f"error: --checkpoint {args.checkpoint!r} does not exist (or is not a file)",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    cpu_started = time.process_time()
    summary = run_demo(args.out, device=args.device, quick=args.quick,
                       progress=not args.no_progress, checkpoint=args.checkpoint)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    report = os.path.join(args.out, "report.html")
    print(f"\ngeokernels demo: {wall:.1f} s wall, {cpu:.1f} s CPU")
    for name, section in summary.items():
        state = "FAILED" if "error" in section else "ok"
        print(f"  {name:<13} {state:<7} {section.get('seconds', 0.0):6.1f} s"
              + (f"  {section['error']}" if "error" in section else ""))
    print(f"report: {os.path.abspath(report)}")
    failed = failed_stages(summary)
    if failed:
        print(f"error: {len(failed)} stage(s) failed: {', '.join(failed)} (see the report)",
              file=sys.stderr)
        return 1
    return 0


def _unusable_folder(path) -> str | None:
    """Why ``path`` cannot be the report folder (None if it can): it is a file, or it cannot be
    created or written."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        return f"cannot be created: {exc.strerror or exc}"
    if not os.access(path, os.W_OK | os.X_OK):
        return "is not writable"
    return None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole library on embedded data and write a visual report",
        description="Anomaly detection, D-Convexity, Contour Flow and kernel timings on data "
                    "shipped with the package; writes report.html and summary.json. Exit code "
                    "0 when every stage succeeded, 1 otherwise.")
    p.add_argument("--out", default="demo_out", help="report folder (default: ./demo_out)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: a smoke test in well under a minute (numbers not "
                        "representative)")
    p.add_argument("--checkpoint", default=None,
                   help="detector checkpoint for the anomaly stage (default: the shipped one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
