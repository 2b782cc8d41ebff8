"""Batched generation: ragged prompts in one KV cache give each prompt's own `generate` result; eval uses it."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.generate import generate, generate_batch
from lmforge.models.gpt import GPT, GPTConfig
from tests.test_generate import one_thread  # noqa: F401  (autouse: one intra-op thread here too)
from tests.test_generate import tiny as tiny_gpt

VOCAB = 96
CONTEXT = 32
# positions (learned table / rotary) x attention (multi-head / grouped-query), plus norm/MLP/tying switches
VARIANTS = [
    dict(pos_emb="learned"),
    dict(pos_emb="learned", n_kv_head=2, norm="rmsnorm", mlp="swiglu"),
    dict(pos_emb="rope"),
    dict(pos_emb="rope", n_kv_head=1, bias=False, tie_embeddings=False),
    dict(pos_emb="rope", n_kv_head=2, qk_norm=True, mlp="relu2"),
]
PROMPTS = [[5, 17, 3], list(range(10, 30)), [9], [1, 2, 3, 4, 5, 6, 7], list(range(40, 52))]  # lengths 3, 20, 1, 7, 12
TOL = dict(atol=1e-6, rtol=1e-5)  # float summation order only (see test_generate.py); a wrong position is ~1e-2


def variant_id(v: dict) -> str:
    return "-".join(f"{k}={val}" for k, val in v.items())


def tiny(seed: int = 0, **overrides: object) -> GPT:
    return tiny_gpt(seed, **{"max_seq_len": CONTEXT, **overrides})


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_batch_equals_one_prompt_at_a_time(variant: dict) -> None:
    model = tiny(**variant)
    new = 12  # longest prompt 20 + 12 new tokens = 32: exactly the context
    alone = [generate(model, p, max_new_tokens=new, temperature=0) for p in PROMPTS]
    assert generate_batch(model, PROMPTS, max_new_tokens=new) == alone
    assert all(len(a) == new for a in alone)
    # eos chosen from one row's output, so that row stops early while the others run on
    eos = alone[3][4]
    alone_eos = [generate(model, p, max_new_tokens=new, temperature=0, eos_id=eos) for p in PROMPTS]
    batch_eos = generate_batch(model, PROMPTS, max_new_tokens=new, eos_id=eos)
    assert batch_eos == alone_eos
    assert len(batch_eos[3]) <= 5 and batch_eos[3][-1] == eos


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[3]], ids=variant_id)
def test_padded_logits_match_unpadded(variant: dict) -> None:
    """Prefill and decode logits of every real position equal the unpadded sequence's, row by row."""
    model = tiny(**variant)
    lengths = [4, 11, 7]
    seqs = [torch.randint(0, VOCAB, (n + 5,)) for n in lengths]  # prompt + 5 decode steps
    longest = max(lengths)
    pad = torch.tensor([longest - n for n in lengths])
    x = torch.stack(
        [torch.cat([torch.zeros(p, dtype=torch.long), s[:n]]) for s, n, p in zip(seqs, lengths, pad, strict=True)]
    )
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]  # (n + 5, V) each
        cache = model.new_cache(batch_size=3)
        prefill = model(x, cache, pad)  # (3, longest, V)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(prefill[b, longest - n :], full[b][:n], **TOL)
            assert torch.isfinite(prefill[b]).all()  # padding queries see themselves: no NaN anywhere
        for t in range(5):
            step = model(
                torch.stack([s[n + t] for s, n in zip(seqs, lengths, strict=True)])[:, None], cache, pad
            )  # (3, 1, V)
            for b, n in enumerate(lengths):
                torch.testing.assert_close(step[b, 0], full[b][n + t], **TOL)


def test_sampling_seeded_and_top_k_one_is_greedy() -> None:
    model = tiny(pos_emb="rope")
    a = generate_batch(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == generate_batch(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=3)
    assert a != generate_batch(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=4)
    greedy = generate_batch(model, PROMPTS, max_new_tokens=8)
    assert generate_batch(model, PROMPTS, max_new_tokens=8, temperature=0.7, top_k=1, seed=5) == greedy


def test_per_row_seeds_sample_each_row_as_alone_whatever_the_batch() -> None:
    """`seeds=`: row b draws from its own generator, so its tokens are `generate(prompt, seed=seeds[b])`'s, in any
    batch and beside any rows (what lets `generate --prompt-file` resume with another --batch-size); one `seed`
    for the batch gave draws that depended on the batch's other rows."""
    model = tiny(pos_emb="rope")
    sampled = dict(max_new_tokens=10, temperature=1.0, top_k=20)
    seeds = [11, 12, 13, 14, 15]
    alone = [generate(model, p, seed=s, **sampled) for p, s in zip(PROMPTS, seeds, strict=True)]
    assert generate_batch(model, PROMPTS, seeds=seeds, **sampled) == alone
    assert generate_batch(model, PROMPTS[::2], seeds=seeds[::2], **sampled) == alone[::2]  # other companions
    assert generate_batch(model, PROMPTS[1:2], seeds=seeds[1:2], **sampled) == alone[1:2]
    assert generate_batch(model, PROMPTS, seed=11, **sampled)[1] != alone[1]  # (one generator: not so)


def test_same_length_prompts_and_mode_restored() -> None:
    model = tiny(dropout=0.3).train()
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # no padding at all: the unmasked fast path
    out = generate_batch(model, prompts, max_new_tokens=6)
    assert model.training
    assert out == [generate(model, p, max_new_tokens=6, temperature=0) for p in prompts]


def test_errors_and_edges() -> None:
    model = tiny()
    # in generate.prompt_too_long's words, as serve, chat and eval refuse a prompt (it had a wording of its own)
    with pytest.raises(LmforgeError) as e:
        generate_batch(model, PROMPTS, max_new_tokens=13)
    assert str(e.value) == (
        "the longest prompt is 20 tokens and the model's context is 32, which holds 19 beside 13 new tokens "
        "(max_new_tokens); shorten it to at most 19 tokens (1 fewer) or lower max_new_tokens to at most 12"
    )
    with pytest.raises(LmforgeError, match="empty"):
        generate_batch(model, [[1], []], max_new_tokens=2)
    with pytest.raises(LmforgeError, match="top_p"):
        generate_batch(model, [[1]], max_new_tokens=2, top_p=1.5)
    with pytest.raises(LmforgeError, match="max_new_tokens"):
        generate_batch(model, [[1]], max_new_tokens=-1)
    assert generate_batch(model, [], max_new_tokens=3) == []
    assert generate_batch(model, [[1], [2, 3]], max_new_tokens=0) == [[], []]
    # an empty prompt starts after eos, as in generate
    assert generate_batch(model, [[], [4, 5]], max_new_tokens=4, eos_id=0) == [
        generate(model, [], max_new_tokens=4, temperature=0, eos_id=0),
        generate(model, [4, 5], max_new_tokens=4, temperature=0, eos_id=0),
    ]


def test_recurrent_model_falls_back_to_generate() -> None:
    from lmforge.models.rnn import RNNLM, RNNConfig

    torch.manual_seed(0)
    model = RNNLM(RNNConfig(vocab_size=VOCAB, n_layer=1, d_model=16))
    model.init_weights()
    model.eval()
    out = generate_batch(model, [[1, 2], [3]], max_new_tokens=5)
    assert out == [generate(model, p, max_new_tokens=5, temperature=0) for p in ([1, 2], [3])]


# --------------------------------------------------------------------------------------------
# Evaluation: batched answers give the metrics of one generate() call per prompt


def _finetuned(tmp_path: Path):  # noqa: ANN202 - a finetune.Finetuned
    from lmforge.adapt.load import Finetuned
    from lmforge.tokenizer.train import train_char

    tok = train_char(["abcdefghijklmnopqrstuvwxyz <>|\n.,!?ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
    # init_std 0.5: a random model whose greedy answer depends on the prompt (0.02 answers everything alike)
    cfg = GPTConfig(
        vocab_size=tok.vocab_size, max_seq_len=64, n_layer=2, n_head=2, d_model=32, pos_emb="rope", init_std=0.5
    )
    torch.manual_seed(1)
    model = GPT(cfg)
    model.init_weights()
    return Finetuned(model.eval(), tok, None, None, None, tmp_path)


def _sequential(ft, prompts: list[list[int]], max_new_tokens: int) -> list[str]:  # noqa: ANN001
    """What evaluation did before batching: one generate() per prompt, truncated to leave room."""
    from lmforge.detokenize import shown_text

    room = ft.model.cfg.max_seq_len - max_new_tokens
    eos = ft.tokenizer.eos_id
    outs = [generate(ft.model, p[-room:], max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos) for p in prompts]
    # (shown_text: the text as generate shows it, a character cut at the end dropped)
    decode = functools.partial(ft.tokenizer.decode, skip_special_tokens=True)
    return [shown_text(decode, [t for t in o if t != eos], ft.tokenizer).strip() for o in outs]


def test_eval_metrics_equal_sequential_path(tmp_path: Path) -> None:
    from lmforge.chat import ChatTemplate
    from lmforge.data.formats import translate_prompt
    from lmforge.eval.tasks import ANSWER_BATCH, exact_match, task_metrics

    ft = _finetuned(tmp_path)
    words = "the cat sat on a mat while dogs ran far away over hills and rivers".split()
    n_rows, new = ANSWER_BATCH + 5, 8  # more than one batch, the last one partial
    questions = [" ".join(words[i % 7 : i % 7 + 1 + i % 9]) + "?" for i in range(n_rows)]  # 2..10 words: ragged
    template = ChatTemplate()
    prompts = [
        template.prompt_ids(ft.tokenizer, [{"role": "user", "content": q}], budget=64 - new)[0] for q in questions
    ]
    expected = _sequential(ft, prompts, new)
    assert len(set(expected)) > 1  # the prompts really lead to different answers
    # every third reference is the sequential prediction itself: em matches only if batching gives the same answers
    rows = [
        {"question": q, "answer": e if i % 3 == 0 else "xyz"}
        for i, (q, e) in enumerate(zip(questions, expected, strict=True))
    ]
    m = task_metrics(
        ft, rows, path="rows", max_new_tokens=new, task="qa", fields={"question": "question", "answer": "answer"}
    )
    want_em = sum(exact_match(e, r["answer"]) for e, r in zip(expected, rows, strict=True)) / n_rows
    assert want_em >= 7 / n_rows
    assert m["em"] == want_em and m["n"] == n_rows
    assert [s["prediction"] for s in m["samples"]] == expected[:3]

    sources = [" ".join(words[i % 5 : i % 5 + 2 + i % 6]) for i in range(n_rows)]
    hyps = _sequential(ft, [ft.tokenizer.encode(translate_prompt(s)) for s in sources], new)
    tr_rows = [{"source": s, "target": h} for s, h in zip(sources, hyps, strict=True)]
    pytest.importorskip("sacrebleu")
    t = task_metrics(
        ft, tr_rows, path="rows", max_new_tokens=new, task="translate", fields={"source": "source", "target": "target"}
    )
    assert t["chrf"] == pytest.approx(100.0) and [s["prediction"] for s in t["samples"]] == hyps[:3]


def test_penalties_min_p_and_on_token_per_row() -> None:
    """`generate_batch` takes `generate`'s penalties (each row's own prompt and output), and an
    `on_token(row, token)` that returns True ends that row there: each row as `generate` gives it alone."""
    from lmforge.sampling import Penalties

    model = tiny(pos_emb="rope", init_std=0.5)
    penalties = Penalties(presence=0.5, frequency=0.3, repetition=1.3)
    alone = [generate(model, p, max_new_tokens=10, temperature=0, penalties=penalties) for p in PROMPTS]
    assert alone != [generate(model, p, max_new_tokens=10, temperature=0) for p in PROMPTS]  # they change it
    assert generate_batch(model, PROMPTS, max_new_tokens=10, penalties=penalties) == alone
    seen: list[tuple[int, int]] = []

    def on_token(row: int, token: int) -> bool:
        seen.append((row, token))
        return row == 1 and len([r for r, _ in seen if r == 1]) == 3  # row 1 ends at its 3rd token

    rows = generate_batch(model, PROMPTS, max_new_tokens=10, penalties=penalties, on_token=on_token)
    assert rows == alone[:1] + [alone[1][:3]] + alone[2:]
    assert sorted(seen) == sorted((b, t) for b, r in enumerate(rows) for t in r)  # each kept token, once


def test_on_token_sees_each_rows_stop_id_as_generates_does() -> None:
    """`on_token(row, token)` is called with each token a row gets, its closing stop id included, as `generate`
    calls its `on_token` (the batched loop skipped the call for a stop id: `token in stops or on_token(...)`)."""
    model = tiny(pos_emb="rope", init_std=0.5)
    free = [generate(model, p, max_new_tokens=10, temperature=0) for p in PROMPTS]
    eos = free[0][3]  # a token row 0 generates: it ends there
    alone = []
    for p in PROMPTS:
        got: list[int] = []
        alone.append(generate(model, p, max_new_tokens=10, temperature=0, eos_id=eos, on_token=got.append))
        assert got == alone[-1]
    seen: list[tuple[int, int]] = []
    rows = generate_batch(model, PROMPTS, max_new_tokens=10, eos_id=eos, on_token=lambda b, t: seen.append((b, t)))
    assert rows == alone and rows[0][-1] == eos
    assert seen == [(b, t) for _, b, t in sorted((i, b, t) for b, r in enumerate(rows) for i, t in enumerate(r))]
