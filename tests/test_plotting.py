"""Chinese text in lmforge's charts: drawn with an installed CJK font as the fallback after the default font, or,
with none installed, still drawn, with one stderr line saying which font to install (not one warning per glyph)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import lmforge.plotting as plotting
from lmforge.eval.classify import classification_report, plot_confusion


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that has not searched for a CJK font, set the font family or said the note yet."""
    import matplotlib

    monkeypatch.setattr(plotting, "_searched", False)
    monkeypatch.setattr(plotting, "_cjk_font", None)
    monkeypatch.setattr(plotting, "_noted", False)
    monkeypatch.setitem(matplotlib.rcParams, "font.family", ["sans-serif"])


def _glyph_warnings(draw) -> list[str]:
    """The "Glyph ... missing from font" warnings `draw()` lets through the filters in force."""
    with warnings.catch_warnings(record=True) as caught:
        draw()
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def _report() -> dict:
    return classification_report([0, 1, 1, 0], [0, 1, 0, 0], ["正面", "负面"])


def test_chinese_labels_draw_with_an_installed_cjk_font(fresh, tmp_path: Path, capsys: pytest.CaptureFixture):
    """Needs a CJK font (e.g. apt install fonts-wqy-microhei); the matplotlib font cache may predate it."""
    import matplotlib

    if plotting._installed_cjk_font() is None:
        pytest.skip("no CJK font installed (apt install fonts-wqy-microhei)")
    plotting.pyplot()
    warnings.simplefilter("always")  # every glyph warning visible, past the module's filter
    assert _glyph_warnings(lambda: plot_confusion(_report(), tmp_path / "c.png", title="情感")) == []
    family = matplotlib.rcParams["font.family"]
    assert family[0] == "sans-serif" and family[-1] in plotting.CJK_FONTS  # a fallback after the default font
    assert "no CJK font" not in capsys.readouterr().err


def test_latin_text_leaves_the_fonts_alone(fresh, tmp_path: Path):
    import matplotlib

    report = classification_report([0, 1, 1, 0], [0, 1, 0, 0], ["pos", "neg"])
    plot_confusion(report, tmp_path / "c.png")
    assert matplotlib.rcParams["font.family"] == ["sans-serif"] and not plotting._searched


def test_without_a_cjk_font_one_line_says_which_to_install(
    fresh, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(plotting, "CJK_FONTS", ("No Such CJK Font",))
    for name in ("c.png", "d.png"):  # boxes, but no warning per glyph
        assert _glyph_warnings(lambda n=name: plot_confusion(_report(), tmp_path / n)) == []
    err = capsys.readouterr().err
    assert err.count("no CJK font is installed") == 1 and "apt install fonts-noto-cjk" in err
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "d.png").stat().st_size > 1000
