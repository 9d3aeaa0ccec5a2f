"""``geokernels segment train | eval | table``: segmentation with shape priors.

    geokernels segment train --dataset shapes --prior qc2 --steps 300 --out runs/qc2
    geokernels segment train --dataset folder --root my_data --prior cf --out runs/cf
    geokernels segment train ... --out runs/qc2 --steps 600 --resume     # continue a run
    geokernels segment eval --checkpoint runs/qc2/checkpoint.pt --out runs/qc2/eval
    geokernels segment eval --checkpoint runs/none/checkpoint.pt --refine cgpm --out runs/cgpm
    geokernels segment table --out runs/table --seeds 0 1 2 --steps 300

``eval`` writes DIR/metrics.json (mean and per-image Dice, IoU, HD95, BD, BDSD, solidity),
DIR/metrics.md and DIR/overlays.png. ``table`` writes DIR/results.md and DIR/results.json.
"""
from __future__ import annotations

import argparse


def _add_model_args(p, defaults):
    from geokernels.models.unet import NORMS

    p.add_argument("--base-loss", default=None, choices=("bce", "dice", "bce+dice"),
                   help="base segmentation loss (default: bce for cf and cfss, the SPEC "
                        "objectives; bce+dice for the other priors)")
    for flag, kind, help_text in (
            ("--steps", int, "optimiser steps"), ("--batch-size", int, "images per step"),
            ("--lr", float, "Adam learning rate"), ("--size", int, "image side in pixels"),
            ("--depth", int, "U-Net down-samplings"), ("--width", int, "U-Net first-level channels"),
            ("--cfss-iters", int, "CFSS iterations (prior cfss)"),
            ("--cfss-sigma", float, "CFSS Gaussian sigma (prior cfss)"),
            ("--cgpm-steps", int, "CGPM steps at evaluation (prior cgpm)")):
        default = getattr(defaults, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=default, help=f"{help_text} (default %(default)s)")
    p.add_argument("--train-length", type=int, default=None,
                   help="training images (default: shapes 512, coins 360 crops, folder all)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.add_argument("--norm", default=defaults.norm, choices=NORMS,
                   help="U-Net normalisation (default %(default)s)")
    _add_backend_arg(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _add_backend_arg(p) -> None:
    from geokernels._backend import BACKENDS

    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="op backend of the priors, CGPM and CFSS (default %(default)s: the best "
                        "for the device)")


def _config_kwargs(args) -> dict:
    return dict(base_loss=args.base_loss, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                size=args.size, train_length=args.train_length, data_seed=args.data_seed,
                depth=args.depth, width=args.width, norm=args.norm, cfss_iters=args.cfss_iters,
                cfss_sigma=args.cfss_sigma, cgpm_steps=args.cgpm_steps, backend=args.backend)


def _set_threads(args) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def _train(args) -> int:
    _set_threads(args)
    from geokernels.segment.train import TrainConfig, train

    try:
        cfg = TrainConfig(dataset=args.dataset, root=args.root, val_root=args.val_root,
                          prior=args.prior, prior_weight=args.prior_weight, seed=args.seed,
                          checkpoint_every=args.checkpoint_every,
                          mask_threshold=args.mask_threshold, **_config_kwargs(args))
        info = train(cfg, args.out, resume=args.resume, progress=not args.no_progress,
                     device=args.device)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    last = info["history"][-1] if info["history"] else {}
    print(f"trained {cfg.prior} on {cfg.dataset}: {info['steps']} steps in {info['seconds']:.1f} s, "
          f"last loss {last.get('loss', float('nan')):.4f}; checkpoint {info['checkpoint']}")
    return 0


def _eval(args) -> int:
    _set_threads(args)
    from geokernels.segment.evaluate import evaluate, format_markdown

    try:
        result = evaluate(args.checkpoint, args.out, refine=args.refine, length=args.length,
                          root=args.root, batch_size=args.batch_size, cgpm_steps=args.cgpm_steps,
                          overlays=args.overlays, device=args.device, backend=args.backend,
                          progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(format_markdown(result))
    print(f"wrote {args.out}/metrics.json, metrics.md" + (", overlays.png" if args.overlays else ""))
    return 0


def _table(args) -> int:
    _set_threads(args)
    from geokernels.segment.table import command_line, run_table

    kwargs = _config_kwargs(args)
    argv = ["--out", args.out, "--datasets", *args.datasets, "--priors", *args.priors,
            "--seeds", *map(str, args.seeds)]
    for key, value in kwargs.items():
        if value is not None and not (key == "backend" and value == "auto"):
            argv += ["--" + key.replace("_", "-"), str(value)]
    try:
        result = run_table(args.out, datasets=args.datasets, priors=args.priors, seeds=args.seeds,
                           command=command_line(argv), progress=not args.no_progress,
                           collect_only=args.collect_only, **kwargs)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"error: {exc}") from None
    from geokernels.segment.table import format_table

    print(format_table(result["table"], result["command"], deltas=result["deltas_vs_none"]))
    return 0


def add_parser(sub) -> None:
    from geokernels.segment.datasets import DATASETS
    from geokernels.segment.train import PRIORS, TrainConfig

    defaults = TrainConfig()
    seg = sub.add_parser("segment", help="segmentation with shape priors: train | eval | table",
                         description=__doc__.splitlines()[0].replace("``", "`"),
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=__doc__.split("\n", 1)[1].replace("``", "`"))
    ssub = seg.add_subparsers(dest="segment_command", required=True)

    p = ssub.add_parser("train", help="train a U-Net with a shape prior")
    p.add_argument("--dataset", default="shapes", choices=DATASETS)
    p.add_argument("--root", default=None, help="--dataset folder: folder with images/ and masks/")
    p.add_argument("--val-root", default=None,
                   help="--dataset folder: evaluation folder (default: the training folder, "
                        "with a warning)")
    p.add_argument("--mask-threshold", type=float, default=None,
                   help="--dataset folder: binarise soft masks (e.g. JPEG) as value > T on the "
                        "file's scale (0..255, 0..65535 or 0..1); default: masks must be binary")
    p.add_argument("--prior", default="none", choices=PRIORS)
    p.add_argument("--prior-weight", type=float, default=None,
                   help="weight W of the prior (default per prior: qc1 10, qc2 3, cf 0.6 (the "
                        "objective is (1 - W) BCE + W L: SPEC lambda = 0.4), cfss 0.1 (the flow "
                        "term alpha), cgpm 1.0 (the CGPM loss weight at eval))")
    p.add_argument("--seed", type=int, default=0, help="weights init and batch order (default 0)")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, config.json, train_log.json)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps between checkpoints (default %(default)s)")
    _add_model_args(p, defaults)
    p.set_defaults(func=_train)

    p = ssub.add_parser("eval", help="metrics and overlays of a trained model on its test set")
    p.add_argument("--checkpoint", required=True, help="OUT/checkpoint.pt of segment train")
    p.add_argument("--out", required=True, help="folder for metrics.json, metrics.md, overlays.png")
    p.add_argument("--refine", default="auto", choices=("auto", "none", "cgpm"),
                   help="auto: CGPM for --prior cgpm models, else none")
    p.add_argument("--cgpm-steps", type=int, default=None, help="override the CGPM steps")
    p.add_argument("--length", type=int, default=None, help="test images (default: all / preset)")
    p.add_argument("--root", default=None, help="folder models: evaluate on this folder")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per forward pass (default %(default)s; CGPM averages over it)")
    p.add_argument("--overlays", type=int, default=16, help="images in overlays.png (0 = none)")
    _add_backend_arg(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval)

    p = ssub.add_parser("table", help="no prior vs each prior, equal budget, several seeds")
    p.add_argument("--out", required=True, help="folder of the runs and results.md/json")
    p.add_argument("--datasets", nargs="+", default=["shapes", "coins"], choices=("shapes", "coins"))
    p.add_argument("--priors", nargs="+", default=list(PRIORS), choices=PRIORS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--collect-only", action="store_true",
                   help="train nothing: tabulate the runs already in --out")
    _add_model_args(p, defaults)
    p.set_defaults(func=_table)
