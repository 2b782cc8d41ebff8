"""Quality filters and a script-based language guess, as pure functions on one document.

Applied by `prepare` after cleaning (see `clean.py`), in this order, each switched off by its
default and counted under its own name in `manifest.json["documents"]["removed"]`:

    normalize_whitespace   rewrite: runs of spaces/tabs -> one space, indents and trailing spaces cut, 3+ newlines -> 2
    remove_boilerplate     rewrite: drop short lines that are mostly a phrase like "All rights reserved" /
                           "版权所有" / "Accept cookies"; a document left empty is removed as "boilerplate"
    too_short / too_long   len(text) < min_chars / > max_chars (characters, after the rewrites)
    char_repetition        share of character 10-grams that repeat an earlier 10-gram  > max_char_repetition
    line_repetition        share of non-blank lines that repeat an earlier line          > max_line_repetition
    alpha_ratio            letters (any script: Latin, Han, kana, ...) / non-space chars < min_alpha_ratio
    language               guess_language(text) not in the --languages allow-list ("latin": all of fr, de, ... too)

Key design decisions:
- Ratios, not absolute counts, so one threshold works for a tweet and a book; the definitions follow
  Gopher's quality filters (Rae et al. 2021, https://arxiv.org/abs/2112.11446, table A1: duplicate
  line fraction 0.3, duplicate n-gram fractions) and BigScience ROOTS (character repetition, alphabetic
  ratio). Character n-grams rather than words, so Chinese (no spaces) is measured like English.
- `str.isalpha` is true for Han, kana and Hangul characters (Unicode category L*), so the alphabetic
  ratio treats Chinese text as letters, not as junk; combining marks (Mn/Mc, e.g. Devanagari and Thai
  vowel signs) count as letters too.
- Language guess by script, not a trained model: count letters per Unicode script in the first
  2,000 characters; Han counts x3 (one Han character carries about as much as a 3-4 letter word, so
  a Chinese sentence with a few English names stays "zh"); kana makes it "ja", Hangul "ko".
  Other scripts report the script ("cyrillic", "arabic", "greek", "devanagari"); no letters: "unknown".
- Latin-script text is "en" unless it holds more function words of French, German, Spanish, Italian,
  Portuguese or Dutch (short lists, none a frequent English word; French/Italian elisions such as l', qu'
  count too) than common English ones, or, with neither, accented letters. Otherwise the language whose
  function words (a word that k of the lists share counts 1/k) and distinctive letters (ß, ñ, ã/õ, ç,
  è...) score highest: "fr", "de", "es", "it", "pt", "nl"; "latin" when none scores. Short lines tie often (the
  languages share "tu", "il", "le", "un"): the tied languages' word endings then decide (`_ENDINGS`: -ait, -euse,
  -er for French against Italian...), if the text has a function word at all (a loanword's é alone decides
  nothing), else "latin". English "me" and "as" are French after je/tu/il/elle/ne ("je me sens", "tu as"), and a
  no-break space before ! ? : ; is French typography. Measured with bench/language_guess.py on Tatoeba's 76,037
  en-fr pairs: every English sentence stays "en"; French sentences are "fr" 96.1% (2.9% "latin", 0.9% "en"; 90.7%
  before the endings, 0% before the profiles), French runs of 5 sentences 99.9%; no English set is guessed "fr"
  more often than before, and SST-2 is 99.87% "en" (99.85% before: the "non-" prefix is no French "non"). English
  documents take the ASCII fast path as before: paragraphs and news as fast (~60-90k docs/s on one shared core),
  one-line sentences ~1 us slower (440k -> 300k docs/s); French sentences 126k -> 80k docs/s.
  A trained model (fastText lid.176) would tell more languages apart; it is not a dependency.
- `--languages latin` keeps every Latin-script language but English, the named ones included
  (`allowed_languages`), as it did when the guess named none of them.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from lmforge.data.clean import Normalization, clean_part, clean_text, length_verdict

LANGUAGES = (
    "zh",
    "en",
    "ja",
    "ko",
    "fr",
    "de",
    "es",
    "it",
    "pt",
    "nl",
    "latin",
    "cyrillic",
    "arabic",
    "greek",
    "devanagari",
    "other",
    "unknown",
)
REMOVAL_REASONS = ("too_long", "char_repetition", "line_repetition", "alpha_ratio", "boilerplate", "language")
# The `PrepareConfig` fields that `DocumentCleaner.from_settings` reads: how a prepared folder's text was cleaned.
CLEANING_SETTINGS = (
    "normalize", "normalize_whitespace", "boilerplate", "min_chars", "max_chars", "max_char_repetition",
    "max_line_repetition", "min_alpha_ratio", "languages",
)  # fmt: skip
CHAR_NGRAM = 10
GUESS_CHARS = 2000

_HSPACE = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_LINE_EDGE = re.compile(r" ?\n ?")  # (after _HSPACE: one space at most on each side)
_MANY_NEWLINES = re.compile(r"\n{3,}")
_NOT_LETTER_CHAR = re.compile(r"[\W\d_]")
_SPACES = re.compile(r"\s+")
# A boilerplate line is short and is mostly made of these phrases (navigation, legal, cookie and
# sharing chrome): they cover at least BOILERPLATE_MIN_SHARE of its word characters (letters, digits).
# A phrase alone is not enough: "they follow us with wings" or "I log in every morning and share
# this poem" are prose that happens to contain one.
_SOCIAL = r"(\s+(on|to)\s+(facebook|twitter|x|instagram|linkedin|youtube|tiktok|weibo|wechat|微博|微信))?"
_BOILERPLATE = re.compile(
    r"(all rights reserved|copyright ©|©\s*\d{4}|privacy policy|terms of (use|service)|cookie (policy|settings)|"
    r"(we )?use cookies|accept (all )?cookies|enable javascript|click here|read more\s*(»|›|>|\.\.\.)|"
    r"subscribe (now|to our)|sign up (now|for our)|\blog ?in\b|share (on|this)"
    + _SOCIAL
    + r"|follow us"
    + _SOCIAL
    + "|"
    r"版权所有|保留所有权利|未经(许可|授权|允许)[^，。]{0,6}(转载|复制)|隐私政策|使用条款|点击这里|点击查看|阅读全文|"
    r"关注我们|分享到|转载请注明(出处|来源)|(微信)?公众号|扫码关注|(扫描|长按识别)二维码|上一篇|下一篇|返回首页)",
    re.IGNORECASE,
)
BOILERPLATE_MAX_LINE = 120
BOILERPLATE_MIN_SHARE = 0.5
_WORD_CHAR = re.compile(r"[^\W_]")
_SCRIPTS = {
    "zh": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"),
    "ja": re.compile(r"[\u3040-\u30ff]"),
    "ko": re.compile(r"[\uac00-\ud7af\u1100-\u11ff]"),
    "latin": re.compile(r"[A-Za-z\u00c0-\u024f]"),
    "cyrillic": re.compile(r"[\u0400-\u04ff]"),
    "arabic": re.compile(r"[\u0600-\u06ff]"),
    "greek": re.compile(r"[\u0370-\u03ff]"),
    "devanagari": re.compile(r"[\u0900-\u097f]"),
}
_CJK_PUNCTUATION = re.compile(
    r"[\u3000-\u303f\uff01-\uff0f\uff1a-\uff1f\uff3b-\uff40\uff5b-\uff65]"
)  # 。，、！？「」...
# French typography: a no-break space (narrow or not) before ! ? : ; » or after «, as "Cours\u202f!" and
# "Vrai\u00a0?" are written; English puts none there (a plain space before "?" is tokenized text: not counted)
_FRENCH_SPACING = re.compile(r"[\u00a0\u202f][!?:;»]|«[\u00a0\u202f]")
# the prefix "non-" (English "non-perishable" as much as French "non-fumeur"): not the French or Italian word "non"
_NON_PREFIX = re.compile(r"\b[Nn]on-(?=\w)")
_ACCENTED = re.compile(r"[\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]")  # Latin letters beyond ASCII
_LATIN_WORD = re.compile(r"[a-z\u00df-\u00ff\u0100-\u024f]+")  # lower-case words, accented letters included
_ASCII_LETTER = re.compile(r"[A-Za-z]")
# Frequent English function words that are not also common words in other Latin-script languages
# (no "a", "in", "die", "on"...), so French or German text scores low.
_ENGLISH = frozenset(
    "the and of to is that it was for with you he his this are be not but have they from what which will "
    "would my your her she him we were been has had there their an by at or as me so all no do".split()
)

_ENGLISH_BYTES = frozenset(word.encode("ascii") for word in _ENGLISH)
# English words that are French ones after a French subject pronoun or "ne" ("je me sens", "tu as raison", "il ne me
# voit pas"), where English never puts them: not counted as English there
_FRENCH_AFTER = {"me": frozenset("je tu il elle ne".split()), "as": frozenset(["tu"])}
_FRENCH_AFTER_BYTES = {w.encode(): frozenset(p.encode() for p in before) for w, before in _FRENCH_AFTER.items()}


def _english_count(words: list[Any], english: frozenset[Any], french_after: Mapping[Any, frozenset[Any]]) -> int:
    """How many of `words` (str, or bytes on the ASCII path) are English function words, not counting one that
    is French by the word before it (`_FRENCH_AFTER`)."""
    n = sum(map(english.__contains__, words))
    if n and any(w in french_after for w in words):
        n -= sum(b in french_after and a in french_after[b] for a, b in zip(words[:-1], words[1:], strict=True))
    return n


# Frequent function words (and, for French and Italian, the pieces an apostrophe leaves: l', d', j', qu', n')
# of the Latin-script languages the guess names. None is a frequent English word ("a", "in", "on", "me", "no",
# "do", "was", "die", "come", "war" are left out), so English text scores (close to) 0 on all of them; words
# that two of these languages share ("de", "la", "que") count for each.
_LATIN_PROFILES = {
    "fr": "de la le les des et est une du que qui dans pour pas sur au aux il elle ils elles ne ce cette ces je tu "
    "nous vous suis es sommes êtes sont avons avez ont était être avoir fait très avec mais où sa ses ma mes "
    "leur se tout tous rien ça y en été cela ici là déjà aussi bien peut dit à non moi toi lui votre vos "
    "notre nos tes veux peux fais dois vais va faut pourquoi quel quelle quelque quelqu jamais "
    "maintenant beaucoup vraiment toujours encore avais avait ceci si puis peu chez donc alors sois soyez "
    "moins trop te un mon ton quand quoi comme merci voici voilà sais sait vas veut fut faire faites veuillez "
    "personne combien deux trois mieux tellement vite aujourd",
    "de": "der das und ist nicht ein eine einen einem einer zu mit sich von auf für dem des ich du sie es wir ihr "
    "sind bin bist habe haben wird werden auch noch nur wie aber oder wenn dass sehr schon kann mir mich dir "
    "dich uns ihm ihn nach bei aus um zum zur kein keine mein meine dein sein seine gibt nichts etwas hier "
    "jetzt immer nie danke bitte möchte ja doch mal",
    "es": "el la los las y es por con una para del lo que de en un se su sus más pero como muy está están estoy "
    "eres somos fue hay yo tú él ella nosotros usted te mi tu qué cuando donde este esta esto eso todo "
    "también porque sí tiene tengo hace le les sobre cómo nada algo aquí ahora siempre nunca mucho bien "
    "gracias hola quiero puedo estás tienes vas",
    "it": "il la le lo gli di da che non è e un una uno del della dei delle con su sono abbiamo sei siamo siete mi "
    "ti si ci ne questo questa quello ma anche più molto io tu lui lei noi voi loro mio mia suo sua nel nella "
    "alla dal dalla sul perché cosa essere stato fatto quando sempre ciao grazie voglio posso qui ora adesso "
    "tutto niente bene",
    "pt": "um uma de da dos das na nos nas é e que não para por pelo pela se mais mas como muito tu ele ela nós "
    "você vocês eles elas meu minha seu sua isso isto este esta está estão sou são foi tem tenho ao aos à há "
    "já também quando onde porque ser estar fazer obrigado aqui agora sempre nada tudo bem nunca quero posso "
    "estou",
    "nl": "de het een en van ik je niet dat te zijn op voor maar ook als aan om dan nog wel naar kan uit hij zij "
    "wij jij ze bij heb heeft hebben werd wordt zal zou mijn jouw hem haar geen nu meer heel dit deze wat hoe "
    "waar wie omdat niets iets hier altijd nooit dank alsjeblieft wil moet jullie",
}


# word -> the languages whose profile holds it
_PROFILE_OF: dict[str, tuple[str, ...]] = {}
for _language, _words in _LATIN_PROFILES.items():
    for _word in _words.split():
        _PROFILE_OF[_word] = (*_PROFILE_OF.get(_word, ()), _language)
# The words that count against English: one letter is too weak ("e" and "y" are "and" in Italian and Spanish,
# but also "Samuel L. Jackson", "for j in range(n)", "e.g.")
_EVIDENCE = frozenset(word for word in _PROFILE_OF if len(word) > 1)
_EVIDENCE_BYTES = frozenset(word.encode("utf-8") for word in _EVIDENCE)
# word -> (language, 1/k) for its k profiles: a word that k profiles share counts 1/k for each, so distinctive
# words weigh more ("je" is French and Dutch, "veux" French alone)
_WEIGHTS = {word: tuple((language, 1 / len(langs)) for language in langs) for word, langs in _PROFILE_OF.items()}
_WEIGHTS_BYTES = {word.encode("utf-8"): weights for word, weights in _WEIGHTS.items()}
# French elisions (j'ai, l'homme, qu'il, d'accord, n'est) and Italian ones (dell'anno, un'altra, l'uomo): the
# apostrophe splits them into one-letter words, and English has none at a word start ("don't", "I'm", "o'clock";
# SST-2's tokenized "does n't" is not one either)
_ELISION = re.compile(
    r"\b(?:(j|qu|d|n(?!['’]t\b)|m|t|s|jusqu|lorsqu|puisqu)|(l)|(dell|all|nell|dall|sull|un|quest|quell))['’](?=\w)",
    re.IGNORECASE,
)
# Letters (and Spanish's ¿ ¡) that point to one or a few of them: ß to German (ä ö ü half to German, half to
# "latin": Swedish, Finnish, Turkish, Hungarian and Estonian write them too), ñ to Spanish, ã/õ to Portuguese,
# è to French or Italian... A letter adds 1 split over its languages; with no function word to go by (a short
# sentence) the letters decide.
_LETTERS = {
    "ß": "de", "ä": "de latin", "ö": "de latin", "ü": "de latin", "ñ": "es", "¿": "es", "¡": "es", "ã": "pt", "õ": "pt",
    "ç": "fr pt", "è": "fr it", "ê": "fr pt", "à": "fr it pt", "ù": "fr it", "û": "fr", "î": "fr", "ï": "fr",
    "œ": "fr", "ë": "fr nl", "ô": "fr pt", "â": "fr pt", "ò": "it", "ì": "it", "á": "es pt", "í": "es pt",
    "ó": "es pt", "ú": "es pt", "é": "fr es it pt",
    # letters of none of them nor of English (Polish, Czech, Nordic, Turkish, Romanian, Hungarian, Baltic...): they
    # count for "latin", and against English ("Kocham cię, to jest ważne" was "en" by its "to")
    **dict.fromkeys("ąęłńśźżćőűåøæğşıčřšžěůďťňėįųșțăþðđ", "latin"),
}  # fmt: skip
_LETTER_WEIGHTS = {char: {lang: 1 / len(langs.split()) for lang in langs.split()} for char, langs in _LETTERS.items()}
_DISTINCT = re.compile("[" + "".join(_LETTERS) + "]")
_FOREIGN = frozenset(letter for letter, langs in _LETTERS.items() if langs == "latin")  # (ä ö ü: German's too)
LATIN_LANGUAGES = tuple(_LATIN_PROFILES)
# Word endings of each language's frequent inflections (French -ez/-ons/-ait verbs and -eau/-eux nouns, Spanish
# -ción/-amos, Italian -zione/-are, Portuguese -ção/-ões, German -ung/-lich, Dutch -heid/-ij...), split over the
# languages they are frequent in as letters are: they decide between languages that the function words and letters
# left tied (a short sentence: "Il laissa tomber." is French or Italian by "il", "Tu es paresseuse." French or
# Spanish by "tu es"; -er and -euse tell)
_ENDINGS = {
    "eau": "fr", "eaux": "fr", "aux": "fr", "eux": "fr", "oux": "fr", "oir": "fr", "ait": "fr", "ais": "fr pt",
    "aient": "fr", "ez": "fr es", "ons": "fr", "ont": "fr", "ille": "fr", "oi": "fr pt", "ois": "fr", "ou": "fr pt",
    "ourt": "fr", "ent": "fr nl de", "er": "fr es pt de nl", "ier": "fr", "ien": "fr", "iens": "fr",
    "ient": "fr", "iez": "fr", "que": "fr es pt", "ique": "fr", "é": "fr", "ée": "fr", "ées": "fr", "és": "fr es pt",
    "euse": "fr", "euses": "fr", "eur": "fr", "eurs": "fr", "ment": "fr", "ette": "fr", "elle": "fr", "ir": "fr es pt",
    "re": "fr es", "ai": "fr pt",
    "ción": "es", "dad": "es", "amos": "es pt", "emos": "es pt", "aba": "es", "ado": "es pt", "ido": "es pt it",
    "zione": "it", "are": "it", "ere": "it", "ire": "it fr", "ato": "it", "tto": "it", "gli": "it", "ggio": "it",
    "ção": "pt", "ões": "pt", "ão": "pt", "nho": "pt", "nha": "pt", "lho": "pt", "lha": "pt", "em": "pt",
    "ung": "de", "keit": "de", "heit": "de", "lich": "de", "isch": "de", "chen": "de", "cht": "de nl", "tz": "de",
    "heid": "nl", "ij": "nl", "lijk": "nl", "tje": "nl", "oen": "nl",
}  # fmt: skip
_ENDING_WEIGHTS = {end: {lang: 1 / len(langs.split()) for lang in langs.split()} for end, langs in _ENDINGS.items()}
_ENDING_LENGTHS = sorted({len(end) for end in _ENDINGS}, reverse=True)
# bytes table: A-Z -> a-z, a-z kept, every other byte -> space
_ASCII_WORDS = bytes(b if 97 <= b <= 122 else b + 32 if 65 <= b <= 90 else 32 for b in range(256))


def normalize_whitespace(text: str) -> str:
    """Collapse runs of horizontal whitespace (spaces, tabs, no-break and ideographic spaces) to one space, cut
    it at line starts and ends, keep at most one blank line.

    A line's indent goes whole, whatever it is made of: a Chinese paragraph's U+3000 "　　", a tab, spaces or
    no-break spaces, as the document's first line already lost its own to the strip. It was collapsed to one
    space, so each paragraph but the first started with a stray " " (code and verse indents are not kept
    either way: their runs of spaces collapse)."""
    text = _HSPACE.sub(" ", text)
    text = _LINE_EDGE.sub("\n", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def is_boilerplate_line(line: str) -> bool:
    """A short line that is (mostly) a boilerplate phrase: the phrases cover at least
    BOILERPLATE_MIN_SHARE of its letters and digits ("Copyright © 2024 Example Inc. All rights reserved")."""
    if len(line) > BOILERPLATE_MAX_LINE:
        return False
    matches = [m.group() for m in _BOILERPLATE.finditer(line)]
    if not matches:
        return False
    covered = sum(len(_WORD_CHAR.findall(m)) for m in matches)
    total = len(_WORD_CHAR.findall(line))
    return total == 0 or covered >= BOILERPLATE_MIN_SHARE * total


def remove_boilerplate(text: str) -> tuple[str, int]:
    """Drop short lines that are boilerplate phrases (`is_boilerplate_line`); return (text, lines removed)."""
    if not _BOILERPLATE.search(text):
        return text, 0
    kept, removed = [], 0
    for line in text.split("\n"):
        if is_boilerplate_line(line):
            removed += 1
        else:
            kept.append(line)
    return "\n".join(kept).strip(), removed


def char_repetition(text: str, n: int = CHAR_NGRAM) -> float:
    """Share of the character n-grams of `text` that repeat an earlier one (0 for texts shorter than n)."""
    total = len(text) - n + 1
    if total <= 1:
        return 0.0
    # repeats / total, not 1 - unique / total: 1 - 7/10 is 0.30000000000000004, so a document exactly at the
    # documented "above this" threshold (0.3) was removed
    return (total - len({text[i : i + n] for i in range(total)})) / total


def line_repetition(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line (0 for fewer than 2 lines)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)  # (as char_repetition: exact at the threshold)


def alpha_ratio(text: str) -> float:
    """Letters (any script) / non-whitespace characters; 0 for a text without visible characters."""
    letters, visible = _alpha_counts(text)
    return letters / visible if visible else 0.0


def _alpha_counts(text: str) -> tuple[int, int]:
    """(letters, non-whitespace characters) of `text`: sums over the parts of a text give the whole's."""
    visible = len(text) - sum(len(m) for m in _SPACES.findall(text))
    # Combining marks (Unicode Mn/Mc: Devanagari and Thai vowel signs, viramas) are \W to `re` but part
    # of the letter they sit on: counted with the letters, clean Hindi or Thai is not scored as junk.
    other = Counter(_NOT_LETTER_CHAR.findall(text))
    marks = sum(n for char, n in other.items() if unicodedata.category(char) in ("Mn", "Mc"))
    return len(text) - sum(other.values()) + marks, visible


def _english_or_other(english: int, other: int, accented: bool) -> bool:
    """Whether Latin-script text is English: unless it shows another language, by more of the profiles' function
    words than English ones, or (with neither) by accented letters. Short English without function words ("Good
    morning, Sir.", "Machine learning models require large datasets.") stays English."""
    if other > english:
        return False
    return bool(english) or not accented


def _elisions(text: str) -> list[tuple[str, str, str]]:
    return _ELISION.findall(text) if "'" in text or "’" in text else []


def _latin_language(
    words: list[Any], weights: Mapping[Any, tuple[tuple[str, float], ...]], letters: Iterable[str],
    elisions: list[tuple[str, str, str]], spacing: int = 0,
) -> str:  # fmt: skip
    """The profile language with the most function words (`words`, scored by `_WEIGHTS` or `_WEIGHTS_BYTES`) and
    elisions, plus letter points (`_LETTERS`) and French `spacing` points (`_FRENCH_SPACING`), or "latin" when none
    or two lead."""
    scores = dict.fromkeys((*LATIN_LANGUAGES, "latin"), 0.0)
    scores["fr"] += spacing
    for french, both, _ in elisions:
        for language in ("fr",) if french else ("fr", "it") if both else ("it",):
            scores[language] += 1
    for word in words:
        for language, weight in weights.get(word, ()):
            scores[language] += weight
    worded = any(scores.values())  # (function words, elisions or French spacing: not letters alone)
    for letter in letters:
        for language, weight in _LETTER_WEIGHTS[letter].items():
            scores[language] += weight
    first, second = sorted(scores.values(), reverse=True)[:2]
    if first == 0:
        return "latin"
    # tied: the word endings of the tied languages decide (`_ENDINGS`), else "latin"; not for letters alone (an
    # English phrase with a loanword, "a tiresome cliché", stays "latin" rather than be called French by its é),
    # nor where letters of none of the six tie ("latin": Polish, Swedish...)
    if first == second and worded and scores["latin"] < first:
        tied = dict.fromkeys((language for language, score in scores.items() if score == first), 0.0)
        for word in words:
            for language, weight in _ending(word.decode() if isinstance(word, bytes) else word).items():
                if language in tied:
                    tied[language] += weight
        first, second = sorted(tied.values(), reverse=True)[:2]
        return "latin" if first == second else max(tied, key=tied.__getitem__)
    return "latin" if first == second else max(scores, key=scores.__getitem__)


def _ending(word: str) -> dict[str, float]:
    """The language weights of the longest `_ENDINGS` entry that `word` ends with, leaving a stem of 2+ letters."""
    for n in _ENDING_LENGTHS:
        if len(word) >= n + 2 and word[-n:] in _ENDING_WEIGHTS:
            return _ENDING_WEIGHTS[word[-n:]]
    return {}


def guess_language(text: str) -> str:
    """A language code from `LANGUAGES`, guessed from the scripts of the first 2,000 characters."""
    sample = text[:GUESS_CHARS]
    if "on-" in sample:  # (a cheap test first: the regex only runs where it may match)
        sample = _NON_PREFIX.sub("", sample)
    if sample.isascii():  # O(1) in CPython; most English documents stop here (measured 6x faster)
        # the [a-z]+ words of sample.lower(), found by one bytes.translate + split (2x faster than the regex)
        words = sample.encode("ascii").translate(_ASCII_WORDS).split()
        if not words:
            return "unknown"
        english = _english_count(words, _ENGLISH_BYTES, _FRENCH_AFTER_BYTES)
        other = sum(map(_EVIDENCE_BYTES.__contains__, words))
        elisions = _elisions(sample) if other + sample.count("'") > english else []  # (_ELISION ignores case)
        if _english_or_other(english, other + len(elisions), accented=False):
            return "en"
        return _latin_language(words, _WEIGHTS_BYTES, (), elisions)
    counts = {script: len(pattern.findall(sample)) for script, pattern in _SCRIPTS.items()}
    if counts["ja"] and counts["ja"] * 4 >= counts["zh"]:  # kana alongside kanji: Japanese
        counts["ja"] += counts["zh"]
        counts["zh"] = 0
    if counts["zh"]:  # a Chinese character is about a word; its full-width punctuation is Chinese too
        counts["zh"] = (counts["zh"] + len(_CJK_PUNCTUATION.findall(sample))) * 3  # ("我用Twitter。": zh, not en)
    script, top = max(counts.items(), key=lambda item: item[1])
    if top == 0:
        return "other" if any(c.isalpha() for c in sample) else "unknown"
    if script != "latin":
        return script
    lowered = sample.lower()
    words = _LATIN_WORD.findall(lowered)
    english = _english_count(words, _ENGLISH, _FRENCH_AFTER)
    elisions = _elisions(lowered)
    letters = _DISTINCT.findall(lowered)
    foreign = sum(letter in _FOREIGN for letter in letters)
    spacing = len(_FRENCH_SPACING.findall(sample))
    other = sum(map(_EVIDENCE.__contains__, words)) + len(elisions) + foreign + spacing
    if _english_or_other(english, other, accented=_ACCENTED.search(lowered) is not None):
        return "en"
    return _latin_language(words, _WEIGHTS, letters, elisions, spacing)


def language_list(languages: str) -> list[str]:
    """A `--languages` value ("zh, EN") as its codes, split at commas, blanks dropped, lowercased (the codes
    of `LANGUAGES` are, and "ZH" was refused as unknown)."""
    return [lang.strip().lower() for lang in languages.split(",") if lang.strip()]


def allowed_languages(languages: str) -> frozenset[str]:
    """The guesses a `--languages` value keeps: its codes, with "latin" standing for every Latin-script language
    but English (the guess named none of them before fr, de, es, it, pt and nl were added, so a folder prepared
    with `--languages latin` kept them, and a manifest that records it cleans alike)."""
    codes = set(language_list(languages))
    if "latin" in codes:
        codes.update(LATIN_LANGUAGES)
    return frozenset(codes)


@dataclass(frozen=True)
class QualityFilters:
    """Thresholds of the removal filters (0 / empty = off); built by `DocumentCleaner.from_settings`."""

    max_chars: int = 0
    max_char_repetition: float = 0.0
    max_line_repetition: float = 0.0
    min_alpha_ratio: float = 0.0
    languages: frozenset[str] = frozenset()

    def reason(self, text: str, language: str, *, chars: int = -1, alpha: float | None = None) -> str | None:
        """The first filter that removes `text` (a name from `REMOVAL_REASONS`), or None to keep it. A streamed
        document (`DocumentCleaner.stream`) gives its length and letter ratio instead of its text (""): it
        has no repetition filter (`DocumentCleaner.streams`)."""
        if self.max_chars and (chars if chars >= 0 else len(text)) > self.max_chars:
            return "too_long"
        if self.max_char_repetition and char_repetition(text) > self.max_char_repetition:
            return "char_repetition"
        if self.max_line_repetition and line_repetition(text) > self.max_line_repetition:
            return "line_repetition"
        if self.min_alpha_ratio and (alpha_ratio(text) if alpha is None else alpha) < self.min_alpha_ratio:
            return "alpha_ratio"
        if self.languages and language not in self.languages:
            return "language"
        return None


class Processed(NamedTuple):
    """What `DocumentCleaner` made of one raw document (a tuple: cheap to send between processes)."""

    text: str
    reason: str | None  # removal reason ("empty", "too_short", a REMOVAL_REASONS name) or None = keep
    language: str
    raw_bytes: int
    invalid_utf8: int
    control_chars_removed: int
    normalized: bool
    whitespace_changed: bool
    boilerplate_lines: int


def utf8_len(text: str) -> int:
    """UTF-8 byte length of `text` without encoding ASCII (str.isascii is O(1) in CPython)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


@dataclass(frozen=True)
class DocumentCleaner:
    """Cleaning, rewrites and removal filters for one document, in the order of the module docstring.

    Picklable and stateless, so `prepare --workers N` can run it in worker processes on batches.
    """

    normalize: Normalization = "NFC"
    whitespace: bool = False
    boilerplate: bool = False
    min_chars: int = 1
    filters: QualityFilters = QualityFilters()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> DocumentCleaner:
        """The cleaner of `prepare`'s settings, named as `PrepareConfig`'s fields (a key missing: prepare's
        default). `prepare` builds its own from its config and `eval --task clm` from the config its manifest.json
        records (`datadir.cleaning_settings`), so text scored later is cleaned by this one mapping as the data was.
        """
        return cls(
            normalize=settings.get("normalize", "NFC"),
            whitespace=bool(settings.get("normalize_whitespace", False)),
            boilerplate=bool(settings.get("boilerplate", False)),
            min_chars=int(settings.get("min_chars", 1)),
            filters=QualityFilters(
                max_chars=int(settings.get("max_chars", 0)),
                max_char_repetition=float(settings.get("max_char_repetition", 0.0)),
                max_line_repetition=float(settings.get("max_line_repetition", 0.0)),
                min_alpha_ratio=float(settings.get("min_alpha_ratio", 0.0)),
                languages=allowed_languages(str(settings.get("languages") or "")),
            ),
        )

    def __call__(self, batch: list[tuple[str, int]]) -> list[Processed]:
        """Process a batch of (raw text, invalid UTF-8 count) pairs."""
        return [self.one(text, invalid) for text, invalid in batch]

    def streams(self) -> bool:
        """Whether `stream` cleans as `one` does: no rewrite or filter here needs a document's whole text."""
        f = self.filters
        return not (self.whitespace or self.boilerplate or f.max_char_repetition or f.max_line_repetition)

    def stream(self, parts: Iterable[tuple[str, int]], write: Callable[[str], None]) -> tuple[Processed, int]:
        """`one` for a document that comes as parts of raw text with their invalid UTF-8 counts
        (`ingest.LongDocument`), when `streams()`: the cleaned text goes to `write` a part at a time, never
        held whole; returns its `Processed` (with "" for the text) and its length in characters.

        Each part is cleaned on its own (`clean_part`: the parts' cuts are where that is exact), whitespace
        at the document's start is dropped and whitespace after a part is held back until more text
        follows, so the parts written join up to `one`'s text."""
        raw_bytes = invalid = removed = chars = letters = visible = 0
        normalized, started = False, False
        head, held = "", ""  # the first GUESS_CHARS characters (all the language guess reads); trailing space
        for raw, bad in parts:
            raw_bytes += utf8_len(raw)
            invalid += bad
            text, n, changed = clean_part(raw, self.normalize)
            removed += n
            normalized = normalized or changed
            if not started:
                text = text.lstrip()
                started = bool(text)
            text = held + text
            body = text.rstrip()
            held = text[len(body) :]
            if body:
                chars += len(body)
                head += body[: max(GUESS_CHARS - len(head), 0)]
                if self.filters.min_alpha_ratio:
                    a, v = _alpha_counts(body)
                    letters, visible = letters + a, visible + v
                write(body)
        reason: str | None = (
            "empty" if not chars else "too_short" if chars < self.min_chars else None
        )  # (length_verdict)
        language = guess_language(head) if chars else "unknown"
        if reason is None:
            alpha = letters / visible if visible else 0.0
            reason = self.filters.reason("", language, chars=chars, alpha=alpha)
        return Processed("", reason, language, raw_bytes, invalid, removed, normalized, False, 0), chars

    def one(self, raw: str, invalid_utf8: int = 0) -> Processed:
        """Process one raw document."""
        cleaned = clean_text(raw, self.normalize)
        text = cleaned.text
        changed = False
        if self.whitespace:
            new = normalize_whitespace(text)
            changed, text = new != text, new
        lines = 0
        if self.boilerplate:
            text, lines = remove_boilerplate(text)
        reason: str | None
        if lines and not text:
            reason = "boilerplate"
        else:
            verdict = length_verdict(text, self.min_chars)
            reason = None if verdict == "ok" else verdict
        language = guess_language(text) if text else "unknown"
        if reason is None:
            reason = self.filters.reason(text, language)
        return Processed(
            text,
            reason,
            language,
            utf8_len(raw),
            invalid_utf8,
            cleaned.control_chars_removed,
            cleaned.normalized,
            changed,
            lines,
        )
