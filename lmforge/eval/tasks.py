"""Task evaluation: `lmforge eval RUN --task T --data FILE`, and the metrics `finetune` reports at the end.

| task      | how it is scored                                                          | metrics                  |
| --------- | ------------------------------------------------------------------------- | ------------------------ |
| classify  | the run's head, or k-shot in-context prompts on any LM (`k_shot`)          | accuracy, macro_f1, P/R  |
| sft, qa   | greedy answer to the conversation minus its last assistant turn           | em, f1 (SQuAD-style)     |
| (qa)      | best EM / F1 over the references (SQuAD's answers list; `data/qa.py`)     |                          |
| translate | greedy target after `<src> SOURCE <tgt> `                                 | bleu, chrf (sacrebleu)   |
| dpo       | policy vs. the frozen base on chosen / rejected completions               | reward_accuracy, margin  |
| clm       | next-token loss over the text                                             | loss, ppl                |
| choice    | each option's log-likelihood after the question (`eval/choice.py`)        | accuracy, accuracy_norm  |

EM and token F1 follow the SQuAD v1.1 evaluation script (lower-case, drop punctuation and the
articles a/an/the, split on whitespace); F1 counts overlapping tokens with multiplicity. For other
scripts: punctuation is all of Unicode's (Chinese full-width marks too), text is NFKC-normalised, and
each Chinese/Japanese character is a token (CMRC 2018 / MLQA style), so "五边形。" matches "五边形" and
a near answer gets partial F1. Translation BLEU tokenises each pair whose reference is Chinese with
sacrebleu's "zh" (per character), the others with "13a"; the result says which (`bleu_tokenize`: "zh", "13a",
or "zh+13a" for a file of both), since a BLEU is comparable only with one tokenised the same way.

In-context classification (no training): each query is preceded by k labelled examples,
`Text: ...\\nLabel: NAME\\n\\n`, and the prediction is the label whose tokens get the highest total
log-probability after `Label:` (scoring every label, not sampling, so the answer is always a label);
`accuracy_norm` is the accuracy of picking by log-probability per UTF-8 byte of the label instead, which
does not favour short label names. Demonstrations that do not fit in the context beside the longest label
are left out whole, the first ones first (`fewshot_head`; a note counts them).

Length (~820 lines, over the 800-line guide): every task's scoring, and the checks `finetune` runs on its --val
before training (`prompt_lengths`, `fitting_prompts`), stay beside each other so eval and finetune score alike;
the next split would move the answer metrics (`normalize_answer` to `bleu_chrf`) to their own module.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import string
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.qa import DOC_STRIDE
from lmforge.errors import ConfigError, DataError

# Chinese/Japanese characters (CJK ideographs, their extensions and compatibility forms, kana): text in these
# scripts has no spaces between words, so each character is one token for F1, as the CMRC 2018 / MLQA
# evaluation scripts count Chinese
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f])")
_ENGLISH_PUNCT = frozenset(string.punctuation)


def _punctuation(ch: str) -> bool:
    """SQuAD's ASCII punctuation and symbols, plus every Unicode punctuation mark (，。！？「」、… and the like)."""
    return ch in _ENGLISH_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation (lower-case, no punctuation, no English articles, single spaces), with
    punctuation widened to all of Unicode's (full-width Chinese marks included) and NFKC first, so
    full-width letters and digits equal their ASCII forms."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not _punctuation(ch))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """The tokens EM and F1 compare: whitespace-separated words, with every CJK character a token of its own."""
    return _CJK.sub(r" \1 ", normalize_answer(text)).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(answer_tokens(prediction) == answer_tokens(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_references(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of a prediction against several references: the best of each, as the official SQuAD v1.1
    script's `metric_max_over_ground_truths` scores a question that has several answers."""
    return max(exact_match(prediction, r) for r in references), max(token_f1(prediction, r) for r in references)


def bleu_tokenizer(reference: str) -> str:
    """sacrebleu's tokenizer for one sentence pair, chosen by its reference: "zh" (each Chinese character a
    word, the rest as 13a) when it holds CJK characters, else its default "13a". With 13a a Chinese
    sentence is one or two "words", so any difference scores a BLEU of ~0."""
    return "zh" if _CJK.search(reference) else "13a"


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (characters: no tokenizer) with sacrebleu.

    Each hypothesis/reference pair is tokenised by `bleu_tokenizer(reference)` and the corpus is scored on
    those tokens, so a file that mixes directions (en->zh and zh->en) scores its Chinese sentences per
    character and its English ones with 13a: the same BLEU as sacrebleu's "zh" or "13a" on a one-language
    corpus. (One tokenizer for the whole corpus, "zh" only when most references were Chinese, scored the
    Chinese sentences of a file with 40% of them as whole words.)"""
    try:
        import sacrebleu
        from sacrebleu.metrics.bleu import BLEU
    except ImportError:
        raise ConfigError("translation metrics need sacrebleu; pip install 'lmforge[translate]'") from None
    tokenizers = {name: BLEU(tokenize=name).tokenizer for name in ("zh", "13a")}
    names = [bleu_tokenizer(r) for r in references]
    pairs = [(tokenizers[name], h, r) for name, h, r in zip(names, hypotheses, references, strict=True)]
    # (force: sacrebleu warns on stderr about text that looks tokenised, which this is, on purpose)
    return {
        "bleu": sacrebleu.corpus_bleu(
            [tok(h) for tok, h, _ in pairs], [[tok(r) for tok, _, r in pairs]], tokenize="none", force=True
        ).score,
        # sacrebleu's tokenize= that gives this BLEU ("zh+13a": each pair by its reference), to compare it with others'
        "bleu_tokenize": "+".join(sorted(set(names), key=("zh", "13a").index)) or "13a",
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


ANSWER_BATCH = 16  # prompts decoded together by `_answers` (one KV cache per batch)


def answer_context(model: Any) -> int:
    """Tokens a generated answer and its prompt share: the context (recurrent models: no limit)."""
    return getattr(model, "max_context", model.cfg.max_seq_len)


DEFAULT_MAX_NEW_TOKENS = 48  # the answer length scored when --max-new-tokens is not given (0), where it fits


def answer_length(max_new_tokens: int, context: int, *, note: bool = True) -> int:
    """The answer length to score with in a model's `context`: `max_new_tokens` as given (an error if it leaves its
    prompt no room), or for 0 (not given) DEFAULT_MAX_NEW_TOKENS, lowered to half the context where it does not fit
    (`note`: saying so on stderr). A prompt-tuned model of a short context (its soft prompt takes tokens) was refused,
    told to lower a --max-new-tokens that was never passed."""
    if max_new_tokens:
        check_answer_room(max_new_tokens, context)
        return max_new_tokens
    if DEFAULT_MAX_NEW_TOKENS < context:
        return DEFAULT_MAX_NEW_TOKENS
    fitted = max(1, context // 2)
    if note:
        print(
            f"note: answers are scored up to {fitted} new tokens, half the model's context of {context} (the default "
            f"{DEFAULT_MAX_NEW_TOKENS} would leave no room for the prompt); pass --max-new-tokens to choose",
            file=sys.stderr,
        )
    return fitted


def check_answer_room(max_new_tokens: int, context: int) -> None:
    """An answer of `max_new_tokens` must leave its prompt at least one token of the context (the
    prompt keeps its last tokens; with none left the model would answer without the question)."""
    if max_new_tokens >= context:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's context of "
            f"{context} tokens; use at most {context - 1}"
        )


def _answers(ft: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers to many prompts, in order.

    With a KV cache (a plain GPT), prompts go through `generate_batch` ANSWER_BATCH at a time, sorted
    by length so a batch holds little padding; each answer equals the one `generate` gives the prompt
    alone. Without one (an adapted wrapper, a recurrent model) each prompt is decoded on its own.
    """
    from lmforge.data.formats import keep_end
    from lmforge.detokenize import shown_text
    from lmforge.generate import generate, generate_batch, run_stops

    context = answer_context(ft.model)
    check_answer_room(max_new_tokens, context)
    room = context - max_new_tokens
    prompts = [keep_end(p, room, ft.tokenizer.prompt_prefix) for p in prompts]  # (an imported Llama's BOS kept)
    eos = ft.tokenizer.eos_id_or_none  # None: an imported tokenizer without one (generate.py)
    stops = run_stops(ft)  # eos, and an imported instruct model's end of turn ends its answer too
    if ft.use_cache and room > 0:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        new: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), ANSWER_BATCH):
            chunk = order[start : start + ANSWER_BATCH]
            outs = generate_batch(
                ft.model,
                [prompts[i] for i in chunk],
                max_new_tokens=max_new_tokens,
                eos_id=eos,
                stop_ids=stops,
                vocab_size=ft.tokenizer.vocab_size,
            )
            for i, out in zip(chunk, outs, strict=True):
                new[i] = out
    else:
        new = [
            generate(
                ft.model,
                p,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                eos_id=eos,
                stop_ids=stops,
                use_cache=ft.use_cache,
                vocab_size=ft.tokenizer.vocab_size,
            )  # fmt: skip
            for p in prompts
        ]
    # an answer cut by max_new_tokens mid-character is scored and shown without its U+FFFD, as generate shows it
    # (and with one that a stray byte makes, which generate shows too)
    decode = functools.partial(ft.tokenizer.decode, skip_special_tokens=True)
    return [shown_text(decode, [t for t in ids if t not in stops], ft.tokenizer).strip() for ids in new]


@torch.no_grad()
def _classify(ft: Any, rows: list[dict[str, Any]], fields: dict[str, str], path: Any) -> dict[str, Any]:
    from lmforge.data.formats import build_examples, classify_batch, classify_frame
    from lmforge.eval.classify import classification_report

    labels = ft.info["labels"]
    frame = classify_frame(ft.tokenizer, ft.model.body.cfg.family)
    examples = build_examples(
        rows,
        task="classify",
        tok=ft.tokenizer,
        fields=fields,
        max_len=ft.info["max_len"],
        labels=labels,
        path=path,
        frame=frame,
        context=answer_context(ft.model),
        run_max_len=True,
    )
    device = next(ft.model.parameters()).device
    preds: list[int] = []
    for i in range(0, len(examples), 32):
        ids, lengths, _ = classify_batch(examples[i : i + 32], frame[2])
        preds += ft.model.classify(ids.to(device), lengths.to(device)).argmax(-1).tolist()
    return classification_report([label for _, label in examples], preds, labels)


@torch.no_grad()
def continuation_logprob(
    model: Any, head: list[int], tail: list[int], context: int, prefix: Sequence[int] = ()
) -> float:
    """Summed log-probability of `tail`'s tokens after `head` (a label after its prompt, an answer option after
    its question), one forward pass; the start of `head` is dropped when the two exceed `context`, after the
    `prefix` it starts with (the tokenizer's `prompt_prefix`: `keep_end`)."""
    from lmforge.adapt.objectives import sequence_logprobs
    from lmforge.data.formats import keep_end
    from lmforge.objectives import IGNORE_INDEX

    device = next(model.parameters()).device
    seq = keep_end(head + tail, context + 1, prefix)
    x = torch.tensor([seq[:-1]], device=device)
    y = torch.tensor([seq[1:]], device=device)
    y[:, : max(0, len(seq) - 1 - len(tail))] = IGNORE_INDEX  # score only the tail's tokens
    return float(sequence_logprobs(model(x), y))


def fewshot_head(tok: Any, demos: list[str], query: str, room: int) -> tuple[list[int], int]:
    """(ids, demonstrations left out) of a k-shot prompt: the tokenizer's `prompt_prefix` (an imported Llama's BOS),
    the demonstrations, then the query, in at most `room` tokens. Demonstrations that do not fit are left out whole,
    the first ones first (the query and the demonstrations nearest it stay): a cut of the whole prompt at its start
    (`keep_end`, as lm-evaluation-harness cuts) began it in the middle of a demonstration, and a label scored
    after a longer prompt than another label saw a different one. A query too long alone keeps its end
    (`continuation_logprob` cuts it)."""
    prefix = tok.prompt_prefix
    ids = tok.encode("".join(demos) + query)
    if len(prefix) + len(ids) <= room or not demos:
        return prefix + ids, 0
    shorter = tok.encode_batch(["".join(demos[first:]) + query for first in range(1, len(demos) + 1)])
    first = next((i for i, s in enumerate(shorter) if len(prefix) + len(s) <= room), len(shorter) - 1)
    return prefix + shorter[first], first + 1


def note_dropped_demos(dropped: int, rows: int, k: int, context: int) -> None:
    """The note of `fewshot_head`'s cuts over an evaluation, on stderr (none when every demonstration fit)."""
    if dropped:
        print(
            f"note: {dropped} of {rows * k} demonstrations left out whole to fit the model's context ({context} "
            "tokens) beside the answer; lower --k-shot or use shorter shots to keep them",
            file=sys.stderr,
        )


@torch.no_grad()
def fewshot_classify(
    ft: Any,
    rows: list[dict[str, Any]],
    shots: list[dict[str, Any]],
    *,
    k: int,
    fields: dict[str, str],
    seed: int = 0,
    where: str = "the data with its shots",
) -> dict[str, Any]:
    """In-context classification: each row is scored after `k` examples drawn for it (seeded) from
    `shots`, never a shot with the row's own text (the shots may be the evaluated file itself, whose
    answer would otherwise be in the prompt); no weights change.

    Demonstrations are drawn per row, as lm-evaluation-harness does, so the score does not hang on
    one lucky or unlucky draw of k examples.
    """
    import random

    from lmforge.data.formats import class_labels, label_name
    from lmforge.eval.classify import classification_report

    tok, model = ft.tokenizer, ft.model
    labels = class_labels((r[fields["label"]] for r in shots + rows), where)  # (as `finetune` orders)
    if k > len(shots):
        raise DataError(f"--k-shot {k} but the shots file has only {len(shots)} rows; lower --k-shot")
    shot_texts = [str(r[fields["text"]]).strip() for r in shots]
    demos = [f"Text: {t}\nLabel: {label_name(r[fields['label']])}\n\n" for t, r in zip(shot_texts, shots, strict=True)]
    rng = random.Random(seed)
    context = model.cfg.max_seq_len
    label_ids = [tok.encode(" " + name) for name in labels]
    y_true, y_pred, y_norm = [], [], []
    label_bytes = [max(1, len((" " + name).encode("utf-8"))) for name in labels]
    room = context + 1 - max(len(ids) for ids in label_ids)  # (`continuation_logprob` keeps context + 1 tokens)
    dropped = 0
    for row in rows:
        text = str(row[fields["text"]]).strip()
        pool = [i for i, t in enumerate(shot_texts) if t != text]
        if k > len(pool):
            raise DataError(
                f"--k-shot {k} but only {len(pool)} shots differ from the row {text[:40]!r}; lower --k-shot"
            )
        prompt, left_out = fewshot_head(tok, [demos[i] for i in rng.sample(pool, k)], f"Text: {text}\nLabel:", room)
        dropped += left_out
        scores = [continuation_logprob(model, prompt, ids, context, tok.prompt_prefix) for ids in label_ids]
        y_true.append(labels.index(label_name(row[fields["label"]])))
        y_pred.append(max(range(len(labels)), key=scores.__getitem__))
        y_norm.append(max(range(len(labels)), key=lambda i: scores[i] / label_bytes[i]))
    note_dropped_demos(dropped, len(rows), k, context)
    report = classification_report(y_true, y_pred, labels)
    report["k_shot"] = k
    # per byte of the label: the sum favours short labels (正面评价 against 负面 always lost)
    report["accuracy_norm"] = sum(t == p for t, p in zip(y_true, y_norm, strict=True)) / max(1, len(y_true))
    return report


def _last_turn(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation's last message, after its system message if it has one: what must fit whole."""
    system = messages[:1] if len(messages) > 1 and messages[0]["role"] == "system" else []
    return system + messages[-1:]


def prompt_lengths(tok: Any, template: Any, rows: list[dict[str, Any]], fields: dict[str, str], task: str) -> list[int]:
    """The tokens of each row's prompt that must fit whole beside its answer (`fitting_prompts`): translate's
    source prompt; sft's last message, after the system message (older turns are dropped to fit, as in chat)."""
    from lmforge.chat import ChatTemplate

    if task == "translate":
        return [len(translate_prompt_ids(tok, row, fields)) for row in rows]
    template = template or ChatTemplate()
    return [template.prompt_length(tok, _last_turn(_reference_text(row, fields, task)[0])) for row in rows]


def translate_prompt_ids(tok: Any, row: dict[str, Any], fields: dict[str, str]) -> list[int]:
    """A translate row's prompt as the model was trained on it (`completion_example`: its BOS first)."""
    from lmforge.data.formats import scalar_text, translate_prompt

    return tok.prompt_prefix + tok.encode(translate_prompt(scalar_text(row[fields["source"]])))


def fitting_prompts(
    lengths: list[int], context: int, max_new_tokens: int, path: Any, *, note: bool = True
) -> list[int]:
    """Indices of the prompts (of `lengths` tokens) that fit the model's `context` beside `max_new_tokens` answer
    tokens. The others are skipped, counted in one note (`note`): a prompt with its start cut asks another
    question than the row (a source without its start has a reference the model never saw), and generate, chat and
    serve refuse such a prompt. None fitting: a one-line error in `generate.prompt_too_long`'s words (`finetune`
    checks its --val so before training)."""
    from lmforge.generate import prompt_too_long

    room = context - max_new_tokens
    kept = [i for i, n in enumerate(lengths) if n <= room]
    if lengths and not kept:
        what = f"{path}: no prompt fits: the shortest is"
        flag = "--max-new-tokens"
        raise DataError(prompt_too_long(what, min(lengths), context, max_new_tokens=max_new_tokens, flag=flag))
    if note and len(kept) < len(lengths):
        print(
            f"note: {path}: {len(lengths) - len(kept)} of {len(lengths)} prompts are longer than the {room:,} tokens "
            f"the model's context ({context:,}) holds beside {max_new_tokens} answer tokens and were skipped, not "
            "cut (a cut prompt asks what the row did not); shorten them or lower --max-new-tokens to score them",
            file=sys.stderr,
        )
    return kept


def _reference_text(row: dict[str, Any], fields: dict[str, str], task: str) -> tuple[list[dict[str, str]], str]:
    from lmforge.data.formats import conversation

    messages = conversation(row, fields, task)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("an evaluation conversation must end with the assistant turn to compare against")
    return messages[:-1], messages[-1]["content"]


def _qa(
    ft: Any, rows: list[dict[str, Any]], fields: dict[str, str], path: Any, max_new_tokens: int, doc_stride: int
) -> dict[str, Any]:
    """EM and F1 of greedy answers, each the best over the row's references (the official SQuAD v1.1 script's
    `metric_max_over_ground_truths`); a context too long for the prompt is read in overlapping windows, all
    generated in one batch, and the answer the model is surest of is kept (`data/qa.py`); an abstention is
    scored as the empty prediction, and an unanswerable question against the empty string (SQuAD v2's script),
    with `has_answer` and `no_answer` scoring the two kinds apart (its HasAns/NoAns)."""
    from lmforge.chat import ChatTemplate
    from lmforge.data.qa import (
        abstains,
        context_of,
        pick_answer,
        qa_windows,
        references,
        scored_prediction,
        unanswerable,
    )

    template = ft.template or ChatTemplate()
    budget = ft.model.cfg.max_seq_len - max_new_tokens
    windows = [qa_windows(ft.tokenizer, template, row, fields, budget, doc_stride) for row in rows]
    flat = [messages for row_windows in windows for messages in row_windows]
    replies = iter(_answers(ft, [template.prompt_ids(ft.tokenizer, m, budget=budget)[0] for m in flat], max_new_tokens))
    answers = [[next(replies) for _ in row_windows] for row_windows in windows]
    long = [i for i, w in enumerate(windows) if len(w) > 1]
    if long:
        pairs = [(m, a) for i in long for m, a in zip(windows[i], answers[i], strict=True)]
        logprobs = iter(reply_logprobs(ft, template, pairs))  # (one batched pass over every window's reply)
        for i in long:
            answers[i] = [pick_answer(answers[i], [next(logprobs) for _ in answers[i]])]
        print(
            f"note: {path}: {len(long)} of {len(rows)} contexts too long for the model's context beside "
            f"{max_new_tokens} answer tokens were read in {sum(len(windows[i]) for i in long)} overlapping "
            f"windows (sharing --doc-stride {doc_stride} tokens, at most half a window); each question kept the "
            "answer the model is surest of",
            file=sys.stderr,
        )
    dropped = sum(  # (not one token of the context fits beside the question: it is asked alone, as before windows)
        bool(context_of(row, fields).strip()) and w[0][0]["content"] == str(row[fields["question"]])
        for row, w in zip(rows, windows, strict=True)
    )
    if dropped:
        print(
            f"note: {path}: {dropped} of {len(rows)} questions were asked without their context: the question "
            f"alone fills the model's context beside {max_new_tokens} answer tokens; lower --max-new-tokens",
            file=sys.stderr,
        )
    scores: dict[str, list[tuple[float, float]]] = {"has_answer": [], "no_answer": []}
    samples = []
    for row, (prediction,) in zip(rows, answers, strict=True):
        refs = references(row, fields)
        kind = "no_answer" if unanswerable(row, fields) else "has_answer"
        if kind == "no_answer":  # right only when it abstains ("，，，" normalises to "" but is no abstention)
            scores[kind].append((1.0, 1.0) if abstains(prediction) else (0.0, 0.0))
        else:
            scores[kind].append(best_over_references(scored_prediction(prediction), refs))
        if len(samples) < 3:
            question = str(row[fields["question"]])
            samples.append(
                {"prompt": question[:200], "reference": refs[0] if len(refs) == 1 else refs, "prediction": prediction}
            )
    every = scores["has_answer"] + scores["no_answer"]
    result = {"em": sum(e for e, _ in every) / len(every), "f1": sum(f for _, f in every) / len(every), "n": len(every)}
    if scores["no_answer"]:  # (a kind with no question is left out: "has_answer em 0 n 0" read as a score)
        for kind, pairs in scores.items():
            if pairs:
                n = len(pairs)
                result[kind] = {"em": sum(e for e, _ in pairs) / n, "f1": sum(f for _, f in pairs) / n, "n": n}
    return result | {"windowed": len(long), "samples": samples}


@torch.no_grad()
def reply_logprobs(ft: Any, template: Any, pairs: list[tuple[list[dict[str, str]], str]]) -> list[float]:
    """Mean log-probability per token of each reply after its prompt (chat messages to answer), over the tokens
    training targets: the reply and its end of text. Right-padded batches of ANSWER_BATCH: padding after a
    row changes none of its logits (causal attention). The log-softmax is taken at the reply's positions only:
    over every position it doubled the (B, T, vocab) logits' memory, 3.3 GB for GPT-2 at 16 x 1024 tokens."""
    from lmforge.data.formats import lm_batch, segments_example
    from lmforge.objectives import IGNORE_INDEX

    device = next(ft.model.parameters()).device
    context = answer_context(ft.model)
    examples = [
        segments_example(
            template.segments(ft.tokenizer, [*messages, {"role": "assistant", "content": reply}]),
            context,
            ft.tokenizer.prompt_prefix,
        )
        for messages, reply in pairs
    ]
    out: list[float] = []
    for i in range(0, len(examples), ANSWER_BATCH):
        x, y = lm_batch(examples[i : i + ANSWER_BATCH], pad_id=0)
        x, y = x.to(device), y.to(device)
        valid = y != IGNORE_INDEX  # (B, T)
        picked = torch.log_softmax(ft.model(x)[valid].float(), dim=-1).gather(-1, y[valid][:, None])[:, 0]  # (N,)
        sums = torch.zeros(len(y), device=device).index_add_(0, valid.nonzero()[:, 0], picked)  # (B,)
        out += (sums / valid.sum(-1).clamp(min=1)).tolist()
    return out


@torch.no_grad()
def _dpo(ft: Any, rows: list[dict[str, Any]], fields: dict[str, str], path: Any) -> dict[str, Any]:
    from lmforge.adapt.load import load_base_model
    from lmforge.adapt.objectives import dpo_losses, pair_logprobs
    from lmforge.chat import ChatTemplate
    from lmforge.data.formats import build_examples, chat_pair, dpo_collate
    from lmforge.finetune_eval import reference_logprobs
    from lmforge.objectives import to_device

    device = next(ft.model.parameters()).device
    pairs = build_examples(
        rows, task="dpo", tok=ft.tokenizer, fields=fields, max_len=ft.info["max_len"], labels=None, path=path,
        template=ft.template or ChatTemplate(), context=answer_context(ft.model), run_max_len=True,
    )  # fmt: skip
    reference = load_base_model(ft.info, device)
    reference_logprobs(reference, pairs, ft.tokenizer.eos_id, device)
    beta = ft.info["dpo_beta"]
    collate = dpo_collate(ft.tokenizer.eos_id)
    losses, chosen, rejected = [], [], []
    for i in range(0, len(pairs), 16):
        batch = to_device(collate(pairs[i : i + 16]), device)
        pc, pr = pair_logprobs(ft.model, batch)
        loss, rc, rr = dpo_losses(pc, pr, batch["ref_chosen"], batch["ref_rejected"], beta)
        losses += loss.tolist()
        chosen += rc.tolist()
        rejected += rr.tolist()
    n = len(losses)
    forked = sum(isinstance(r[fields["chosen"]], list) and chat_pair(r, fields) is None for r in rows)
    return {
        "loss": sum(losses) / n,
        "reward_accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n,
        "reward_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n,
        "chosen_reward": sum(chosen) / n,
        "rejected_reward": sum(rejected) / n,
        "n": n,
        # pairs with chosen == rejected, and conversations that differ before their last reply (`build_examples`,
        # whose stderr notes are the printed report of them)
        "skipped_identical": len(rows) - n - forked,
        "skipped_forked": forked,
    }


def task_metrics(
    ft: Any,
    rows: list[dict[str, Any]],
    *,
    path: Any,
    max_new_tokens: int = 0,
    out_dir: Path | None = None,
    task: str | None = None,
    fields: dict[str, str] | None = None,
    doc_stride: int = DOC_STRIDE,
) -> dict[str, Any]:
    """Metrics of a loaded run (`finetune.Finetuned`) on task rows; classification also writes confusion.png;
    `doc_stride`: qa's overlap of the windows of a context too long for the model (`data/qa.py`)."""
    from lmforge.chat import ChatTemplate
    from lmforge.data.formats import scalar_text

    info = ft.info or {}
    task = task or info.get("task")
    fields = fields or info.get("fields")
    ft.model.eval()
    if task in ("sft", "qa", "translate"):
        max_new_tokens = answer_length(max_new_tokens, answer_context(ft.model))
    if task == "classify":
        if not hasattr(ft.model, "classify") or ft.model.head is None:
            raise ConfigError(
                f"{ft.run_dir} has no classification head; pass --k-shot N (N >= 1) --shots FILE to use it "
                "in-context, or fine-tune it with --task classify"
            )
        report = _classify(ft, rows, fields, path)
        if out_dir is not None:
            from lmforge.eval.classify import plot_confusion

            report["confusion_png"] = str(plot_confusion(report, Path(out_dir) / "confusion.png"))
        return {"task": task, **report}
    if task == "qa":
        return {"task": task, **_qa(ft, rows, fields, path, max_new_tokens, doc_stride)}
    if task == "sft":
        template = ft.template or ChatTemplate()
        em = f1 = 0.0
        samples = []
        turns = [_reference_text(row, fields, task) for row in rows]
        budget = ft.model.cfg.max_seq_len - max_new_tokens
        # older turns are dropped to fit, as chat drops them; a last message that does not fit beside the system
        # message is skipped (`fitting_prompts`), not cut as prompt_ids would cut it
        lengths = prompt_lengths(ft.tokenizer, template, rows, fields, task)
        turns = [turns[i] for i in fitting_prompts(lengths, ft.model.cfg.max_seq_len, max_new_tokens, path)]
        prompts = [template.prompt_ids(ft.tokenizer, messages, budget=budget)[0] for messages, _ in turns]
        for (messages, reference), prediction in zip(turns, _answers(ft, prompts, max_new_tokens), strict=True):
            em += exact_match(prediction, reference)
            f1 += token_f1(prediction, reference)
            if len(samples) < 3:
                samples.append(
                    {"prompt": messages[-1]["content"][:200], "reference": reference, "prediction": prediction}
                )
        n = len(turns)
        return {"task": task, "em": em / n, "f1": f1 / n, "n": n, "skipped_long": len(rows) - n, "samples": samples}
    if task == "translate":
        prompts = [translate_prompt_ids(ft.tokenizer, row, fields) for row in rows]
        kept = fitting_prompts([len(p) for p in prompts], answer_context(ft.model), max_new_tokens, path)
        skipped, rows, prompts = len(rows) - len(kept), [rows[i] for i in kept], [prompts[i] for i in kept]
        hyps = _answers(ft, prompts, max_new_tokens)
        # in the form the model writes (and trained on): NFKC turned the targets' ，？！ into , ? ! before training
        refs = [ft.tokenizer.in_unicode_form(scalar_text(row[fields["target"]]).strip()) for row in rows]
        samples = [
            {"source": scalar_text(r[fields["source"]]), "reference": ref, "prediction": h}
            for r, ref, h in list(zip(rows, refs, hyps, strict=True))[:3]
        ]
        return {"task": task, **bleu_chrf(hyps, refs), "n": len(rows), "skipped_long": skipped, "samples": samples}
    if task == "dpo":
        return {"task": task, **_dpo(ft, rows, fields, path)}
    if task == "clm":
        from lmforge.data.formats import clm_examples, lm_batch
        from lmforge.eval.lm import evaluate_lm, text_byte_table
        from lmforge.train.precision import Precision

        device = next(ft.model.parameters()).device
        texts, seq_len = clm_text_as_trained(ft, [str(r[fields["text"]]) for r in rows], path)
        examples = clm_examples(ft.tokenizer, texts, seq_len)
        batches = [lm_batch(examples[i : i + 16], ft.tokenizer.eos_id) for i in range(0, len(examples), 16)]
        stream = [np.asarray(e.ids[1:]) for e in examples] + [np.asarray(examples[0].ids[:1])] if examples else []
        # the bytes of the text the model reads: an NFKC tokenizer's (a ， it reads as ",") as `prepare` counts them
        text_bytes = sum(len(ft.tokenizer.in_unicode_form(t).encode("utf-8", errors="replace")) for t in texts)
        token_bytes = text_byte_table(ft.tokenizer.token_bytes(), stream, text_bytes)
        m = evaluate_lm(ft.model, batches, token_bytes=token_bytes, precision=Precision(device, torch.float32))
        return {"task": task, **m}
    raise ConfigError(f"unknown task {task!r}")


def clm_text_as_trained(ft: Any, texts: list[str], path: Any) -> tuple[list[str], int]:
    """(documents, window length) of `--task clm` as the run's own validation had them, so that `eval --task clm`
    on the text of its validation split gives the numbers its evaluations logged (`lmforge eval RUN`):

    - a pretrained run whose prepared data folder is there: the documents `prepare` made of them, by the settings
      its manifest.json records (newlines, control characters, NFC/NFKC, --normalize-whitespace, --boilerplate,
      then its removal filters and exact dedup within the file; a `--merge`d folder's: those its parts shared),
      in windows of its data.seq_len. Scored raw, a control character or a decomposed "é" was a token the split
      never held (36 vs 34 tokens on one sample);
    - a fine-tune: cleaned as `finetune --task clm` cleans its files (`formats.clm_texts`), in windows of its
      --max-len;
    - an imported model, or a run whose data folder is gone: raw, in windows of the context.
    """
    import json

    from lmforge.data.datadir import cleaning_settings
    from lmforge.data.filters import DocumentCleaner

    context = ft.model.cfg.max_seq_len
    if ft.info:
        from lmforge.data.formats import clm_texts

        return clm_texts(texts), min(int(ft.info.get("max_len") or context), context)
    manifest = Path(ft.config.data.dir or "") / "manifest.json"
    if not ft.config.data.dir or not manifest.is_file():
        if ft.config.data.dir:  # (moved or deleted: the numbers can differ from the run's logged ones)
            print(
                f"note: {ft.config.data.dir} (the run's prepared data) is gone, so {path} is scored as it is, "
                "without the cleaning its data had, in windows of the model's context",
                file=sys.stderr,
            )
        return texts, context
    seq_len = min(ft.config.data.seq_len or context, context)
    try:
        written = json.loads(manifest.read_text(encoding="utf-8"))
        settings, cleaning = written["config"], cleaning_settings(written)
        cleaner = DocumentCleaner.from_settings(cleaning) if cleaning is not None else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return texts, context  # (not a manifest `prepare` wrote: `lmforge eval RUN` says so)
    if cleaner is None:
        print(
            f"note: the parts merged into {ft.config.data.dir} were cleaned with different settings, so {path} "
            "is scored as it is",
            file=sys.stderr,
        )
        return texts, seq_len
    seen, out = set(), []
    removed: collections.Counter[str] = collections.Counter()
    for text in texts:
        done = cleaner.one(text)
        reason = done.reason or (
            "exact_dup" if settings.get("dedup", "exact") != "none" and done.text in seen else None
        )
        if reason:
            removed[reason] += 1
            continue
        seen.add(done.text)
        out.append(done.text)
    if not out:
        raise DataError(
            f"{path}: every document is removed by the cleaning and filters {ft.config.data.dir} was "
            f"prepared with ({', '.join(f'{n} {r}' for r, n in removed.items())}); check the file"
        )
    if removed:
        print(
            f"note: {path}: {sum(removed.values())} of {len(texts)} documents left out as prepare left them out of "
            f"{ft.config.data.dir} ({', '.join(f'{n} {r}' for r, n in removed.items())})",
            file=sys.stderr,
        )
    return out, seq_len


def evaluate_task(
    run: str | Path,
    *,
    task: str,
    data: str | Path,
    field_renames: list[str] | None = None,
    k_shot: int = 0,
    shots: str | Path | None = None,
    max_new_tokens: int = 0,
    limit: int = 0,
    doc_stride: int = DOC_STRIDE,
    device: str = "auto",
) -> dict[str, Any]:
    """`lmforge eval RUN --task T --data FILE`: task metrics of any run (see the module docstring)."""
    from lmforge.adapt.load import load_finetuned
    from lmforge.data.tables import field_map, read_rows_or_standard, read_task_rows
    from lmforge.train.precision import pick_device

    if limit < 0:
        raise ConfigError(f"--limit must be a number of rows >= 1 (or 0 for all), got {limit}")
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 1 (or 0 for the default), got {max_new_tokens}")
    if k_shot < 0:
        raise ConfigError(f"--k-shot must be >= 0, got {k_shot}")
    if doc_stride < 0:
        raise ConfigError(f"--doc-stride must be a number of tokens >= 0, got {doc_stride}")
    ft = load_finetuned(run, pick_device(device))
    if task == "choice":  # an evaluation-only task, with its own file layouts (eval/choice.py)
        from lmforge.eval.choice import evaluate_choice

        result = evaluate_choice(ft, data, renames=field_renames, k=k_shot, shots=shots, limit=limit)
        return result | {"run": str(run), "data": str(Path(data).resolve())}
    if task in ("sft", "qa", "translate"):
        max_new_tokens = answer_length(max_new_tokens, answer_context(ft.model))
    info = ft.info or {}
    if info.get("task") == "classify" and task != "classify":
        raise ConfigError(f"{run} is a classifier; evaluate it with --task classify")
    if task == "dpo" and info.get("task") != "dpo":
        raise ConfigError(
            f"{run} was not fine-tuned with --task dpo; DPO metrics compare a policy with its reference "
            f"model, so evaluate a run made by 'lmforge finetune {run} --task dpo'"
        )
    if getattr(ft.model.cfg, "family", "gpt") in ("bert", "electra") and (task != "classify" or k_shot or not info):
        raise ConfigError(
            f"{run} is an encoder; fine-tune it with 'lmforge finetune {run} --task classify' and evaluate "
            "that run with --task classify (no --k-shot)"
        )
    if info.get("task") == task and not field_renames:
        # the columns the run was trained on (e.g. --field text=review), over the task's defaults: a run saved
        # before the task read a field (qa's context) has no name for it
        # (or a file with the standard columns instead)
        rows, fields = read_rows_or_standard(
            data, task, field_map(task, None) | dict(info["fields"]), scored=True, limit=limit
        )
    else:
        fields = field_map(task, field_renames)
        rows = read_task_rows(data, task, fields, scored=True, limit=limit)
    if task == "classify" and k_shot:
        if not shots:
            raise ConfigError("--k-shot needs --shots FILE with labelled examples to put in the prompt")
        shot_rows = read_task_rows(shots, task, fields)
        result = {
            "task": task,
            **fewshot_classify(ft, rows, shot_rows, k=k_shot, fields=fields, where=f"{data} with {shots}"),
        }
    else:
        result = task_metrics(
            ft, rows, path=data, max_new_tokens=max_new_tokens, task=task, fields=fields, doc_stride=doc_stride
        )
    result["run"] = str(run)
    result["data"] = str(Path(data).resolve())  # (absolute, as eval's "data" without --task)
    return result


def format_metrics(m: dict[str, Any]) -> str:
    """Human-readable lines for a `task_metrics` result."""
    task = m.get("task")
    if task == "classify":
        from lmforge.eval.classify import format_report

        text = format_report(m)
        return text + (f"\nconfusion matrix: {m['confusion_png']}" if m.get("confusion_png") else "")
    names = ("accuracy", "accuracy_norm", "em", "f1", "bleu", "chrf", "reward_accuracy", "reward_margin", "loss", "ppl")
    keys = [k for k in (*names, "bpb") if k in m]
    line = (
        f"{task}: "
        + " | ".join(f"{k} {m[k]:.4f}" for k in keys if not _isnan(m[k]))
        + f" | n {m.get('n', m.get('tokens'))}"
        + "".join(
            f" | {kind} em {m[kind]['em']:.4f} f1 {m[kind]['f1']:.4f} n {m[kind]['n']}"
            for kind in ("has_answer", "no_answer")
            if kind in m
        )
        + (f" | {m['windowed']} long contexts read in windows" if m.get("windowed") else "")
        + (f" | BLEU tokenize {m['bleu_tokenize']}" if m.get("bleu_tokenize") else "")
    )
    lines = [line]
    for s in m.get("samples", []):
        # (a QA row's several references as "Paris / in Paris", not as the Python list "['Paris', 'in Paris']")
        texts = {k: " / ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in s.items()}
        lines.append("  " + " | ".join(f"{k}: {v[:80]!r}" for k, v in texts.items()))
    return "\n".join(lines)


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)
