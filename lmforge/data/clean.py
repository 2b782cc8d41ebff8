"""Text cleaning as pure functions: UTF-8 decoding with counts, newlines, control characters,
Unicode normalization, length filter, binary-file sniffing.

Order applied to every document (`clean_text`):
1. Newlines: "\\r\\n", lone "\\r" and the other line breaks - vertical tab, form feed, NEL (U+0085),
   LINE SEPARATOR (U+2028) and PARAGRAPH SEPARATOR (U+2029) - become "\\n" (not counted as removed
   characters): deleting them joined words ("foo\\x0cbar" became "foobar").
2. Control characters: Unicode category Cc except "\\n" and "\\t" are removed and counted
   (NUL, ESC, DEL, C1 controls, ...), and so is U+FEFF, the byte-order mark: inside text it is what
   `cat a.txt b.txt` of files a Windows editor saved leaves where b.txt starts (its use as a zero-width
   no-break space is deprecated since Unicode 3.2, for U+2060), and a paragraph that kept it was no exact
   duplicate of its copy without it. Other format characters (Cf: zero-width joiner in emoji, bidi
   marks) are kept, since they are part of real text.
3. Unicode normalization (NFC by default, NFKC or none); documents it changed are counted.
4. Strip leading/trailing whitespace.

Key design decisions:
- Bytes are decoded with errors="replace" rather than rejected: one bad byte in a large scraped
  file should not stop a run. `decode_utf8` counts only the U+FFFD characters the decoder
  introduced, not ones already present (encoded as EF BF BD) in the input.
- Lone surrogates (possible in JSON strings, e.g. "\\ud800") cannot be encoded as UTF-8; they are
  replaced by U+FFFD and counted as invalid UTF-8 too, but not toward `check_encoding`'s refusal: the file's
  bytes are valid UTF-8, so they are no sign of another encoding (`RawDocument.surrogates`).
- Everything here is a pure function on one document; counting across documents is the caller's job
  (`CleanStats.add`), so the functions are trivial to test.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from lmforge.errors import DataError

REPLACEMENT = "\ufffd"
_REPLACEMENT_BYTES = REPLACEMENT.encode("utf-8")
# Category Cc is exactly U+0000-U+001F and U+007F-U+009F; keep \t (09) and \n (0A).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")  # (+ U+FEFF, the BOM: step 2 above)
# Line breaks other than \n and \r (step 1): VT, FF, NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR.
_LINE_BREAK = re.compile("[\x0b\x0c\x85\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
BINARY_SNIFF_BYTES = 8192
# `check_encoding`'s default share (prepare's --max-invalid-utf8): one bad byte in a large scraped file passes
MAX_INVALID_UTF8 = 0.001
Normalization = Literal["NFC", "NFKC", "none"]


@dataclass
class CleanStats:
    """Counters reported under "cleaning" in manifest.json."""

    invalid_utf8_replaced: int = 0
    documents_with_invalid_utf8: int = 0
    control_chars_removed: int = 0
    normalized_documents: int = 0
    whitespace_normalized_documents: int = 0
    boilerplate_lines_removed: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Cleaned:
    """One cleaned document and what cleaning did to it."""

    text: str
    control_chars_removed: int
    normalized: bool


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing invalid sequences with U+FFFD.

    Returns:
        (text, number of U+FFFD introduced by decoding; U+FFFD already in the input is not counted).
    """
    text = data.decode("utf-8", errors="replace")
    if REPLACEMENT not in text:
        return text, 0
    # A valid EF BF BD always decodes to U+FFFD (EF is never a continuation byte), so the difference
    # is exactly the number of replacements the decoder made.
    return text, text.count(REPLACEMENT) - data.count(_REPLACEMENT_BYTES)


def json_line(line: str) -> str:
    """A JSON Lines line without the U+FEFF (BOM) it may start with, for `json.loads` (which refuses it: "Unexpected
    UTF-8 BOM"). Every line, not only a file's first: `cat a.jsonl b.jsonl` of files a Windows editor saved carries
    b.jsonl's BOM to the start of a line in the middle. Used by `prepare`'s and `finetune`'s JSONL readers alike."""
    return line.removeprefix("\ufeff")


def check_encoding(path: Path, invalid: int, chars: int, limit: float, *, flag: bool = True) -> None:
    """Refuse a file whose invalid UTF-8 sequences (`decode_utf8`'s count) are over `limit` of its `chars` and
    over 16: it is not UTF-8 or mixes encodings. `flag`: name `--max-invalid-utf8` (prepare's) as the way out."""
    if limit < 1 and invalid > 16 and invalid > limit * chars:
        raise DataError(
            f"{path}: {invalid} invalid UTF-8 sequences in {chars} characters: the file is not UTF-8 or mixes "
            "encodings; convert it with iconv -f ENCODING -t UTF-8 (GB18030 for Chinese, CP1252 or LATIN1 for "
            "Western European text)" + (" or pass --max-invalid-utf8 1 to replace them" if flag else "")
        )


def replace_surrogates(text: str) -> tuple[str, int]:
    """Replace lone surrogate code points (unencodable in UTF-8) with U+FFFD; return (text, count)."""
    return _SURROGATE.subn(REPLACEMENT, text)


def clean_text(text: str, normalize: Normalization = "NFC") -> Cleaned:
    """Normalize newlines (every line break becomes "\\n"), drop control characters, apply Unicode
    normalization, strip.

    Args:
        text: decoded document text.
        normalize: Unicode normalization form, or "none".

    Returns:
        `Cleaned` with the new text, the number of control characters removed and whether the
        normalization changed the text.
    """
    text, removed, normalized = clean_part(text, normalize)
    return Cleaned(text=text.strip(), control_chars_removed=removed, normalized=normalized)


def clean_part(text: str, normalize: Normalization = "NFC") -> tuple[str, int, bool]:
    """`clean_text` without the strip: (text, control characters removed, changed by the normalization).

    Of a document cut into parts where `ingest.LongDocument` cuts it (after a line end, or before a printable
    ASCII character or a CJK ideograph, which no step here removes, changes or composes with what precedes it),
    the cleaned parts join up to the cleaned document (before its strip)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _LINE_BREAK.sub("\n", text)
    text, removed = _CONTROL.subn("", text)
    normalized = False
    # ASCII text is in every normal form (str.isascii is O(1)): skip the scan
    if normalize != "none" and not text.isascii() and not unicodedata.is_normalized(normalize, text):
        text = unicodedata.normalize(normalize, text)
        normalized = True
    return text, removed, normalized


def length_verdict(text: str, min_chars: int) -> Literal["ok", "empty", "too_short"]:
    """Classify a stripped text: "empty" (""), "too_short" (0 < len < min_chars) or "ok"."""
    if not text:
        return "empty"
    return "too_short" if len(text) < min_chars else "ok"


# Chinese (simplified, traditional), Japanese, Korean; spelled as both Python's codecs and iconv know them
# (glibc's iconv has no "EUC_KR")
LEGACY_ENCODINGS = ("GB18030", "BIG5", "SHIFT_JIS", "EUC-KR")
# Python's "big5" codec is the bare 1984 table; Big5 files (and iconv's BIG5) also hold the ETEN extension
# (F9D6-F9FE: 裏 碁 銹 墻 恒 ... and box drawing), which Windows' CP950 has. A traditional text with one 裏 in
# its head failed to decode as "big5" and was named GB18030, whose iconv command made mojibake.
_DECODER = {"BIG5": "cp950"}
# Windows' supersets of Shift-JIS and EUC-KR (NEC/IBM rows: ①, Ⅱ, 髙; the 8,822 extra Hangul syllables: 똠, 햏),
# which Python's strict codecs and iconv's SHIFT_JIS/EUC-KR refuse or garble: a file that only they read is
# named by them, so the iconv advice converts it (iconv -f CP932 / CP949)
_WINDOWS = {"SHIFT_JIS": "CP932", "EUC-KR": "CP949"}


# What text in each legacy encoding mostly holds beyond ASCII: CJK ideographs, CJK and full-width
# punctuation, plus kana (Japanese). (EUC-KR is decided apart: `_reads_as_korean`.)
_CJK = ((0x4E00, 0x9FFF), (0x3000, 0x303F), (0xFF00, 0xFFEF))
_EXPECTED = {
    "GB18030": _CJK,  # (scored by GB2312 membership instead: `_expected`)
    "BIG5": _CJK,
    "SHIFT_JIS": (*_CJK, (0x3040, 0x30FF)),
}
# Korean when its EUC-KR reading has this many Hangul syllables, and they are this share of its letters
_KOREAN_MIN_SYLLABLES = 12
_KOREAN_MIN_SHARE = 0.95


def legacy_encoding(head: bytes) -> str | None:
    """The one of `LEGACY_ENCODINGS` under which `head` reads most like CJK text, or None: a file
    `looks_binary` flags may be CJK text in a pre-UTF-8 encoding.

    Decoding without an error is not enough: GB18030 accepts nearly any byte pairs, so Big5 text
    decodes under it too, as rare ideographs and kana. EUC-KR when `_reads_as_korean`; otherwise each
    other encoding that decodes `head` (a character cut at the end is fine) is scored by the share of
    its non-ASCII characters in the ranges its text holds; the best wins, the first in
    `LEGACY_ENCODINGS` on a tie."""
    if b"\x00" in head:
        return None
    for korean in ("EUC-KR", "CP949"):
        if _reads_as_korean(head, korean):
            return korean
    best, best_score = None, -1.0
    for encoding in LEGACY_ENCODINGS:
        if encoding == "EUC-KR":
            continue
        name, text = encoding, _decoded(head, _DECODER.get(encoding, encoding))
        if text is None and encoding in _WINDOWS:
            name, text = _WINDOWS[encoding], _decoded(head, _WINDOWS[encoding])
        if text is None:
            continue
        wide = [c for c in text if ord(c) > 0x7F]
        expected = sum(_expected(encoding, c) for c in wide)
        score = expected / len(wide) if wide else 0.0
        if score > best_score:
            best, best_score = name, score
    return best


def _reads_as_korean(head: bytes, encoding: str = "EUC-KR") -> bool:
    """Whether `head` is Korean in EUC-KR (or CP949): its reading has at least `_KOREAN_MIN_SYLLABLES`
    Hangul syllables of EUC-KR's 2,350 (the common ones), `_KOREAN_MIN_SHARE` of its letters (Hangul and
    ideographs). CP949's 8,822 extra syllables do not count: Korean has a few of them (똠), while Shift-JIS
    read as CP949 is mostly them (its lead bytes 81-9F are CP949's extension rows).

    Which characters occur cannot tell EUC-KR from GB18030: both are 2-byte EUC, and GB18030 reads each
    Korean syllable as a common GB2312 ideograph. The reverse differs: simplified Chinese read as EUC-KR
    (when it decodes at all) gives Hangul only for the ideographs in GB2312's rows B0-C8 (pinyin a to
    san; 54% of those in Hong Lou Meng's chapter 1) and Hanja for the rest, so 12 Hangul in a row is
    about 1 in 1,600. Korean with up to 5% Hanja still counts; one under 12 syllables is named GB18030."""
    text = _decoded(head, encoding)
    if text is None:
        return False
    letters = [c for c in text if ord(c) > 0x7F and unicodedata.category(c) == "Lo"]
    syllables = sum("\uac00" <= c <= "\ud7a3" and _in_euc_kr(c) for c in letters)
    return syllables >= _KOREAN_MIN_SYLLABLES and syllables >= _KOREAN_MIN_SHARE * len(letters)


def _in_euc_kr(c: str) -> bool:
    """One of EUC-KR's own characters: 2 bytes (Python's codec writes any other syllable as an 8-byte jamo
    sequence, KS X 1001's annex)."""
    try:
        return len(c.encode("euc_kr")) == 2
    except UnicodeEncodeError:
        return False


def _expected(encoding: str, c: str) -> bool:
    """Whether text in `encoding` commonly holds `c`. For GB18030 that is GB2312's 7,445 characters (what
    simplified Chinese is written with), not every ideograph: Japanese Shift-JIS read as GB18030 turns
    its kana into rare GBK ideographs, which tied with Shift-JIS and won as the first encoding."""
    if encoding == "GB18030":
        try:
            c.encode("gb2312")
        except UnicodeEncodeError:
            return False
        return True
    return any(lo <= ord(c) <= hi for lo, hi in _EXPECTED[encoding])


def utf16_encoding(head: bytes) -> str | None:
    """ "UTF-16" for UTF-16 text (a byte-order mark, or a NUL in every other byte of mostly-ASCII text,
    little- or big-endian), else None: the NULs make `looks_binary` flag it, but it is text to convert."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) and not head.startswith(b"\xff\xfe\x00\x00"):  # not UTF-32
        return "UTF-16"
    sample = head[: len(head) & ~1][:4096]
    if len(sample) >= 16:
        even, odd = sample[0::2], sample[1::2]
        for zeros, chars, name in ((odd, even, "UTF-16LE"), (even, odd, "UTF-16BE")):
            if zeros.count(0) > 0.9 * len(zeros) and chars.count(0) < 0.1 * len(chars):
                return name  # no byte-order mark: iconv needs the byte order
        # Chinese/Japanese text has few NULs: 90% of its code units are CJK, CJK punctuation, fullwidth
        # forms or ASCII text characters, where random binary data has about a third. Not UTF-8 text with a
        # stray NUL, though: two ASCII letters read as one UTF-16 unit are a CJK ideograph (b"te" is U+6574),
        # so plain English passed this test, and the iconv advice turned it into Chinese mojibake
        if _decoded(sample, "utf-8") is not None:
            return None
        for name in ("UTF-16LE", "UTF-16BE"):
            text = sample.decode(name.lower(), errors="replace")
            if sum(_likely_utf16_char(c) for c in text) > 0.9 * len(text):
                return name
    return None


def _decoded(data: bytes, encoding: str) -> str | None:
    """`data` read as `encoding` (a character cut at its end allowed: a file's first bytes), or None when it does
    not decode. (Real UTF-16 CJK text never decodes as UTF-8.)"""
    try:
        return codecs.getincrementaldecoder(encoding)().decode(data, final=False)
    except UnicodeDecodeError:
        return None


def _likely_utf16_char(c: str) -> bool:
    return (
        "\u4e00" <= c <= "\u9fff"
        or "\u3000" <= c <= "\u30ff"
        or "\uff00" <= c <= "\uffef"
        or " " <= c <= "~"
        or c in "\n\r\t"
    )


def looks_binary(head: bytes) -> bool:
    """Guess from the first bytes of a file whether it is binary rather than (UTF-8-ish) text.

    Binary if NUL bytes are more than 1% of them (and more than 2): UTF-16 and every common binary format
    have them by the dozen; or if more than 30% of the characters fail to decode as UTF-8 (Latin-1 text with
    a few accents passes and gets its bad bytes replaced and counted; compressed or image data does not).
    A stray NUL or two in text (scraped pages have them) is a control character like the others: cleaning
    deletes and counts it, as it did past these first bytes (a single NUL here made the file "binary").
    """
    head = head[:BINARY_SNIFF_BYTES]
    if not head:
        return False
    if head.count(0) > max(2, len(head) / 100):
        return True
    # Incremental decode without final=True: a multi-byte character cut at the sniff boundary is fine.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    if not text:
        return False
    bad = text.count(REPLACEMENT) - head.count(_REPLACEMENT_BYTES)
    return bad > 0.3 * len(text)
