"""`gptrain plot`: training curves of one or several runs side by side, as a PNG (matplotlib, the `plot` extra).

Six panels, one curve per run in each, the same colour for a run everywhere: train loss, val loss,
val bits per byte (comparable across tokenizers), learning rate, throughput (global tokens/s) and
gradient norm, against the optimizer step or tokens seen. The
curves come from metrics.jsonl through `history_of`, so a resumed run is one line (later segment wins);
damaged lines are skipped and counted in one warning per run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from gptrain.errors import UserError
from gptrain.tracking.jsonl import METRICS_FILE, damaged_lines_note, history_of, read_jsonl

PANELS = [("train/loss", "train loss"), ("val/loss", "val loss"), ("val/bpb", "val bits per byte"),
          ("lr", "learning rate"), ("global_tokens_per_sec", "throughput (tokens/s)"),
          ("train/grad_norm", "gradient norm")]
EVALUATIONS = ("val/loss", "val/bpb")  # sparse points: marked


def _series(history: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        xv = row["step"] if x == "steps" else row.get("train/tokens_seen")
        if not isinstance(xv, (int, float)) or isinstance(xv, bool):
            continue
        xs.append(xv)
        ys.append(float(value))
    return xs, ys


def check_image_suffix(out: Path) -> None:
    """matplotlib picks the format from the suffix: check it before any work (no suffix: it would add .png)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if out.suffix.lstrip(".").lower() not in formats:
        what = f"a .{out.suffix.lstrip('.')} image" if out.suffix else "an image without a suffix"
        raise UserError(f"-o {out}: matplotlib cannot write {what}. Name the file with one of its formats: "
                        f"{', '.join(formats)} (e.g. -o {out.with_suffix('.png')}).")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def plot_runs(run_dirs: list[str | Path], out: str | Path, x: str = "steps", warn=_warn) -> dict[str, int]:
    """Write the figure to `out`; returns the number of curves drawn per panel (one per run with data).

    `warn(message)` hears about damaged metrics lines (one message per run)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("gptrain plot needs matplotlib. Install it with: pip install 'gptrain[plot]'") from None
    if x not in ("steps", "tokens"):
        raise UserError(f"--x must be steps or tokens, got {x!r}.")
    check_image_suffix(Path(out))
    runs = []
    for d in run_dirs:
        d = Path(d)
        if not (d / METRICS_FILE).is_file():
            raise UserError(f"{d} is not a run folder with metrics (no metrics.jsonl). Pass run folders such as "
                            "runs/<name>; `gptrain runs` lists them.")
        rows, skipped = read_jsonl(d / METRICS_FILE)
        if skipped:
            warn(damaged_lines_note(d / METRICS_FILE, skipped))
        runs.append((d.name, history_of(rows)))
    if not any(h for _, h in runs):
        raise UserError("none of the runs has logged metrics yet; plot again after their first log step.")

    fig, axes = plt.subplots(2, 3, figsize=(18, 8), constrained_layout=True)
    counts: dict[str, int] = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        n = 0
        for i, (name, history) in enumerate(runs):
            xs, ys = _series(history, key, x)
            if not xs:
                continue
            # Evaluations are sparse, and a line through one point draws nothing: mark the points.
            style = {"marker": "o", "markersize": 3} if key in EVALUATIONS or len(xs) == 1 else {}
            ax.plot(xs, ys, label=name, color=colors[i % len(colors)], linewidth=1.4, **style)
            n += 1
        counts[key] = n
        ax.set_title(title)
        ax.set_xlabel("optimizer step" if x == "steps" else "tokens seen")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if n:
            ax.legend(fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return counts
