"""Task rows → token ids with loss masks: examples, batches, packing (rows are read in `data/tables.py`).

- Every LM-style example is one token list plus a per-token `train` flag: the token is a target
  (its loss counts) only where the flag is set. `lm_batch` shifts them into (inputs, targets) with
  targets = -100 where the flag is off, so prompts, user turns and padding cost nothing.
- Batches are padded on the right: causal attention keeps every real token blind to the padding
  after it, so no attention mask is needed. With `--pack`, short examples share a row instead
  (`pack_examples`, first fit in file order); each token carries its example's index and its
  position within the example, and the model gets a block-diagonal causal mask, so no example
  attends to another and each sees the positions it would see alone.
- The chat template (`lmforge.chat.ChatTemplate`) renders conversations as segments with a train
  flag, so the mask follows the template exactly (loss only on assistant turns and their EOS).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import re
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import DataError
from lmforge.objective_config import IGNORE_INDEX

if TYPE_CHECKING:  # torch loads in the functions that use it (the CLI's parser reads data/qa.py's DOC_STRIDE)
    import torch

# ---------------------------------------------------------------------------------------------
# LM-style examples: ids + train flags


@dataclass
class LMExample:
    ids: list[int]
    train: list[bool]  # train[i]: token i is a target (predicted from the tokens before it)
    cut: bool = False  # tokens were dropped to fit max_len (`build_examples` counts them in a note)


def segments_example(segments: list[tuple[list[int], bool]], max_len: int, prefix: Sequence[int] = ()) -> LMExample:
    """Concatenate (ids, train) segments; cut to max_len + 1 tokens (inputs are the first max_len).

    The cut takes the end, unless that would leave no target at all (a prompt that fills the context):
    then the prompt loses its *start* instead, as in `completion_example`: the answer and the end of
    the prompt right before it are kept, and the answer is cut only when it alone does not fit. A
    `prefix` the ids start with (the tokenizer's `prompt_prefix`, an imported Llama's BOS) stays first
    and the start is cut after it, as `keep_end` cuts a prompt at inference."""
    ids: list[int] = []
    train: list[bool] = []
    for seg_ids, flag in segments:
        ids += seg_ids
        train += [flag] * len(seg_ids)
    first = train.index(True) if True in train else None  # the first target
    cut = len(ids) > max_len + 1
    if first is None or first <= max_len:  # the end cut keeps a target
        return LMExample(ids[: max_len + 1], train[: max_len + 1], cut)
    # The prefix stays when 2 tokens fit after it (max_len + 1 kept): the one that predicts the first target, and
    # that target. At max_len == len(prefix) only one would, and the example would train on nothing, so the prefix
    # goes and the window keeps a target; `keep_end`'s bound (n > len(prefix)) is the same rule for a prompt,
    # which needs only its last token after the prefix (tested at both boundaries).
    p = len(prefix) if prefix and ids[: len(prefix)] == list(prefix) and max_len > len(prefix) else 0
    n = max_len + 1 - p  # tokens kept after the prefix
    # the whole tail when it fits, else from the token that predicts the first target on
    start = min(len(ids) - n, first - 1)
    return LMExample(ids[:p] + ids[start : start + n], train[:p] + train[start : start + n], cut)


def keep_end(ids: list[int], n: int, prefix: Sequence[int]) -> list[int]:
    """A prompt cut from its start to its last `n` tokens, for inference (eval's answers, `chat`, scored
    continuations). `prefix` (the tokenizer's `prompt_prefix`, an imported Llama's BOS) stays first when the
    prompt starts with it, and the cut is made after it: the model was trained on examples that start with it
    (`segments_example`, `completion_example`), and a cut from the very start dropped it."""
    if len(ids) <= n:
        return ids
    # (n == len(prefix): the prefix alone would drop every prompt token; the prompt's last n are kept instead)
    p = len(prefix) if prefix and ids[: len(prefix)] == list(prefix) and n > len(prefix) else 0
    return ids[:p] + ids[len(ids) - (n - p) :]


def completion_example(tok: Any, prompt: str, completion: str, max_len: int) -> LMExample:
    """prompt (no loss) + completion + EOS (loss): translation, DPO pairs, prompt/completion data.

    The prompt starts with the tokenizer's `prompt_prefix` (an imported Llama's BOS), as `generate` and
    `serve` put it before a prompt. Too long for the context: the prompt loses its *start* after that
    prefix (the completion right after it matters most), and the completion is cut only when it alone
    does not fit.
    """
    p, c = tok.encode(prompt), tok.encode(completion) + [tok.eos_id]
    room = max_len + 1 - len(c) - len(tok.prompt_prefix)
    kept = p[-room:] if room > 0 else p[:1]
    example = segments_example([(tok.prompt_prefix + kept, False), (c, True)], max_len)
    example.cut = example.cut or len(kept) < len(p)
    return example


def translate_prompt(source: str) -> str:
    """The decoder translation format: `<src> SOURCE <tgt> ` then the target (loss only on the target)."""
    return f"<src> {source.strip()} <tgt> "


def lm_batch(examples: list[LMExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (inputs (B, T), targets (B, T)); targets -100 where not trained or padded."""
    import torch

    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        ids = torch.tensor(e.ids, dtype=torch.long)
        flags = torch.tensor(e.train[1:], dtype=torch.bool)
        x[b, :n] = ids[:-1]
        y[b, :n] = torch.where(flags, ids[1:], IGNORE_INDEX)
    return x, y


def pack_examples(examples: list[LMExample], max_len: int) -> list[list[LMExample]]:
    """Group examples into rows of at most `max_len` input tokens (each example gives len(ids) - 1)."""
    rows: list[list[LMExample]] = []
    used: list[int] = []
    for e in examples:
        n = len(e.ids) - 1
        for i, u in enumerate(used):  # first fit: the first row with room
            if u + n <= max_len:
                rows[i].append(e)
                used[i] += n
                break
        else:
            rows.append([e])
            used.append(n)
    return rows


def packed_batch(rows: list[list[LMExample]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, positions, segments), each (B, T); padding has segment -1 and no target."""
    import torch

    T = max(sum(len(e.ids) - 1 for e in row) for row in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), T), dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for k, e in enumerate(row):
            ex, ey = lm_batch([e], pad_id)
            n = ex.shape[1]
            x[b, start : start + n], y[b, start : start + n] = ex[0], ey[0]
            positions[b, start : start + n] = torch.arange(n)
            segments[b, start : start + n] = k
            start += n
    return x, y, positions, segments


def clm_texts(texts: Sequence[Any]) -> list[str]:
    """`--task clm` documents cleaned by `prepare`'s rule at its defaults (`filters.DocumentCleaner`: line breaks
    to "\\n", control characters such as NUL dropped, NFC, stripped), those left empty dropped: `finetune` trains
    and validates on them, and `eval --task clm` of a fine-tune scores them (a NUL byte trained as a token)."""
    from lmforge.data.filters import DocumentCleaner

    cleaner = DocumentCleaner()
    return [done.text for done in (cleaner.one(str(t)) for t in texts) if done.reason is None]


def clm_examples(tok: Any, texts: list[str], seq_len: int) -> list[LMExample]:
    """Documents + EOS, concatenated and cut into windows of seq_len + 1 tokens (every token trains)."""
    stream: list[int] = []
    for ids in tok.encode_batch([str(t) for t in texts]):
        stream += ids + [tok.eos_id]
    windows = [stream[i : i + seq_len + 1] for i in range(0, max(len(stream) - 1, 1), seq_len)]
    return [LMExample(w, [True] * len(w)) for w in windows if len(w) >= 2]


# ---------------------------------------------------------------------------------------------
# classification


# an integer written as a float: pandas writes an int column that has a missing value as float64 ("1.0")
_INTEGER_AS_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)\.0+")


def label_name(value: Any) -> str:
    """A label as the string that names its class, spelled one way whichever file it comes from.

    Labels are compared as strings, so every spelling of one label must give the same string, or one
    dataset gets two classes ("1" and "1.0") and a --val file is refused as holding labels never trained
    on: CSV "1", JSON 1 or 1.0, a float column's 1.0 and pandas' "1.0" are "1" ("1.5" stays "1.5");
    JSON true, CSV "true" and pandas' "True" are "true". Other strings are kept as written (stripped).
    """
    if isinstance(value, float) and math.isnan(value):  # JSONL's NaN (Python's json writes a missing float so): none
        return ""
    name = scalar_text(value).strip()
    if _INTEGER_AS_FLOAT.fullmatch(name):
        return str(int(name.split(".")[0]))  # (int: "-0.0" is "0")
    if name.lower() in ("true", "false"):
        return name.lower()
    return name


def scalar_text(value: Any) -> str:
    """A JSON or Parquet value as the text it stands for: JSON's spelling of a bool ("true", not Python's "True"),
    an integer written as a float (a Parquet double column, pandas' int column with a gap) as the integer ("3", not
    "3.0"), other numbers as JSON writes them ("3.5"), a string as it is. Labels (`label_name`), QA answers
    (`qa.references`), sft's columns and message contents (`conversation`, `chat.file_messages`) and translate's
    source and target read numbers and bools so, in training and scoring."""
    if isinstance(value, bool):  # (before the numbers: a bool is an int)
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def label_key(name: str) -> tuple[int, float | str]:
    """The order of a classifier's labels: numeric ones in numeric order (2 before 10), others alphabetically.
    ("nan" is a name: as a number it compares unequal to all, and the order came out as the set's, which changes
    from one process to the next.)"""
    try:
        number = float(name)
    except ValueError:
        return (1, name)
    return (0, number) if not math.isnan(number) else (1, name)


def label_spelling(name: str) -> str:
    """What two spellings of one label share: case ("Positive", "positive") and Unicode forms (full-width
    "ｐｏｓｉｔｉｖｅ", a decomposed "é") aside."""
    return unicodedata.normalize("NFKC", name).casefold()


def class_labels(values: Any, path: str | Path) -> list[str]:
    """The classes of a labelled file, as `label_name` spells them, in `label_key` order.

    Labels that differ only in case or Unicode form ("Positive", " positive ", "ｐｏｓｉｔｉｖｅ") are refused:
    compared as strings they were separate classes, so a file that spelled its labels two ways trained a 4-class
    head on 2 classes and scored each class against its other spelling (macro-F1 0.17 for a file a 2-class model
    gets right)."""
    labels = sorted({label_name(v) for v in values}, key=label_key)
    spellings: dict[str, list[str]] = {}
    for name in labels:
        spellings.setdefault(label_spelling(name), []).append(name)
    clash = next((names for names in spellings.values() if len(names) > 1), None)
    if clash:
        raise DataError(
            f"{path} spells one label {len(clash)} ways ({', '.join(repr(n) for n in clash)}), which would be "
            f"{len(clash)} classes; write each label one way (e.g. all lower-case) and run again"
        )
    return labels


def classify_frame(tok: Any, family: str) -> tuple[list[int], list[int], int]:
    """(ids before the text, ids after it, padding id) of a classification row for a model family.

    Decoders read `text EOS` and pool the last real token (padding: EOS, never attended to), after the
    tokenizer's `prompt_prefix` (an imported Llama's BOS, which `generate` puts first too; none for lmforge's);
    BERT and ELECTRA read `[CLS] text [SEP]` as in pretraining and pool [CLS] (padding: [PAD], masked out).
    """
    if family in ("bert", "electra"):
        from lmforge.data.masking import special_ids

        sp = special_ids(tok)
        return [sp.cls], [sp.sep], sp.pad
    return list(tok.prompt_prefix), [tok.eos_id], tok.eos_id


def classify_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(ids (B, T) right-padded, lengths (B,), labels (B,))."""
    import torch

    T = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for b, (ids, _) in enumerate(examples):
        x[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in examples], dtype=torch.long)
    labels = torch.tensor([label for _, label in examples], dtype=torch.long)
    return x, lengths, labels


def augment_text(text: str, rng: random.Random, p: float = 0.1) -> str:
    """One of random deletion, swap or insertion of words (EDA, Wei & Zou 2019, arXiv:1901.11196).

    Text in a script written without spaces (Chinese, Japanese) has no words to split on: there each
    character is a word, as whole-word masking treats it (`masking.NO_SPACE_RANGES`), and so is each run of
    other non-space characters; its few spaces ("味道很好 送餐很快") stay between the words they were between
    (split at them, a Chinese review's phrases were its words, and one edit deleted or doubled a third of it)."""
    from lmforge.data.masking import NO_SPACE_RANGES

    no_space = any(a <= ord(ch) <= b for ch in text for a, b in NO_SPACE_RANGES)
    if no_space:
        cjk = "".join(f"{chr(a)}-{chr(b)}" for a, b in NO_SPACE_RANGES)
        pieces = re.findall(rf"\s+|[{cjk}]|[^\s{cjk}]+", text.strip())
        words = [piece for piece in pieces if not piece.isspace()]
        gaps = [piece if piece.isspace() else "" for prev, piece in itertools.pairwise(pieces) if not prev.isspace()]
    else:
        words = text.split()
        gaps = [" "] * (len(words) - 1)  # gaps[i]: the whitespace between words i and i + 1
    if len(words) < 2:
        return text
    n = max(1, int(p * len(words)))
    op = rng.choice(("delete", "swap", "insert"))
    for _ in range(n):
        if op == "delete" and len(words) > 1:
            k = rng.randrange(len(words))
            words.pop(k)
            gaps.pop(k if k < len(gaps) and (k == 0 or not gaps[k]) else k - 1)  # an empty gap goes first
        elif op == "swap":
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        elif op == "insert":
            at = rng.randrange(len(words) + 1)
            words.insert(at, rng.choice(words))
            gaps.insert(at, "" if no_space else " ")
    return words[0] + "".join(gap + word for gap, word in zip(gaps, words[1:], strict=True))


# ---------------------------------------------------------------------------------------------
# batches forever


class ExampleLoader:
    """Shuffled batches of examples, epoch after epoch (seeded; the position is a `state_dict`)."""

    def __init__(self, examples: list[Any], *, batch_size: int, seed: int, collate: Any) -> None:
        if not examples:
            raise DataError("no training examples; check the --train file")
        self.examples, self.batch_size, self.seed, self.collate = examples, batch_size, seed, collate
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        batch = []
        while len(batch) < self.batch_size:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            batch.append(self.examples[self._order[self.pos]])
            self.pos += 1
        return self.collate(batch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state_dict()` was taken (the epoch's order is re-derived from the seed)."""
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()


# ---------------------------------------------------------------------------------------------
# task rows -> examples (used by finetune and eval)


def conversation(row: dict[str, Any], fields: dict[str, str], task: str) -> list[dict[str, str]]:
    """A training row as chat messages (Alpaca, messages, or question/answer)."""
    if task == "qa":  # (the context whole: `qa.qa_messages` cuts it to fit)
        from lmforge.data.qa import context_of, references, user_content

        return [
            {"role": "user", "content": user_content(str(row[fields["question"]]), context_of(row, fields))},
            {"role": "assistant", "content": references(row, fields)[0]},
        ]
    if fields["messages"] in row:
        return row[fields["messages"]]
    # a number or bool is its JSON text (`scalar_text`: 4, 3.5, true), as qa's answers and labels read it; str()
    # trained on and scored against Python's "4.0" and "True"
    prompt = scalar_text(row[fields["instruction"]]).strip()
    extra = row.get(fields["input"])
    extra = "" if extra is None else scalar_text(extra).strip()
    return [
        {"role": "user", "content": prompt + ("\n\n" + extra if extra else "")},
        {"role": "assistant", "content": scalar_text(row[fields["output"]])},
    ]


def split_shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf style pairs (whole dialogues, no prompt column): the shared prefix up to the last
    'Assistant:' turn is the prompt, the rest of each dialogue its completion."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    marker = chosen.rfind("Assistant:", 0, n)
    if marker >= 0:
        n = marker + len("Assistant:")
    return chosen[:n], chosen[n:], rejected[n:]


def chat_pair(
    row: dict[str, Any], fields: dict[str, str]
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]] | None:
    """(prompt messages, chosen reply, rejected reply) of a DPO row in TRL's conversational format: `chosen` and
    `rejected` lists of {role, content} messages, after a `prompt` list of them (explicit prompt), or alone as
    two whole conversations (TRL's implicit prompt; UltraFeedback's, whose text `prompt` is their first user
    turn). The prompt is every message before the final assistant turn, which both conversations must share;
    None when they do not (`_FORKED`: hh-rlhf has a few whose replies hold a "Human:" line of their own). Turns
    are read as sft reads them (ShareGPT's, OpenAI's text parts).

    Raises:
        DataError: a conversation that does not end with an assistant turn, or a text prompt that is not its
            user turn.
    """
    from lmforge.chat import file_messages, sharegpt_messages

    prompt = row.get(fields["prompt"])
    sides = [file_messages(sharegpt_messages(row[fields[name]])) for name in ("chosen", "rejected")]
    if isinstance(prompt, list):
        sides = [file_messages(sharegpt_messages(prompt)) + side for side in sides]
    elif isinstance(prompt, str):
        users = [m.get("content") for side in sides for m in side if isinstance(m, dict) and m.get("role") == "user"]
        if not users:  # replies alone: the text prompt is the user turn they answer
            sides = [[{"role": "user", "content": prompt}, *side] for side in sides]
        elif str(users[0]).strip() != prompt.strip():
            raise DataError(
                f"{fields['prompt']!r} is text and {fields['chosen']!r} holds another user turn; write the prompt "
                "as a list of messages, or leave it out when the conversations hold it"
            )
    for name, side in zip(("chosen", "rejected"), sides, strict=True):
        last = side[-1] if side else None
        if not isinstance(last, dict) or last.get("role") != "assistant":
            raise DataError(
                f"the {name} conversation does not end with an assistant turn; DPO compares two replies to one "
                "conversation, so end each with the reply"
            )
    (*prompt_turns, chosen), (*other, rejected) = sides
    if prompt_turns != other:
        return None
    # earlier replies are context (weight 0), as sft's template reads them: only the final reply is compared
    context = [{**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m for m in prompt_turns]
    return context, chosen, rejected


def chat_pair_examples(
    tok: Any,
    template: Any,
    prompt: list[dict[str, Any]],
    chosen: dict[str, Any],
    rejected: dict[str, Any],
    max_len: int,
) -> dict[str, LMExample]:
    """A conversational DPO pair rendered through the chat template as sft trains on it (and `serve` prompts):
    the prompt's turns, then the reply and its end of turn as the only targets; cut as sft's examples are."""
    pair = {}
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        reply = {k: v for k, v in reply.items() if k != "weight"}  # (the reply is what is compared)
        pair[name] = segments_example(template.segments(tok, [*prompt, reply]), max_len, tok.prompt_prefix)
    return pair


# why `build_examples` skips a conversational DPO pair that `chat_pair` cannot read as two replies to one prompt
_FORKED = "chosen and rejected conversations that differ before their last assistant turn"


def build_examples(
    rows: list[dict[str, Any]],
    *,
    task: str,
    tok: Any,
    fields: dict[str, str],
    max_len: int,
    labels: list[str] | None,
    path: str | Path,
    frame: tuple[list[int], list[int], int] | None = None,
    template: Any = None,
    context: int = 0,
    run_max_len: bool = False,
) -> list[Any]:
    """Rows → examples: (ids, label id) for classify, `LMExample` for LM tasks, dicts for DPO.

    `frame` is `classify_frame(tok, family)` (default: a decoder's `text EOS`); `template` the chat template of
    sft/qa (default: lmforge's `ChatTemplate`; an imported model's own is a `chat.JinjaChatTemplate`); `context` the
    model's (0: not known) and `run_max_len` (`max_len` is a fine-tuned run's, which eval and quantize cannot
    change, not this command's --max-len), for the cut-examples note's advice."""
    from lmforge.chat import ChatTemplate

    advice = keep_more(max_len, context, run_max_len)
    if task == "classify":
        # (label_name: a run saved before labels were spelled one way may hold "1.0"; its rows now read "1")
        index = {label_name(name): i for i, name in enumerate(labels or [])}
        before, after, _ = frame or classify_frame(tok, "gpt")
        room = max_len - len(before) - len(after)
        if room < 1:
            raise DataError(
                f"max_len {max_len} leaves no room for the text (the classification frame takes "
                f"{len(before) + len(after)} tokens); raise --max-len"
            )
        out, cut = [], 0
        for i, row in enumerate(rows, 1):
            if not str(row[fields["text"]]).strip():  # nothing to learn the label from (scored files refuse it)
                continue
            name = label_name(row[fields["label"]])
            if name not in index:
                known = next((n for n in index if label_spelling(n) == label_spelling(name)), None)
                raise DataError(
                    f"{path}: row {i} has label {name!r}, which the model was not trained on "
                    f"(labels: {', '.join(labels or [])}); "
                    + (f"write it {known!r} as the model does" if known else "fix the row or fine-tune with it")
                )
            text = tok.encode(str(row[fields["text"]]))
            cut += len(text) > room
            out.append((before + text[:room] + after, index[name]))
        if rows and not out:
            raise DataError(f"{path}: every row's {fields['text']!r} is empty; write the texts")
        note_skipped(
            path, len(rows) - len(out), len(rows), f"an empty {fields['text']!r} (no text to learn the label from)"
        )
        note_cut(path, cut, len(out), max_len, "each keeps its text's start", advice=advice)
        return out
    if task == "qa":
        from lmforge.data.qa import qa_examples

        return qa_examples(
            rows, tok=tok, template=template or ChatTemplate(), fields=fields, max_len=max_len, path=path,
            advice=advice,
        )  # fmt: skip
    if task == "sft":
        template = template or ChatTemplate()
        out, short = [], 0
        for i, row in enumerate(rows, 1):
            messages = conversation(row, fields, task)
            try:
                segments = template.segments(tok, messages)
            except DataError as e:
                raise DataError(f"{path}: row {i}: {e}") from None
            # An empty answer teaches only the end of the turn: stopping at once, whatever was asked (Alpaca's
            # are lost outputs: "Calculate the sum of the digits of 18047" -> ""). Skipped and noted; scored
            # files refuse them (`tables.check_columns`).
            if not any(str(m.get("content") or "").strip() for m in messages if m.get("role") == "assistant"):
                continue
            out.append(segments_example(segments, max_len, tok.prompt_prefix))
            short += sum(out[-1].train) < sum(len(ids) for ids, train in segments if train)
        answer = f"{fields['output']!r} or the assistant messages"
        if rows and not out:
            raise DataError(f"{path}: every row's answer ({answer}) is empty; write the answers")
        note_skipped(path, len(rows) - len(out), len(rows), f"an empty answer ({answer}: it teaches only to stop)")
        note_cut(path, sum(e.cut for e in out), len(out), max_len, _LM_CUT, answers_cut=short, advice=advice)
        return out
    if task == "translate":
        out, short = [], 0
        for r in rows:
            target = scalar_text(r[fields["target"]])  # (a number or bool: its JSON text, as `conversation` reads it)
            if not target.strip():  # (as sft's empty answers: it teaches only to stop)
                continue
            out.append(completion_example(tok, translate_prompt(scalar_text(r[fields["source"]])), target, max_len))
            short += sum(out[-1].train) < len(tok.encode(target)) + 1  # (+ its end-of-text)
        if rows and not out:
            raise DataError(f"{path}: every row's {fields['target']!r} is empty; write the translations")
        why = f"an empty {fields['target']!r} (it teaches only to stop)"
        note_skipped(path, len(rows) - len(out), len(rows), why)
        note_cut(path, sum(e.cut for e in out), len(out), max_len, _LM_CUT, answers_cut=short, advice=advice)
        return out
    if task == "clm":
        texts = clm_texts([r[fields["text"]] for r in rows])
        if rows and not texts:
            raise DataError(f"{path}: every document is empty once control characters are removed; write the texts")
        return clm_examples(tok, texts, max_len)
    out, forked = [], 0  # dpo
    for i, row in enumerate(rows, 1):
        if isinstance(row[fields["chosen"]], list):  # TRL's conversational form (`tables.check_columns`: both sides)
            try:
                turns = chat_pair(row, fields)
                pair = None if turns is None else chat_pair_examples(tok, template or ChatTemplate(), *turns, max_len)
            except DataError as e:
                raise DataError(f"{path}: row {i}: {e}") from None
            if pair is None:
                forked += 1
                continue
        else:
            chosen, rejected = str(row[fields["chosen"]]), str(row[fields["rejected"]])
            if fields["prompt"] in row:
                prompt = str(row[fields["prompt"]])
            else:
                prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
            pair = {
                "chosen": completion_example(tok, prompt, chosen, max_len),
                "rejected": completion_example(tok, prompt, rejected, max_len),
            }
        # Identical sides state no preference: their DPO loss is log 2 with zero gradient whatever the model, and
        # scoring counts them as a wrong reward ordering. Dropped and noted (eval's result counts them too).
        # An empty side is kept: it is a preference for (or against) stopping at once (hh-rlhf has 4 such).
        if pair["chosen"].ids != pair["rejected"].ids:
            out.append(pair)
    if not out:
        raise DataError(
            f"{path}: all {len(rows)} pairs have the same chosen and rejected tokens (within {max_len} tokens), so "
            "there is no preference to learn or score; check the chosen and rejected columns"
            if not forked
            else f"{path}: no pair of its {len(rows)} has chosen and rejected conversations that differ only in their "
            "last assistant turn (or they are the same tokens); DPO compares two replies to one conversation"
        )
    same = len(rows) - len(out) - forked
    note_skipped(path, same, len(rows), "the same chosen and rejected (no preference)", "pairs")
    note_skipped(path, forked, len(rows), _FORKED, "pairs")
    cut = sum(p["chosen"].cut or p["rejected"].cut for p in out)
    note_cut(path, cut, len(out), max_len, _LM_CUT, "pairs", advice=advice)
    return out


# how `segments_example` and `completion_example` cut an example that does not fit
_LM_CUT = "an answer keeps its start; a prompt too long to leave room for the answer keeps its end"


def note_cut(
    path: str | Path,
    cut: int,
    n: int,
    max_len: int,
    kept: str,
    what: str = "examples",
    answers_cut: int = 0,
    *,
    advice: str,
) -> None:
    """One stderr note counting the examples of `path` cut to `max_len` tokens (they were cut without a word), and
    how many of them lost their answer's end (sft/translate): the end of such an answer and its end-of-text never
    train, so a model fine-tuned on many learns not to stop. Chinese takes more tokens than its length suggests
    (1,927 of Alpaca's 5,000 Chinese examples lose their answer's end at 128 tokens with a Hong Lou Meng BPE
    vocabulary, 24 at 512). `advice`: how to keep more (`keep_more`)."""
    if cut:
        lost = (
            f"; {answers_cut:,} of them lose the end of their answer (with its end-of-text, which teaches the model "
            "to stop)"
            if answers_cut
            else ""
        )
        note(
            f"note: {path}: {cut:,} of {n:,} {what} are longer than {max_len} tokens and were cut to fit "
            f"({kept}){lost}; {advice}"
        )


def note_skipped(path: str | Path, skipped: int, n: int, why: str, what: str = "rows") -> None:
    """One stderr note counting the rows of `path` that `build_examples` left out of training, and `why`, as
    `note_cut` counts the cut ones (held with them)."""
    if skipped:
        note(f"note: {path}: {skipped:,} of {n:,} {what} with {why} {'was' if skipped == 1 else 'were'} skipped")


def keep_more(max_len: int, context: int, run_max_len: bool = False) -> str:
    """How to keep more of examples cut to `max_len` tokens: a longer --max-len, unless it is already the
    model's whole `context` (0: not known), which cannot see more. `run_max_len`: `max_len` is a fine-tuned run's
    (eval, quantize: a command without --max-len), fixed by that run."""
    if context and max_len >= context:
        return (
            f"{max_len} tokens is the model's whole context, so it cannot see more: shorten the examples or "
            "fine-tune a model with a longer context"
        )
    if run_max_len:
        return (
            f"{max_len} tokens is the run's max_len (its fine-tune's --max-len), so the model cannot see more: "
            f"shorten the examples or fine-tune with a longer --max-len, up to the model's context"
            f"{f' ({context:,})' if context else ''}"
        )
    return f"a longer --max-len, up to the model's context{f' ({context:,})' if context else ''}, keeps more"


def note(text: str) -> None:
    """Print a data note on stderr, or keep it for `print_held_notes` within `notes_held`."""
    if _held_notes is None:
        print(text, file=sys.stderr)
    else:
        _held_notes.append(text)


_held_notes: list[str] | None = None  # `notes_held`'s list while it holds


@contextlib.contextmanager
def notes_held() -> Iterator[None]:
    """Within: `note_cut`'s notes wait until `print_held_notes` (a command calls it once its checks on the data
    and the run have passed, so a refusal after the data were read stays one line); printed on a normal exit,
    dropped when an error leaves the block."""
    global _held_notes
    outer, _held_notes = _held_notes, []
    ok = False
    try:
        yield
        ok = True
    finally:
        held, _held_notes = _held_notes, outer
        if ok:
            for line in held or ():  # (None: print_held_notes printed them)
                print(line, file=sys.stderr)


@contextlib.contextmanager
def notes_dropped() -> Iterator[None]:
    """Within: data notes are dropped, for examples built again from rows a command has already noted (finetune's
    final evaluation of its --val, quantize's second comparison), which would repeat each note."""
    global _held_notes
    outer, _held_notes = _held_notes, []
    try:
        yield
    finally:
        _held_notes = outer


def print_held_notes() -> None:
    """Print the notes `notes_held` has kept so far (the rest of its block prints at once)."""
    global _held_notes
    if _held_notes is not None:
        for line in _held_notes:
            print(line, file=sys.stderr)
        _held_notes = None


def dpo_collate(pad_id: int) -> Any:
    import torch

    def collate(pairs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cx, cy = lm_batch([p["chosen"] for p in pairs], pad_id)
        rx, ry = lm_batch([p["rejected"] for p in pairs], pad_id)
        batch = {"chosen_x": cx, "chosen_y": cy, "rejected_x": rx, "rejected_y": ry}
        if "ref" in pairs[0]:  # precomputed reference log-probs (without them: a live reference model)
            batch["ref_chosen"] = torch.tensor([p["ref"][0] for p in pairs])
            batch["ref_rejected"] = torch.tensor([p["ref"][1] for p in pairs])
        return batch

    return collate
