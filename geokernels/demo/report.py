"""Writes the demo's ``summary.json`` and ``report.html``.

The HTML is one self-contained file: inline CSS, no scripts, no external resources; figures are
the PNG files under ``figures/`` next to it, linked by relative paths, so the folder can be
zipped, moved or opened offline.
"""
from __future__ import annotations

import datetime
import html
import math
import os

from geokernels._files import write_json_atomic, write_text_atomic

TITLES = {
    "anomaly": "Anomaly detection: Flow Mismatching",
    "convexity": "D-Convexity: midpoint convexification and CGPM",
    "contour_flow": "Contour Flow: CFSS iterations",
    "kernels": "Kernel speed on this machine",
}
INTROS = {
    "anomaly": "A flow-matching velocity model trained on normal texture crops scores each test "
               "image by how badly its velocity field fits the straight noise-to-image paths "
               "(multi-path mismatch, SPEC 3). Defects light up in the per-pixel heatmap.",
    "convexity": "Shape priors for segmentation: a soft mask is made quasi-concave (every level "
                 "set convex) by local midpoint convexification (SPEC 1.6) or by the convex "
                 "gradient projection module CGPM (SPEC 1.5).",
    "contour_flow": "Soft-threshold-dynamics segmentation with the constraint that the mask "
                    "gradient is orthogonal to a contour flow field (SPEC 2.4), here the ground "
                    "truth flow of each shape (SPEC 2.2), on very noisy logits.",
    "kernels": "Every op's fused backend (C++ CPU / CUDA / Triton) against the literal "
               "pure-PyTorch reference, timed in the same run.",
}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.sub { color: #666; margin-top: 0; }
.status { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.8em; font-size: 0.8em;
          vertical-align: middle; margin-left: 0.6em; color: white; }
.ok { background: #2e7d32; } .failed { background: #c62828; }
.error { background: #fdecea; border-left: 4px solid #c62828; padding: 0.6em 1em;
         white-space: pre-wrap; font-family: monospace; font-size: 0.85em; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f5f5f5; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.88em; }
.cards { display: flex; flex-wrap: wrap; gap: 0.6em; margin: 0.8em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.4em 0.9em; min-width: 8em; }
.card .v { font-size: 1.3em; font-weight: 600; } .card .k { color: #666; font-size: 0.8em; }
.note { color: #444; font-size: 0.9em; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #555; }
"""

# headline numbers shown as cards per section (key, label); missing keys are skipped
HEADLINES = {
    "anomaly": [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"),
                ("aupro", "AUPRO"), ("images", "test images")],
    "convexity": [("solidity_before", "solidity before"),
                  ("midpoint.solidity_after", "after midpoint"),
                  ("cgpm.solidity_after", "after CGPM")],
    "contour_flow": [("dice_before", "Dice before"), ("dice_after", "Dice after CFSS"),
                     ("bd_before", "BD before (px)"), ("bd_after", "BD after CFSS (px)")],
    "kernels": [("speedup_geomean", "geo-mean speed-up"), ("ops", "ops timed"),
                ("device", "device")],
}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _table(title, header, rows) -> str:
    e = html.escape
    out = [f"<table><caption>{e(title)}</caption><tr>"
           + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _section(name: str, section: dict, record: dict, out_dir: str) -> str:
    e = html.escape
    result, error = record["result"], record["error"]
    status = ('<span class="status failed">failed</span>' if error else
              '<span class="status ok">ok</span>')
    parts = [f'<section id="{e(name)}"><h2>{e(TITLES.get(name, name))}{status}</h2>',
             f'<p class="sub">{e(INTROS.get(name, ""))} '
             f'({record["seconds"]:.1f} s wall, {record["cpu_seconds"]:.1f} s CPU)</p>']
    if error:
        parts.append(f'<div class="error">This stage failed: {e(error)}</div>')
        if record.get("traceback"):
            parts.append(f'<details><summary>traceback</summary><pre class="error">'
                         f'{e(record["traceback"])}</pre></details>')
    cards = [(label, section[key]) for key, label in HEADLINES.get(name, []) if key in section]
    if cards:
        parts.append('<div class="cards">' + "".join(
            f'<div class="card"><div class="v">{e(_fmt(v))}</div><div class="k">{e(label)}'
            f'</div></div>' for label, v in cards) + "</div>")
    for table in result.tables:
        parts.append(_table(table.title, table.header, table.rows))
    for note in result.notes:
        parts.append(f'<p class="note">{e(note)}</p>')
    for fig in result.figures:
        if os.path.exists(os.path.join(out_dir, fig.path)):  # link only files that exist
            parts.append(f'<figure><img src="{e(fig.path)}" alt="{e(fig.caption)}">'
                         f'<figcaption>{e(fig.caption)}</figcaption></figure>')
    metrics = [[k, v] for k, v in section.items() if k != "error"]
    if metrics:
        parts.append("<details><summary>all numbers in summary.json</summary>"
                     + _table(f"summary.json: {name}", ["key", "value"], metrics) + "</details>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(summary: dict, records: dict, env: dict, timing: dict, out_dir: str,
                quick: bool = False, command: str | None = None) -> str:
    e = html.escape
    failed = [n for n, s in summary.items() if "error" in s]
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    state = (f"all {len(summary)} stages succeeded" if not failed else
             f"{len(failed)} of {len(summary)} stages failed: {', '.join(failed)}")
    head = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>geokernels demo report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>geokernels demo report</h1>",
        f'<p class="sub">{e(when)} on {e(str(env.get("device")))}'
        + (f' ({e(str(env["gpu"]))})' if env.get("gpu") else "")
        + f' &middot; {timing["seconds"]:.1f} s wall, {timing["cpu_seconds"]:.1f} s CPU'
        + f' &middot; {e(state)}'
        + (" &middot; <b>quick mode</b> (tiny sizes: a smoke test, not representative numbers)"
           if quick else "") + "</p>",
        "<p>" + " &middot; ".join(f'<a href="#{e(n)}">{e(TITLES.get(n, n))}</a>'
                                  for n in summary) + "</p>",
    ]
    body = [_section(n, summary[n], records[n], out_dir) for n in summary]
    env_rows = [[k, "-" if v is None else str(v)] for k, v in env.items()]
    tail = ["<h2>Environment</h2>", _table("versions and build", ["item", "value"], env_rows),
            '<p class="note">Numbers: <code>summary.json</code> next to this file. Reproduce: '
            "<code>" + e(command or ("geokernels demo" + (" --quick" if quick else "")))
            + "</code>.</p>",
            "</body></html>"]
    return "\n".join(head + body + tail)


def write_report(out_dir: str, summary: dict, records: dict, env: dict, timing: dict,
                 quick: bool = False, command: str | None = None) -> tuple[str, str]:
    """Write summary.json and report.html into ``out_dir``; return their paths."""
    summary_path = write_json_atomic(os.path.join(out_dir, "summary.json"), summary,
                                     allow_nan=False)
    report_path = write_text_atomic(os.path.join(out_dir, "report.html"),
                                    render_html(summary, records, env, timing, out_dir, quick=quick,
                                                command=command))
    return summary_path, report_path
