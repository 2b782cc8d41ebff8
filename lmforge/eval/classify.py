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


# classes up to which the printed report shows the confusion matrix, and confusion.png writes each cell's count (and
# grows 0.6 inch a class)
MAX_ANNOTATED = 30


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: per-class P/R/F1, then the confusion matrix (up to MAX_ANNOTATED classes: 150 printed
    150 lines of 1,650 characters, 250 kB no terminal shows as a table)."""
    labels = report["labels"]
    width = max(8, *(display_width(label) for label in labels))

    def left(text: str) -> str:  # padded by terminal columns: a Chinese character takes two
        return text + " " * (width - display_width(text))

    norm = f" | accuracy per label byte {report['accuracy_norm']:.4f}" if "accuracy_norm" in report else ""
    lines = [f"accuracy {report['accuracy']:.4f} | macro-F1 {report['macro_f1']:.4f}{norm} | n {report['n']}", ""]
    lines.append(f"{left('label')}  precision  recall      f1  support")
    for name, m in report["per_class"].items():
        lines.append(f"{left(name)}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}")
    if len(labels) > MAX_ANNOTATED:
        lines += [
            "",
            f"confusion matrix of {len(labels)} classes: too wide to print; it is 'confusion' in --json / eval.json",
        ]
        return "\n".join(lines)
    lines += ["", "confusion (rows: true, columns: predicted)"]
    lines.append(" " * width + "  " + "  ".join(" " * (width - display_width(label)) + label for label in labels))
    for name, row in zip(labels, report["confusion"], strict=True):
        lines.append(f"{left(name)}  " + "  ".join(f"{v:>{width}d}" for v in row))
    return "\n".join(lines)


def plot_confusion(report: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Write the confusion matrix as a PNG heat map with counts in the cells."""
    from lmforge.plotting import pyplot, use_cjk_font

    plt = pyplot()

    labels, matrix = report["labels"], report["confusion"]
    use_cjk_font([title, *(str(label) for label in labels)], Path(path).name)
    k = len(labels)
    # Up to MAX_ANNOTATED classes: 0.6 inch a class, a count in each cell. More (CLINC150's 150 intents): the figure
    # stops growing and the cells are colour only, with smaller class names. Drawn as before, 150 classes gave a
    # 92-inch figure with 22,500 counts: 192 s at the end of the fine-tune for a 3.3 MB PNG no one could read.
    size = max(3.0, 0.6 * min(k, MAX_ANNOTATED) + 2)
    fontsize = min(10.0, 0.8 * 72 * (size - 2) / max(k, 1))  # (points: a class's share of the axes, at most 10)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    if k > MAX_ANNOTATED:  # no counts in the cells: the colour scale says what a shade means
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    ax.set_xticks(range(k), labels, rotation=45 if k <= MAX_ANNOTATED else 90, ha="right", fontsize=fontsize)
    ax.set_yticks(range(k), labels, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((v for row in matrix for v in row), default=0)
    for r, row in enumerate(matrix if k <= MAX_ANNOTATED else []):
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
