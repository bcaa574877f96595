"""`localmim plot RUN_DIR`: draw a run's log.jsonl as RUN_DIR/loss.png.

    localmim plot output/demo                 # -> output/demo/loss.png
    localmim plot runs/vitb --output vitb.png

Panels, all against the optimizer step: the losses (the total `loss` and one line per branch,
`loss_b0`, `loss_b1`, ..., log scale when all are positive), the learning rate, and, when the log
has them (fine-tuning and linear-probe runs), the accuracies (`val_acc1`, `val_acc5`, ...) and the
validation loss (`val_loss`). Lines that do not parse (a torn last line) are skipped; a key that
only some lines have is drawn where it is present. matplotlib (non-interactive Agg canvas) draws.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List, Sequence, Tuple

__all__ = ["add_arguments", "run", "read_log", "series", "loss_figure", "plot_run", "PlotError", "MISSING"]

MISSING = "plotting needs matplotlib, which is not installed; run: pip install 'localmim[demo]'"


class PlotError(ValueError):
    """No log to plot: a missing folder, a missing or empty log.jsonl."""


def read_log(path: str) -> List[Dict]:
    """The objects of a log.jsonl that parse and carry a numeric `step`, in file order."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                float(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def series(rows: Sequence[Dict], key: str) -> Tuple[List[float], List[float]]:
    """(steps, values) of `key` over the rows that have a finite number for it."""
    xs, ys = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(row["step"]))
            ys.append(float(v))
    return xs, ys


def _keys(rows: Sequence[Dict], accept) -> List[str]:
    seen: List[str] = []
    for row in rows:
        for k in row:
            if k not in seen and accept(k):
                seen.append(k)
    return seen


def _branch_keys(rows):
    return sorted(_keys(rows, lambda k: k.startswith("loss_b") and k[6:].isdigit()), key=lambda k: int(k[6:]))


def _accuracy_keys(rows):
    return _keys(rows, lambda k: k.startswith("acc") or k.startswith("val_acc"))


def loss_figure(rows: Sequence[Dict], title: str = ""):
    """A matplotlib Figure of `rows` (log.jsonl objects): axes[0] the losses (total first, then the
    branches, each line labelled by its key), axes[1] the lr, then accuracies and val_loss when
    present."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(MISSING) from None

    losses = [k for k in ["loss"] + _branch_keys(rows) if series(rows, k)[0]]
    panels = [("loss", losses), ("lr", [k for k in ("lr",) if series(rows, k)[0]])]
    accs = [k for k in _accuracy_keys(rows) if series(rows, k)[0]]
    if accs:
        panels.append(("accuracy", accs))
    if series(rows, "val_loss")[0]:
        panels.append(("validation loss", ["val_loss"]))
    fig = Figure(figsize=(7.0, 2.6 * len(panels)), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, keys) in zip(axes, panels):
        for k in keys:
            xs, ys = series(rows, k)
            style = {"linewidth": 2.0, "color": "black"} if k == "loss" else {"linewidth": 1.2}
            ax.plot(xs, ys, label=k, **style)
        values = [v for k in keys for v in series(rows, k)[1]]
        if name == "loss" and values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8, ncol=min(len(keys), 5))
    axes[-1].set_xlabel("optimizer step")
    if title:
        axes[0].set_title(title, fontsize=10)
    return fig


def plot_run(run_dir: str, output: str = "") -> str:
    """Draw `run_dir`/log.jsonl into `output` (default `run_dir`/loss.png); returns the PNG path."""
    from localmim.core.files import write_atomically

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir!r} does not exist")
    log = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log):
        raise PlotError(f"run folder {run_dir!r} has no log.jsonl")
    rows = read_log(log)
    if not rows:
        raise PlotError(f"{log} holds no logged step yet")
    fig = loss_figure(rows, title=os.path.basename(os.path.abspath(run_dir)))
    out = output or os.path.join(run_dir, "loss.png")
    return write_atomically(out, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training output folder holding log.jsonl")
    parser.add_argument("--output", metavar="PNG", default="", help="where to write the plot (default RUN_DIR/loss.png)")


def run(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.output))
    return 0
