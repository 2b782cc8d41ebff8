"""matplotlib set-up shared by every chart lmforge draws (loss.png, `lmforge report`, confusion.png).

Headless (the Agg backend), and ready for the Chinese that run names, labels and class names often
hold: CJK fonts found on the machine go first in the sans-serif list (matplotlib falls back glyph by
glyph along it), and the "Glyph ... missing from font" warnings are silenced, since a machine
without a CJK font can only draw boxes and one warning per character helps nobody; `note_missing_cjk`
says so once instead, where a chart holds CJK text.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Hiragino Sans GB",
    "Arial Unicode MS",
)
_ready = False
_have_cjk = False
_noted = False


def pyplot() -> Any:
    """`matplotlib.pyplot`, set up as the module docstring says (once per process)."""
    global _ready
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not _ready:
        from matplotlib import font_manager

        installed = {f.name for f in font_manager.fontManager.ttflist}
        cjk = [name for name in CJK_FONTS if name in installed]
        global _have_cjk
        _have_cjk = bool(cjk)
        plt.rcParams["font.sans-serif"] = [*cjk, *plt.rcParams["font.sans-serif"]]
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        _ready = True
    return plt


def note_missing_cjk(texts: list[str], chart: str) -> None:
    """One stderr note per process when `texts` (drawn on `chart`) hold CJK characters and no CJK font is
    installed: they will show as boxes. Call after `pyplot()`."""
    global _noted
    if (
        _have_cjk
        or _noted
        or not any("\u2e80" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af" for t in texts for ch in t)
    ):
        return
    _noted = True
    print(
        f"note: no CJK font is installed, so the Chinese/Japanese/Korean text in {chart} shows as boxes; "
        "install one (e.g. apt install fonts-noto-cjk) and re-run",
        file=sys.stderr,
        flush=True,
    )
