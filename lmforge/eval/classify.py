"""Classification metrics: accuracy, per-class precision/recall/F1, macro-F1, confusion matrix (text + PNG).

Conventions (scikit-learn's, so numbers compare): precision of a class never predicted and recall of
a class absent from the references are 0; macro-F1 is the unweighted mean of per-class F1 over the
classes that occur in the references or the predictions (scikit-learn's `f1_score(average="macro")`). A class
the model knows that this data neither holds nor gets is listed (support 0) but not averaged: its F1 is
undefined (scikit-learn warns and would count it as 0), and counting it made a perfect classifier scored on a
file of 2 of its 4 classes report a macro-F1 of 0.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.atomic import replacing
from lmforge.log import display_width


def classification_report(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict[str, Any]:
    """Metrics for label ids (indices into `labels`).

    Returns:
        {"accuracy", "macro_f1", "n", "per_class": {label: {precision, recall, f1, support}},
         "confusion": rows = true label, columns = predicted label, "labels"}.
    """
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred, strict=True):
        confusion[t][p] += 1
    per_class = {}
    for c, name in enumerate(labels):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(k))
        support = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    seen = [m["f1"] for c, m in enumerate(per_class.values()) if m["support"] or any(row[c] for row in confusion)]
    n = len(y_true)
    return {
        "accuracy": sum(confusion[c][c] for c in range(k)) / n if n else 0.0,
        "macro_f1": sum(seen) / len(seen) if seen else 0.0,
        "n": n,
        "per_class": per_class,
        "confusion": confusion,
        "labels": list(labels),
    }


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: per-class P/R/F1, then the confusion matrix."""
    labels = report["labels"]
    width = max(8, *(display_width(label) for label in labels))

    def left(text: str) -> str:  # padded by terminal columns: a Chinese character takes two
        return text + " " * (width - display_width(text))

    norm = f" | accuracy per label byte {report['accuracy_norm']:.4f}" if "accuracy_norm" in report else ""
    lines = [f"accuracy {report['accuracy']:.4f} | macro-F1 {report['macro_f1']:.4f}{norm} | n {report['n']}", ""]
    lines.append(f"{left('label')}  precision  recall      f1  support")
    for name, m in report["per_class"].items():
        lines.append(f"{left(name)}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}")
    lines += ["", "confusion (rows: true, columns: predicted)"]
    lines.append(" " * width + "  " + "  ".join(" " * (width - display_width(label)) + label for label in labels))
    for name, row in zip(labels, report["confusion"], strict=True):
        lines.append(f"{left(name)}  " + "  ".join(f"{v:>{width}d}" for v in row))
    return "\n".join(lines)


def plot_confusion(report: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Write the confusion matrix as a PNG heat map with counts in the cells."""
    from lmforge.plotting import note_missing_cjk, pyplot

    plt = pyplot()

    labels, matrix = report["labels"], report["confusion"]
    note_missing_cjk([str(label) for label in labels], Path(path).name)
    size = max(3.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((v for row in matrix for v in row), default=0)
    for r, row in enumerate(matrix):
        for c, v in enumerate(row):
            ax.text(c, r, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    ax.set_title(title or f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    fig.tight_layout()
    path = Path(path)
    try:
        with replacing(path) as tmp:  # a title wider than a small matrix is not cut off (bbox_inches)
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
