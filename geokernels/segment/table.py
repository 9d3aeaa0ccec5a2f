"""The results table: no prior vs each prior at an equal training budget, several seeds.

For every dataset and seed, one model is trained per prior with identical settings (data,
steps, batch size, learning rate, backbone, seed: the same initial weights and batches). The
"cgpm" row evaluates the "none" model with CGPM refinement (the prior is an inference-time
projection, so training a second identical network would only repeat "none"). Each row gives
the mean +- standard deviation over seeds of the per-seed test-set means.

Runs already present under ``out_dir`` (a ``metrics.json`` per run) are reused, so an
interrupted table resumes; a run made with other settings (steps, lr, data, ...) is an error,
never silently tabulated under the new settings. ``out_dir/results.md`` and ``results.json`` are
rewritten after every run.
"""
from __future__ import annotations

import json
import os
import shlex
import time

import numpy as np

from geokernels._files import write_json_atomic, write_text_atomic

TABLE_METRICS = ("dice", "iou", "hd95", "bd", "solidity")
LOWER_IS_BETTER = {"hd95", "bd", "bdsd"}


def _run_dir(out_dir, dataset, prior, seed):
    return os.path.join(out_dir, dataset, prior, f"seed{seed}")


def _check_reusable(path: str, run: dict, cfg, eval_length) -> None:
    """ValueError unless the finished run in ``path`` was made with ``cfg`` (up to the op
    backend and checkpoint interval) and evaluated on ``eval_length`` images."""
    saved = run.get("train_config")
    if saved is None:
        raise ValueError(f"out: {path} records no training settings (written by an older "
                         f"geokernels); use another --out")
    diff = [f"{k}={old!r} (now {new!r})" for k, (old, new) in
            cfg.changed_from(saved, ignore=("checkpoint_every", "backend")).items()]
    if run.get("eval_length") != eval_length:
        diff.append(f"eval_length={run.get('eval_length')!r} (now {eval_length!r})")
    if diff:
        raise ValueError(f"out: {path} holds a run made with other settings: {', '.join(diff)}; "
                         f"use another --out (or the same settings to resume the table)")


def run_table(out_dir: str, *, datasets=("shapes", "coins"),
              priors=("none", "qc1", "qc2", "cgpm", "cf", "cfss"), seeds=(0, 1, 2),
              command: str | None = None, progress: bool = True, log=print,
              collect_only: bool = False, eval_length: int | None = None,
              **train_kwargs) -> dict:
    """Train/evaluate every (dataset, prior, seed); write ``results.md`` / ``results.json``.

    ``train_kwargs`` are :class:`geokernels.segment.TrainConfig` fields shared by all runs
    (steps, batch_size, size, width, depth, lr, train_length, base_loss, ...). With
    ``collect_only`` nothing is trained: the runs already under ``out_dir`` are tabulated (e.g.
    after running datasets or seeds in separate processes into one folder). Returns the results
    dict (per run and aggregated). ``eval_length`` limits the test images (default: the
    dataset's test split)."""
    from geokernels.segment.evaluate import evaluate
    from geokernels.segment.train import TrainConfig, train

    os.makedirs(out_dir, exist_ok=True)
    runs = []
    for dataset in datasets:
        for seed in seeds:
            for prior in priors:
                run_dir = _run_dir(out_dir, dataset, prior, seed)
                metrics_path = os.path.join(run_dir, "metrics.json")
                # the cgpm row refines the "none" model: same training settings
                cfg = TrainConfig(dataset=dataset, prior="none" if prior == "cgpm" else prior,
                                  seed=seed, **train_kwargs)
                if os.path.exists(metrics_path):
                    with open(metrics_path) as fh:
                        run = json.load(fh)
                    _check_reusable(metrics_path, run, cfg, eval_length)
                    runs.append(run)
                    continue
                if collect_only:
                    continue
                t0 = time.perf_counter()
                train_dir = _run_dir(out_dir, dataset, "none", seed) if prior == "cgpm" else run_dir
                ckpt = os.path.join(train_dir, "checkpoint.pt")
                # resume=True also finishes (or refuses, on other settings) a checkpoint left by
                # an interrupted run; a finished one is reloaded as it is
                info = train(cfg, train_dir, resume=os.path.exists(ckpt), progress=progress,
                             log=log)
                result = evaluate(ckpt, None, refine="cgpm" if prior == "cgpm" else "none",
                                  length=eval_length, progress=progress)
                train_seconds = None if prior == "cgpm" else info["seconds"]
                result.update(prior=prior, seed=seed, train_seconds=train_seconds,
                              eval_length=eval_length, seconds=time.perf_counter() - t0)
                os.makedirs(run_dir, exist_ok=True)
                write_json_atomic(metrics_path, result)   # exists() above means finished
                runs.append(result)
                m = result["mean"]
                log(f"{dataset:>6} {prior:>5} seed {seed}: " + "  ".join(
                    f"{k} {m[k]:.4f}" for k in TABLE_METRICS) + f"  ({result['seconds']:.0f} s)")
                _write(out_dir, runs, datasets, priors, seeds, command, train_kwargs)
    return _write(out_dir, runs, datasets, priors, seeds, command, train_kwargs)


def aggregate(runs, datasets, priors) -> dict:
    """{dataset: {prior: {metric: (mean, std, n)}}} over seeds of the per-run means."""
    table = {}
    for d in datasets:
        for p in priors:
            rows = [r for r in runs if r["dataset"] == d and r["prior"] == p]
            if not rows:
                continue
            table.setdefault(d, {})[p] = {
                k: (float(np.mean([r["mean"][k] for r in rows])),
                    float(np.std([r["mean"][k] for r in rows])), len(rows))
                for k in TABLE_METRICS + ("gt_solidity", "empty_pred")}
    return table


def paired_differences(runs, datasets, priors, baseline: str = "none") -> dict:
    """{dataset: {prior: {metric: (mean, std, n)}}} of the per-seed differences prior - baseline
    (same seed: same initial weights, batches and test images), for priors other than baseline."""
    out = {}
    for d in datasets:
        base = {r["seed"]: r["mean"] for r in runs if r["dataset"] == d and r["prior"] == baseline}
        for p in priors:
            if p == baseline:
                continue
            pairs = [(r["mean"], base[r["seed"]]) for r in runs
                     if r["dataset"] == d and r["prior"] == p and r["seed"] in base]
            if pairs:
                out.setdefault(d, {})[p] = {
                    k: (float(np.mean([a[k] - b[k] for a, b in pairs])),
                        float(np.std([a[k] - b[k] for a, b in pairs])), len(pairs))
                    for k in TABLE_METRICS}
    return out


def _pm(mean: float, std: float, n: int, sign: bool = False) -> str:
    """"mean ± std" over n seeds; one seed has no spread ("± n/a", not "± 0.0000")."""
    return f"{mean:{'+' if sign else ''}.4f} ± " + (f"{std:.4f}" if n > 1 else "n/a")


def format_table(table: dict, command: str | None = None, settings: dict | None = None,
                 deltas: dict | None = None) -> str:
    titles = {"dice": "Dice ↑", "iou": "IoU ↑", "hd95": "HD95 ↓", "bd": "BD ↓",
              "solidity": "solidity"}
    lines = ["# Segmentation with shape priors: results", ""]
    if command:
        lines += ["Reproduce with:", "", "```", command, "```", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    for d, rows in table.items():
        gt_sol = next(iter(rows.values()))["gt_solidity"][0]
        lines += [f"## {d} (test set; mean ± std over seeds; ground-truth solidity "
                  f"{gt_sol:.4f})", "",
                  "| prior | seeds | " + " | ".join(titles[k] for k in TABLE_METRICS) + " |",
                  "|---|---:|" + "---:|" * len(TABLE_METRICS)]
        for p, vals in rows.items():
            n = vals["dice"][2]
            lines.append(f"| {p} | {n} | " + " | ".join(
                _pm(vals[k][0], vals[k][1], n) for k in TABLE_METRICS) + " |")
        lines.append("")
        if deltas and d in deltas:
            lines += [f"Paired differences vs no prior ({d}; prior − none on the same seed, "
                      "mean ± std over seeds):", "",
                      "| prior | seeds | " + " | ".join("Δ " + titles[k] for k in TABLE_METRICS)
                      + " |", "|---|---:|" + "---:|" * len(TABLE_METRICS)]
            for p, vals in deltas[d].items():
                lines.append(f"| {p} | {vals['dice'][2]} | " + " | ".join(
                    _pm(vals[k][0], vals[k][1], vals[k][2], sign=True) for k in TABLE_METRICS)
                    + " |")
            lines.append("")
    lines += ["HD95, BD in pixels (an empty prediction counts as the image diagonal). Solidity = "
              "area / convex-hull area of the predicted mask (1 = convex).", ""]
    return "\n".join(lines)


def _write(out_dir, runs, datasets, priors, seeds, command, train_kwargs) -> dict:
    table = aggregate(runs, datasets, priors)
    deltas = paired_differences(runs, datasets, priors)
    settings = dict(train_kwargs)
    if settings.get("base_loss", "default") is None:
        settings["base_loss"] = "per prior (cf, cfss: bce; others: bce+dice)"
    settings["seeds"] = list(seeds)
    result = {"command": command, "settings": settings, "table": table, "deltas_vs_none": deltas,
              "runs": [{k: v for k, v in r.items() if k != "per_image"} for r in runs]}
    write_json_atomic(os.path.join(out_dir, "results.json"), result)
    write_text_atomic(os.path.join(out_dir, "results.md"),
                      format_table(table, command, settings, deltas))
    return result


def command_line(argv) -> str:
    return "geokernels segment table " + " ".join(shlex.quote(a) for a in argv)
