"""matplotlib set-up shared by every chart lmforge draws (loss.png, `lmforge report`, confusion.png).

Headless (the Agg backend), and ready for the Chinese that run names, labels and class names often
hold: CJK fonts found on the machine go first in the sans-serif list (matplotlib falls back glyph by
glyph along it), and the "Glyph ... missing from font" warnings are silenced, since a machine
without a CJK font can only draw boxes and one warning per character helps nobody.
"""

from __future__ import annotations

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
        plt.rcParams["font.sans-serif"] = [*cjk, *plt.rcParams["font.sans-serif"]]
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        _ready = True
    return plt
