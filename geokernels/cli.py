"""The ``geokernels`` command: info | bench | demo | anomaly | segment.

Each sub-command lives in a module exposing ``add_parser(subparsers)``; the parser's ``func``
default runs it. Modules are imported lazily so ``geokernels info`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from geokernels._files import write_json_atomic

# module path of each sub-command family, in help order
_SUBCOMMAND_MODULES = [
    "geokernels.cli:_info_parser",
    "geokernels.cli:_bench_parser",
    # demo
    "geokernels.demo.cli",

    # anomaly {train,score,eval}
    "geokernels.anomaly.cli",

    # segment {train,eval}
    "geokernels.segment.cli",

]


def _info(args) -> int:
    import platform

    import torch

    import geokernels
    from geokernels import _backend, _extension

    info = {
        "geokernels": geokernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": None,
        "extension_built": _extension.compiled(),
        "extension_torch": getattr(_extension.extension(), "TORCH_VERSION", None),
        "cuda_kernels_compiled": _extension.cuda_compiled(),
        "extension_cuda": getattr(_extension.extension(), "CUDA_VERSION", None),
        "cpu_simd": _extension.extension()._active_cpu_isa() if _extension.compiled() else None,
        "GEOKERNELS_BACKEND": os.environ.get("GEOKERNELS_BACKEND") or None,
        "ops": {},
    }
    try:
        forced = _backend.default_backend()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    for op in sorted(_backend.registered_ops()):
        info["ops"][op] = {
            dev: _backend.available_backends(op, dev)
            for dev in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k != "ops":
            print(f"{k:<{width}}  {v}")
    print("\nop backends available here (first = what backend='auto' picks"
          + (f"; GEOKERNELS_BACKEND={forced} overrides that" if forced != "auto" else "") + "):")
    for op, per_dev in info["ops"].items():
        print(f"  {op:<22} " + "   ".join(f"{d}: {', '.join(b)}" for d, b in per_dev.items()))
    return 0


def _info_parser(sub):
    p = sub.add_parser("info", help="versions, compiled backends and per-op backend availability")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)


def _bench(args) -> int:
    from geokernels import benchmark

    from geokernels._backend import resolve_device

    try:
        device = str(resolve_device(args.device or "auto"))
    except ValueError as exc:
        raise SystemExit(f"error: --{exc}") from None
    done: list = []

    def on_case(rows):  # a run killed by a time limit keeps what it measured
        done.extend(rows)
        for line in benchmark.format_table(rows).splitlines()[2:]:
            print("measured", line, flush=True)
        if args.json:
            write_json_atomic(args.json, [r.as_dict() for r in done])

    print("each case's rows as soon as measured (prefix: measured), the aligned table at the end", flush=True)
    try:
        results = benchmark.run(device, ops=args.ops or None, quick=args.quick,
                                compile_reference=not args.no_compile, memory=not args.no_memory,
                                on_case=on_case)
    except benchmark.UnknownOpError as exc:
        raise SystemExit(f"error: --{exc}") from None
    print(f"\ngeokernels bench on {device} (median step time; x ref / x compiled = speed-up of "
          f"this row over the reference eager / torch.compile(reference); % copy BW = GB/s over "
          f"the measured device copy bandwidth, CUDA only)")
    print(benchmark.format_table(results))
    if args.json:
        write_json_atomic(args.json, [r.as_dict() for r in results])
    return 0


def _bench_parser(sub):
    p = sub.add_parser("bench", help="time every op's fused backends against the reference")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--ops", nargs="*", help="only these ops (e.g. qc2_loss)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geokernels",
                                     description=__doc__.splitlines()[0].replace("``", "`"))
    sub = parser.add_subparsers(dest="command", required=True)
    for spec in _SUBCOMMAND_MODULES:
        mod_name, _, attr = spec.partition(":")
        mod = importlib.import_module(mod_name)
        getattr(mod, attr or "add_parser")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
