"""Training curves from OUT/metrics.jsonl: loss, reward accuracy and reward margins.

One figure with a panel per metric, train records as a line over optimizer steps and eval
records as dots; an SFT run (no rewards) gets the loss panel only. matplotlib is optional
(`pip install minidpo[plot]`); without it `plot_metrics` raises a one-line MiniDPOError.
"""

from __future__ import annotations

from pathlib import Path

from minidpo.errors import MiniDPOError, ParameterError
from minidpo.io import load_jsonl_tolerant

PANELS = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"))


def plot_metrics(run_dir: str | Path, out_file: str | Path | None = None) -> Path:
    """Draw RUN/metrics.jsonl into `out_file` (default RUN/metrics.png); returns its path."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    records = [r for r in load_jsonl_tolerant(metrics_file) if isinstance(r, dict) and isinstance(r.get("step"), int)]
    if not records:
        raise MiniDPOError(f"{metrics_file}: no metrics yet (is {run_dir} a training --out folder?)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MiniDPOError("matplotlib is not installed; pip install 'minidpo[plot]' to draw plots") from None
    out_file = Path(out_file) if out_file else run_dir / "metrics.png"
    from matplotlib.backend_bases import FigureCanvasBase

    if out_file.is_dir() or out_file.suffix.lstrip(".").lower() not in FigureCanvasBase.get_supported_filetypes():
        raise ParameterError(f"out_file {out_file}: give an image file name ending in .png, .pdf or .svg", "out_file")

    panels = [(key, title) for key, title in PANELS if any(key in r for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for split, style in (("train", "-"), ("eval", "o")):
            points = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label=split, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file, dpi=120)
    plt.close(fig)
    return out_file
