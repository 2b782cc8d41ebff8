"""Run reports. For now: `loss.png`, train and validation loss against steps, from metrics.jsonl.

matplotlib is imported inside the function (it costs ~0.5 s) with the Agg backend, so plotting works
without a display; the PNG is written to a temp file and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.log import read_metrics


def plot_loss(metrics_path: Path, out_png: Path, *, title: str = "") -> Path:
    """Draw train loss and validation loss against steps into `out_png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="val loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
