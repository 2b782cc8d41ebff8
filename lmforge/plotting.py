"""matplotlib set-up shared by every chart lmforge draws (loss.png, `lmforge report`, confusion.png).

Headless (the Agg backend), and ready for the Chinese that run names, labels and class names often
hold. matplotlib's default font (DejaVu Sans) has no CJK glyphs, so such text drew as boxes with one
"Glyph ... missing from font" warning per character. `use_cjk_font(texts, chart)`, called before a
figure is made, does the one thing that fixes it without shipping a font: when `texts` hold CJK
characters it appends an installed CJK font (`CJK_FONTS`, Chinese ones first) to rcParams
`font.family`, after the default font. matplotlib (>= 3.6) then falls back glyph by glyph along that
list, so Latin text keeps its usual look and only the CJK characters come from the CJK font.

matplotlib lists fonts from a cache built on its first import, so a font installed afterwards (what
the note below tells a user to do) was never found: when the cache holds no CJK font, the system's
font files that the cache lacks are added before giving up (`findSystemFonts`, ~50 ms, paid only for
CJK text on a machine without such a font). With no CJK font at all the chart is still drawn, the
per-glyph warnings are silenced, and one stderr line per process says which font to install.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Hiragino Sans GB",
    "Heiti SC",
    "Droid Sans Fallback",
    "Noto Sans CJK TC",
    "Noto Sans CJK JP",
    "Noto Sans CJK KR",
    "Arial Unicode MS",
)
_searched = False
_cjk_font: str | None = None  # the installed CJK font, once searched for
_noted = False


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend, with missing-glyph warnings silenced (at each call: a caller's
    `warnings.catch_warnings()` drops the filter when it exits; adding it again replaces it, no duplicate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
    return plt


def has_cjk(text: str) -> bool:
    """Whether `text` holds CJK ideographs, kana, Hangul or full-width forms (what DejaVu Sans cannot draw)."""
    return any(
        "\u2e80" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af" or "\uff00" <= ch <= "\uffef" or ch >= "\U00020000"
        for ch in text
    )


def _installed_cjk_font() -> str | None:
    from matplotlib import font_manager

    manager = font_manager.fontManager
    installed = {f.name for f in manager.ttflist}
    if not any(name in installed for name in CJK_FONTS):  # maybe installed after matplotlib built its cache
        cached = {f.fname for f in manager.ttflist}
        for path in font_manager.findSystemFonts():
            if path not in cached:
                try:
                    manager.addfont(path)
                except Exception:  # a file FreeType cannot read: matplotlib's own cache build skips those too
                    continue
        installed = {f.name for f in manager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def use_cjk_font(texts: list[str], chart: str) -> None:
    """Before drawing `chart` with `texts` (run names, labels): when they hold CJK characters, add an installed CJK
    font as the fallback after the default font, or, with none installed, say once per process on stderr that
    they will show as boxes and which font to install. Call after `pyplot()` and before making the figure (a
    text takes its font family when it is created)."""
    global _searched, _cjk_font, _noted
    if not any(has_cjk(t) for t in texts):
        return
    import matplotlib

    if not _searched:
        _cjk_font, _searched = _installed_cjk_font(), True
    family = list(matplotlib.rcParams["font.family"])
    if _cjk_font is not None:
        if _cjk_font not in family:
            matplotlib.rcParams["font.family"] = [*family, _cjk_font]
        return
    if _noted:
        return
    _noted = True
    print(
        f"note: no CJK font is installed, so the Chinese/Japanese/Korean text in {chart} shows as boxes; "
        "install one (e.g. apt install fonts-noto-cjk, or fonts-wqy-microhei) and re-run",
        file=sys.stderr,
        flush=True,
    )
