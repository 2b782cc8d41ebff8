"""A fast tokenizer built from an HF directory's "slow" tokenizer files, for `lmforge import` of folders
that have no tokenizer.json (older GPT-2 fine-tunes and BERT models ship only the files transformers'
Python tokenizers read).

`read_slow_tokenizer(hf_dir)` builds the `tokenizers.Tokenizer` that transformers' converters
(`convert_slow_tokenizer.GPT2Converter` / `BertConverter`, what `GPT2TokenizerFast` and
`BertTokenizerFast` run on such a folder) build, without importing transformers:

- GPT-2 byte-level BPE, `vocab.json` (token -> id) + `merges.txt` (one "a b" merge a line, ranked by line;
  a first "#version" line is skipped): BPE model, ByteLevel pre-tokenizer (tokenizer_config.json
  `add_prefix_space`, default False), ByteLevel decoder, ByteLevel post-processor with trim_offsets=False
  (GPT-2's own tokenizer.json), or `<bos> $A` when tokenizer_config.json sets `add_bos_token`.
- BERT WordPiece, `vocab.txt` (one token a line, id = line number): BertNormalizer (clean_text; CJK
  characters split, `tokenize_chinese_chars`, default True; lower case per `do_lower_case`, default True;
  accents stripped per `strip_accents`, default: as lower case), BertPreTokenizer, WordPiece with the unk
  token and "##", the WordPiece decoder, and the `[CLS] $A [SEP]` / `[CLS] $A [SEP] $B [SEP]` template.

Added tokens: `added_tokens.json` (token -> id) and tokenizer_config.json `added_tokens_decoder` (id ->
{"content", "special", ...}, transformers >= 4.34) at their ids, then the tokens named in
special_tokens_map.json and tokenizer_config.json (`bos_token`, `eos_token`, `unk_token`, `sep_token`,
`pad_token`, `cls_token`, `mask_token`, `additional_special_tokens`; each a string or {"content": ...}),
all special except those `added_tokens_decoder` marks otherwise. A token already in the vocabulary keeps
its id (GPT-2's `<|endoftext|>` = 50256); a new one is appended, as transformers does. The class defaults
that no file names (GPT-2's `<|endoftext|>`, BERT's [UNK]/[SEP]/[PAD]/[CLS]/[MASK]) count only when the
vocabulary has them: appending an unnamed default would give the tokenizer an id the model never had.

`tokenizers` numbers new tokens on from the largest id, so ids must be 0..N-1, each once, and added ones
follow in order; files that break this (or merges naming tokens the vocabulary lacks) are refused in one
line rather than giving ids that silently differ from transformers'. A sentencepiece `tokenizer.model`
(Llama) needs the sentencepiece library and protobuf to read, so it is refused with how to save the fast
tokenizer instead; so is a slow tokenizer class other than GPT-2's or BERT's (RoBERTa, Qwen2, CLIP ship
the same file names but tokenize differently).

Reference: https://github.com/huggingface/transformers/blob/main/src/transformers/convert_slow_tokenizer.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from lmforge.checkpoint import read_json
from lmforge.errors import CheckpointError
from lmforge.tokenizer.tokenizer import Tokenizer

SAVE_FAST = "save the fast tokenizer there (AutoTokenizer.from_pretrained(...).save_pretrained(dir)) and retry"
# tokenizer_config.json keys naming special tokens, in transformers' SPECIAL_TOKENS_ATTRIBUTES order
# (the order appended tokens get their ids in)
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GPT2_CLASSES = ("GPT2Tokenizer", "GPT2TokenizerFast")
# DistilBERT's and ELECTRA's tokenizers are BERT's under another name
BERT_CLASSES = tuple(f"{name}Tokenizer{fast}" for name in ("Bert", "DistilBert", "Electra") for fast in ("", "Fast"))
BERT_DEFAULTS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
GPT2_DEFAULTS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def read_slow_tokenizer(hf_dir: Path) -> tuple[Tokenizer, Path]:
    """The fast tokenizer for an HF directory without tokenizer.json (module docstring), and the vocabulary
    file it came from (for messages).

    Raises:
        CheckpointError: no convertible files (a sentencepiece model only, another tokenizer class, none at
            all), or damaged ones; the message says what to do.
    """
    config_path = hf_dir / "tokenizer_config.json"
    config = _optional_json(config_path)
    tokenizer_class = config.get("tokenizer_class")
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        kind, known = "GPT-2", GPT2_CLASSES
    elif (hf_dir / "vocab.txt").is_file():
        kind, known = "BERT", BERT_CLASSES
    elif (hf_dir / "tokenizer.model").is_file():
        raise CheckpointError(
            f"{hf_dir} has no tokenizer.json, only a sentencepiece tokenizer.model, which lmforge does not read; "
            + SAVE_FAST
        )
    else:
        raise CheckpointError(
            f"{hf_dir} has no tokenizer.json (nor GPT-2's vocab.json + merges.txt, nor BERT's vocab.txt); " + SAVE_FAST
        )
    if isinstance(tokenizer_class, str) and tokenizer_class not in known:
        raise CheckpointError(
            f"{hf_dir} has no tokenizer.json, and lmforge converts only GPT-2's and BERT's slow tokenizer files, "
            f"not {tokenizer_class}'s ({config_path}); " + SAVE_FAST
        )
    if kind == "GPT-2":
        return _byte_level_bpe(hf_dir, config), hf_dir / "vocab.json"
    return _wordpiece(hf_dir, config), hf_dir / "vocab.txt"


def _byte_level_bpe(hf_dir: Path, config: dict[str, Any]) -> Tokenizer:
    vocab_path, merges_path = hf_dir / "vocab.json", hf_dir / "merges.txt"
    vocab = read_json(vocab_path, SAVE_FAST)
    if not isinstance(vocab, dict) or not vocab or not all(isinstance(k, str) and _is_id(v) for k, v in vocab.items()):
        raise CheckpointError(
            f"{vocab_path} is not a non-empty JSON object of token strings to integer ids, as GPT-2's is; " + SAVE_FAST
        )
    _check_ids(vocab, vocab_path)
    merges = []
    for number, line in enumerate(_lines(merges_path), start=1):
        if (number == 1 and line.startswith("#version")) or not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise CheckpointError(
                f"{merges_path} line {number} is not two tokens separated by one space ({line!r}); " + SAVE_FAST
            )
        absent = next((t for t in (*pair, "".join(pair)) if t not in vocab), None)
        if absent is not None:
            raise CheckpointError(
                f"{merges_path} line {number} ({line!r}) needs {absent!r}, which {vocab_path.name} lacks: the two "
                "files come from different tokenizers; " + SAVE_FAST
            )
        merges.append((pair[0], pair[1]))
    # GPT2Converter's model: no dropout, no unk (every byte has a token), no prefixes or suffixes
    hf = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=config.get("add_prefix_space") is True)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    names, tokens = _added_tokens(hf_dir, config, vocab, GPT2_DEFAULTS)
    _register(hf, tokens, hf_dir)
    if config.get("add_bos_token") is True:  # GPT2Converter: the bos token before every text
        bos, bos_id = _id_of(hf, names, "bos_token", hf_dir)
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, bos_id)]
        )
    return Tokenizer(hf)


def _wordpiece(hf_dir: Path, config: dict[str, Any]) -> Tokenizer:
    vocab_path = hf_dir / "vocab.txt"
    lines = _lines(vocab_path)
    if not lines:
        raise CheckpointError(f"{vocab_path} is empty; a BERT vocab.txt holds one token a line; " + SAVE_FAST)
    vocab: dict[str, int] = {}
    for number, token in enumerate(lines):
        if token in vocab:  # transformers would keep the later line, leaving a gap in the ids
            raise CheckpointError(
                f"{vocab_path} line {number + 1} repeats {token!r} (line {vocab[token] + 1}); each token "
                "must appear once; " + SAVE_FAST
            )
        vocab[token] = number
    names, tokens = _added_tokens(hf_dir, config, vocab, BERT_DEFAULTS)
    unk = names.get("unk_token", BERT_DEFAULTS["unk_token"])
    if unk not in vocab:  # WordPiece looks it up in its own vocabulary, not among added tokens
        raise CheckpointError(f"{vocab_path} has no unknown token {unk!r}, which WordPiece needs; " + SAVE_FAST)
    hf = tokenizers.Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk, continuing_subword_prefix="##"))
    strip_accents = config.get("strip_accents")
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=config.get("tokenize_chinese_chars") is not False,
        strip_accents=strip_accents if isinstance(strip_accents, bool) else None,  # None: as lowercase
        lowercase=config.get("do_lower_case") is not False,
    )
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    _register(hf, tokens, hf_dir)
    (cls, cls_id), (sep, sep_id) = _id_of(hf, names, "cls_token", hf_dir), _id_of(hf, names, "sep_token", hf_dir)
    hf.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)],
    )
    return Tokenizer(hf)


def _added_tokens(
    hf_dir: Path, config: dict[str, Any], vocab: dict[str, int], defaults: dict[str, str]
) -> tuple[dict[str, str], list[tuple[int | None, AddedToken]]]:
    """The special-token names (`eos_token` -> "<|endoftext|>", ...) and the tokens to add, in order: those
    with a stated id, by id, then the named ones (module docstring)."""
    added_path = hf_dir / "added_tokens.json"
    added = _optional_json(added_path)
    if not all(isinstance(k, str) and _is_id(v) for k, v in added.items()):
        raise CheckpointError(f"{added_path} is not a JSON object of token strings to integer ids; " + SAVE_FAST)
    placed: dict[str, tuple[int, AddedToken]] = {t: (i, _added_token(t, {})) for t, i in added.items()}
    decoder = config.get("added_tokens_decoder")
    for key, spec in decoder.items() if isinstance(decoder, dict) else ():
        if not (key.isascii() and key.isdigit() and isinstance(spec, dict) and isinstance(spec.get("content"), str)):
            raise CheckpointError(
                f"{hf_dir / 'tokenizer_config.json'}: added_tokens_decoder[{key!r}] is not "
                '{"content": ..., ...} under a token id; ' + SAVE_FAST
            )
        placed[spec["content"]] = (int(key), _added_token(spec["content"], spec))

    names: dict[str, str] = {}
    named: list[AddedToken] = []
    # special_tokens_map.json first: transformers lets it override tokenizer_config.json
    for source in (_optional_json(hf_dir / "special_tokens_map.json"), config):
        for key in (*SPECIAL_KEYS, "additional_special_tokens"):
            values = source.get(key)
            for value in values if isinstance(values, list) else [values]:
                content = _content(value)
                if content is None:
                    continue
                named.append(_added_token(content, value if isinstance(value, dict) else {}))
                if key != "additional_special_tokens":
                    names.setdefault(key, content)
    for key, content in defaults.items():
        if key not in names and (content in vocab or content in placed):
            names[key] = content
            named.append(_added_token(content, {}))
    order = sorted(placed.values(), key=lambda entry: entry[0])
    return names, [*order, *((None, t) for t in named if t.content not in placed)]


def _register(hf: tokenizers.Tokenizer, tokens: list[tuple[int | None, AddedToken]], hf_dir: Path) -> None:
    """Add `tokens` to `hf` one by one, checking the stated ids (`tokenizers` numbers each new one on)."""
    for token_id, token in tokens:
        (hf.add_special_tokens if token.special else hf.add_tokens)([token])
        if token_id is not None and hf.token_to_id(token.content) != token_id:
            raise CheckpointError(
                f"{hf_dir}: added token {token.content!r} has id {token_id}, but the vocabulary puts it at "
                f"{hf.token_to_id(token.content)} (added ids must follow the vocabulary's, in order); " + SAVE_FAST
            )


def _added_token(content: str, spec: dict[str, Any]) -> AddedToken:
    """An added token with the flags `spec` (added_tokens_decoder's or a special-token dict) gives; special
    unless it says otherwise, and a special one matches the raw text (normalized=False), as in transformers."""
    special = spec.get("special") is not False
    flags = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if isinstance(spec.get(k), bool)}
    return AddedToken(content, **({"special": special, "normalized": not special} | flags))


def _id_of(hf: tokenizers.Tokenizer, names: dict[str, str], key: str, hf_dir: Path) -> tuple[str, int]:
    token = names.get(key)
    token_id = hf.token_to_id(token) if token is not None else None
    if token is None or token_id is None:
        raise CheckpointError(
            f"{hf_dir}'s tokenizer files name no {key} in the vocabulary, which its framing needs; " + SAVE_FAST
        )
    return token, token_id


def _content(value: Any) -> str | None:
    """A special token's text: a string, or AddedToken's {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) and value else None


def _is_id(value: Any) -> bool:
    return type(value) is int and value >= 0


def _check_ids(vocab: dict[str, int], path: Path) -> None:
    """Ids 0..N-1, each once: `tokenizers` sizes the vocabulary by its count (module docstring)."""
    for position, token_id in enumerate(sorted(vocab.values())):
        if token_id != position:  # sorted: a smaller id repeats the one before, a larger one skips `position`
            problem = f"id {token_id} is repeated" if token_id < position else f"id {position} is missing"
            raise CheckpointError(f"{path} ids are not 0..{len(vocab) - 1}, each once ({problem}); " + SAVE_FAST)


def _optional_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when it is absent or holds something else."""
    data = read_json(path, "delete it or " + SAVE_FAST) if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def _lines(path: Path) -> list[str]:
    """The file's lines without their "\\n" ("\\r\\n" read as "\\n"), as transformers reads vocab.txt;
    a last empty line (the file's final newline) is not a line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); it must be UTF-8 text; " + SAVE_FAST) from None
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines
