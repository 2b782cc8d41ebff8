"""Generation: KV cache == no cache, sampling rules, seeding, sliding window, errors, streaming decode."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmforge.detokenize import StreamDecoder
from lmforge.errors import LmforgeError
from lmforge.generate import generate
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.sampling import Penalties, sample_next
from tests.conftest import have_cpp_compiler

VOCAB = 96
CONTEXT = 24
# the switches that change attention or positions, crossed with norm/MLP (bias and tying are
# exercised by the two extra entries)
VARIANTS = [
    dict(pos_emb=p, norm=n, mlp=m, n_kv_head=kv)
    for p, n, m, kv in itertools.product(["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"], [0, 2])
] + [dict(pos_emb="rope", bias=False, tie_embeddings=False), dict(pos_emb="learned", bias=False, n_kv_head=1)]


def variant_id(v: dict) -> str:
    return "-".join(f"{k}={val}" for k, val in v.items())


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and when the other core is busy every OpenMP
    region waits for it (measured: 0.5 s instead of 6 ms per tiny forward+backward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0, **overrides: object) -> GPT:
    cfg = GPTConfig(
        **{"vocab_size": VOCAB, "max_seq_len": CONTEXT, "n_layer": 2, "n_head": 4, "d_model": 32, **overrides}
    )
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.init_weights()
    return model.eval()


def greedy_reference(model: GPT, prompt: list[int], n: int) -> list[int]:
    """argmax of a full forward pass over the last max_seq_len tokens, one token at a time."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids[-model.cfg.max_seq_len :]]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


# Cache vs no cache: the same math through different kernels (SDPA with is_causal, with an explicit
# mask, or with one query; matmuls over 1 vs T rows), so sums are reordered. Measured max |diff| is
# 1.8e-7 on logits of size ~1 (1-2 float32 ulps); atol 1e-6 / rtol 1e-5 leaves room for other CPUs,
# while a wrong position, mask or cache slot shows up as differences of ~1e-2.
TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_kv_cache_logits_match_full_forward(variant: dict) -> None:
    model = tiny(**variant)
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(idx)  # (2, 20, V)
        cache = model.new_cache(batch_size=2)
        torch.testing.assert_close(model(idx[:, :8], cache), full[:, :8], **TOL)  # prefill, empty cache
        torch.testing.assert_close(model(idx[:, 8:12], cache), full[:, 8:12], **TOL)  # chunk after cached tokens
        for t in range(12, 20):  # one-token decode
            torch.testing.assert_close(model(idx[:, t : t + 1], cache), full[:, t : t + 1], **TOL)
        assert cache.pos == 20
        cache.reset()
        torch.testing.assert_close(model(idx[:, :5], cache), full[:, :5], **TOL)


@pytest.mark.skipif(not have_cpp_compiler(), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.timeout(900)  # cold inductor cache: 114 s at load 6 (30 s warm); 300 s ran out at load 10
def test_compiled_decode_gives_the_same_tokens_and_compiles_once() -> None:
    """generate(compile=True): the eager tokens (greedy and seeded sampling, learned positions and rope +
    GQA), compiled once for a model shape (later calls, other prompt lengths, another model of the same
    shape and other sampling settings add no graph), and never used on a failed model."""
    from torch._dynamo.utils import counters

    import lmforge.generate as gen

    for variant in (dict(pos_emb="learned"), dict(pos_emb="rope", mlp="swiglu", n_kv_head=2)):
        model = tiny(**variant)
        before = counters["stats"]["unique_graphs"]
        for prompt in ([5], [1, 2, 3, 4, 5, 6, 7]):  # a one-token prefill stays eager too
            eager = generate(model, prompt, max_new_tokens=12, temperature=0)
            assert generate(model, prompt, max_new_tokens=12, temperature=0, compile=True) == eager
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == before + 1  # one graph for this shape: it was compiled, and only once
        sampled = dict(max_new_tokens=15, temperature=0.9, top_k=20, seed=4)
        assert generate(model, [3, 1], **sampled, compile=True) == generate(model, [3, 1], **sampled)
        other = tiny(seed=1, **variant)
        assert generate(other, [2, 9], max_new_tokens=10, temperature=0, compile=True) == generate(
            other, [2, 9], max_new_tokens=10, temperature=0
        )
        assert counters["stats"]["unique_graphs"] == graphs, "recompiled for the same shape"
        assert model not in gen._compile_failed and other not in gen._compile_failed


def test_cache_overflow_is_value_error() -> None:
    model = tiny()
    cache = model.new_cache(batch_size=1)
    with torch.no_grad():
        model(torch.zeros(1, CONTEXT - 1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, 2, dtype=torch.long), cache)


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[-3]], ids=variant_id)
def test_generate_cache_equals_no_cache(variant: dict) -> None:
    model = tiny(**variant)
    prompt = [5, 17, 3, 42, 9]
    greedy = generate(model, prompt, max_new_tokens=12, temperature=0)
    assert greedy == generate(model, prompt, max_new_tokens=12, temperature=0, use_cache=False)
    assert greedy == greedy_reference(model, prompt, 12)
    sampled = generate(model, prompt, max_new_tokens=12, temperature=1.0, top_k=20, seed=7)
    assert sampled == generate(model, prompt, max_new_tokens=12, temperature=1.0, top_k=20, seed=7, use_cache=False)


def test_greedy_equivalents() -> None:
    model = tiny(pos_emb="rope")
    prompt = [1, 2, 3]
    greedy = greedy_reference(model, prompt, 10)
    assert generate(model, prompt, max_new_tokens=10, temperature=0) == greedy
    assert generate(model, prompt, max_new_tokens=10, temperature=0) == greedy  # deterministic
    assert generate(model, prompt, max_new_tokens=10, top_k=1, seed=1) == greedy
    assert generate(model, prompt, max_new_tokens=10, top_p=1e-6, seed=2) == greedy
    assert generate(model, prompt, max_new_tokens=10, top_p=0, seed=2) == greedy  # OpenAI's "top token only"


def test_penalties_against_hand_computed_logits_and_a_reference_loop() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([2.0, 1.0, 0.0, 0.0])  # tokens 0 and 1 generated; token 3 only in the prompt
    seen = torch.tensor([True, True, False, True])
    got = Penalties(presence=0.5, frequency=0.25, repetition=2.0).apply(logits, counts, seen)
    # repetition: 2/2, -1*2, (unseen 0.5), 3/2; then minus 0.25*count + 0.5*(count > 0)
    assert got.tolist() == [[1.0 - 1.0, -2.0 - 0.75, 0.5, 1.5]]
    assert Penalties().off and not Penalties(repetition=1.1).off and not Penalties(bias=((0, 1.0),)).off
    biased = Penalties(bias=((2, -100.0), (1, 5.0))).apply(logits, counts, seen)
    assert biased.tolist() == [[2.0, 4.0, -99.5, 3.0]]
    with pytest.raises(LmforgeError, match=r"logit bias of token 3 must be in \[-100, 100\]"):
        Penalties(bias=((3, 101.0),))
    with pytest.raises(LmforgeError, match=r"presence penalty must be in \[-2, 2\]"):
        Penalties(presence=2.5)
    with pytest.raises(LmforgeError, match="repetition penalty must be > 0"):
        Penalties(repetition=0)

    model = tiny(pos_emb="rope")
    prompt = [1, 2, 3, 1, 2, 3]
    penalties = Penalties(presence=0.3, frequency=0.2, repetition=1.3)
    ids = list(prompt)  # the same rule, written out on a full forward pass per token
    with torch.no_grad():
        for _ in range(12):
            scores = model(torch.tensor([ids]))[0, -1].clone()
            for token in set(ids):
                scores[token] = scores[token] / 1.3 if scores[token] > 0 else scores[token] * 1.3
            for token in set(ids[len(prompt) :]):
                scores[token] -= 0.2 * ids[len(prompt) :].count(token) + 0.3
            ids.append(int(scores.argmax()))
    new = generate(model, prompt, max_new_tokens=12, temperature=0, penalties=penalties)
    assert new == ids[len(prompt) :]
    assert new != generate(model, prompt, max_new_tokens=12, temperature=0)  # they change the greedy path
    assert generate(model, prompt, max_new_tokens=12, temperature=0, penalties=Penalties()) == generate(
        model, prompt, max_new_tokens=12, temperature=0
    )


@pytest.mark.parametrize("repetition", [1e-300, 1e300])
def test_an_extreme_repetition_penalty_samples_instead_of_failing_on_nan(repetition: float) -> None:
    """A penalty of 1e-300 divided the seen tokens' positive scores to inf (1e300: multiplied the negative ones
    to -inf), and sampling died on "probability tensor contains either inf, nan or element < 0"; the scores
    now stay finite, so a seen positive token is all but certain (1e-300) or seen tokens all but banned."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([True, True, False, False])
    got = Penalties(repetition=repetition).apply(logits, torch.zeros(4), seen)
    assert bool(torch.isfinite(got).all())
    model = tiny()
    out = generate(
        model, [1, 2, 3], max_new_tokens=4, temperature=0.8, seed=0, penalties=Penalties(repetition=repetition)
    )
    assert len(out) == 4


def test_seeded_sampling() -> None:
    model = tiny()
    rng = torch.get_rng_state()
    a = generate(model, [4, 8], max_new_tokens=20, temperature=1.0, seed=123)
    b = generate(model, [4, 8], max_new_tokens=20, temperature=1.0, seed=123)
    c = generate(model, [4, 8], max_new_tokens=20, temperature=1.0, seed=124)
    assert a == b and a != c
    assert torch.equal(torch.get_rng_state(), rng)  # a local generator; the global RNG is untouched


def test_sliding_window_past_context() -> None:
    """More tokens than max_seq_len: the last max_seq_len tokens are re-run without a cache."""
    for pos_emb in ("learned", "rope"):
        model = tiny(pos_emb=pos_emb)
        prompt = list(range(10, 10 + CONTEXT - 4))
        out = generate(model, prompt, max_new_tokens=15, temperature=0)
        assert len(out) == 15
        assert out == greedy_reference(model, prompt, 15)
        assert out == generate(model, prompt, max_new_tokens=15, temperature=0, use_cache=False)
    full = generate(model, list(range(CONTEXT)), max_new_tokens=3, temperature=0)  # a prompt that fills the context
    assert full == greedy_reference(model, list(range(CONTEXT)), 3)


def test_sliding_window_keeps_the_prefix_first() -> None:
    """Past the context the window was `ids[-max_len:]`, which drops an imported tokenizer's BOS that every prompt
    and training example starts with; with `prefix` it is the BOS, then the last max_len - 1 tokens (a reference
    loop written here). A prompt that does not start with the prefix slides as before."""
    model, bos = tiny(init_std=0.5), 3  # (0.5: varied greedy text)
    prompt = [bos, *range(10, 10 + CONTEXT - 5)]

    def reference(prompt: list[int], n: int) -> list[int]:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                window = ids if len(ids) <= CONTEXT else [bos, *ids[-(CONTEXT - 1) :]]
                ids.append(int(model(torch.tensor([window]))[0, -1].argmax()))
        return ids[len(prompt) :]

    expected = reference(prompt, 20)
    for use_cache in (True, False):
        assert generate(model, prompt, max_new_tokens=20, temperature=0, use_cache=use_cache, prefix=[bos]) == expected
    assert generate(model, prompt, max_new_tokens=20, temperature=0) != expected  # (the plain window differs)
    no_bos = prompt[1:]
    assert generate(model, no_bos, max_new_tokens=20, temperature=0, prefix=[bos]) == greedy_reference(
        model, no_bos, 20
    )


def test_generate_chat_and_serve_refuse_a_long_prompt_in_one_wording() -> None:
    """generate, chat and serve refuse a prompt the model cannot see whole by one rule but said it three ways
    ("prompt is N tokens but the model's context is C; shorten the prompt", "with the chat template it is N tokens,
    and the model's context (C tokens) holds ...", "N tokens + M to generate ('max_tokens'); the context is C: ask
    for at most ..."); one builder says the same facts for each, in each command's own flag name."""
    from lmforge.generate import prompt_too_long

    assert prompt_too_long("the prompt is", 1200, 1024) == (
        "the prompt is 1,200 tokens and the model's context is 1,024; shorten it to at most 1,024 tokens (176 fewer)"
    )
    assert prompt_too_long("the messages are", 1000, 1024, max_new_tokens=200, flag="--max-new-tokens", it="them") == (
        "the messages are 1,000 tokens and the model's context is 1,024, which holds 824 beside 200 new tokens "
        "(--max-new-tokens); shorten them to at most 824 tokens (176 fewer) or lower --max-new-tokens to at most 24"
    )
    assert prompt_too_long("the prompt is", 1024, 1024, max_new_tokens=1) == (  # (no new tokens asked for)
        "the prompt is 1,024 tokens and the model's context is 1,024, which holds 1,023 beside 1 new token; shorten "
        "it to at most 1,023 tokens (1 fewer)"
    )
    # new tokens that fill the context alone (serve's default 'max_tokens' limit is 512; a tiny model's context 128):
    # the advice was "holds -384 beside 512 new tokens ...; shorten it to at most -384 tokens (390 fewer)"
    assert prompt_too_long("the prompt is", 6, 128, max_new_tokens=512, flag="'max_tokens'") == (
        "the prompt is 6 tokens and the model's context is 128, which holds no prompt beside 512 new tokens "
        "('max_tokens'); lower 'max_tokens' to at most 122"
    )
    assert prompt_too_long("the prompt is", 200, 128, max_new_tokens=128, flag="'max_tokens'") == (
        "the prompt is 200 tokens and the model's context is 128, which holds no prompt beside 128 new tokens "
        "('max_tokens'); shorten it to at most 127 tokens and lower 'max_tokens' to fit beside it"
    )


def test_prompt_errors_and_eos() -> None:
    model = tiny()
    with pytest.raises(LmforgeError) as raised:  # (the window slides on past the context: max_new_tokens fits)
        generate(model, list(range(CONTEXT + 1)), max_new_tokens=1)
    assert str(raised.value) == (
        f"the prompt is {CONTEXT + 1} tokens and the model's context is {CONTEXT}; shorten it to at most {CONTEXT} "
        "tokens (1 fewer)"
    )
    with pytest.raises(LmforgeError, match="empty"):
        generate(model, [], max_new_tokens=1)
    with pytest.raises(LmforgeError, match="temperature"):
        generate(model, [1], max_new_tokens=1, temperature=-1.0)
    first = greedy_reference(model, [0], 1)[0]
    assert generate(model, [], max_new_tokens=5, temperature=0, eos_id=0)[0] == first  # empty prompt starts at eos
    seen: list[int] = []
    out = generate(model, [0], max_new_tokens=5, temperature=0, eos_id=first, on_token=seen.append)
    assert out == [first] and seen == [first]  # stops at eos, which is returned
    assert generate(model, [0], max_new_tokens=0) == []


def test_mode_restored_and_dtype_followed() -> None:
    model = tiny(dropout=0.5).train()
    a = generate(model, [1, 2], max_new_tokens=6, temperature=0)
    assert model.training  # restored
    assert a == generate(model.eval(), [1, 2], max_new_tokens=6, temperature=0)  # ran in eval mode (no dropout)
    bf16 = tiny().to(torch.bfloat16)
    assert bf16.new_cache(1).k.dtype == torch.bfloat16
    assert len(generate(bf16, [1, 2], max_new_tokens=4, temperature=0.8, seed=0)) == 4


def test_sample_next_filters() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(2000, 1)  # (2000, 5)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {1, 2}
    probs = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.05, 0.05]])).repeat(2000, 1)
    # top_p 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it -> {1, 2}
    assert set(sample_next(probs, top_p=0.7, generator=g).tolist()) == {1, 2}
    assert set(sample_next(probs, generator=g).tolist()) == {0, 1, 2, 3, 4}
    assert sample_next(logits[:3], temperature=0).tolist() == [1, 1, 1]
    counts = torch.bincount(sample_next(probs, generator=g), minlength=5) / 2000
    torch.testing.assert_close(counts, probs[0].exp(), atol=0.04, rtol=0)  # draws follow softmax(logits)
    # a tiny temperature overflowed logits / T to inf (softmax NaN, a multinomial error): it is greedy now
    for tiny in (1e-30, 1e-40, 1e-45):
        assert sample_next(logits[:3], temperature=tiny, generator=g).tolist() == [1, 1, 1]


def test_stream_decoder_utf8_split_across_byte_tokens() -> None:
    text = "héllo, 世界 🙂!"

    def decode(ids: list[int]) -> str:  # a byte-level tokenizer: one token per byte
        return bytes(ids).decode("utf-8", errors="replace")

    ids = list(text.encode("utf-8"))
    assert len(ids) > len(text)  # multi-byte characters really are split across tokens
    stream = StreamDecoder(decode)
    pieces = [stream.feed(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert "" in pieces  # the first bytes of 世 / 🙂 were held back
    assert stream.flush() == ""

    truncated = StreamDecoder(decode)  # a stream that ends mid-character drops that character at flush
    out = "".join(truncated.feed(i) for i in "a🙂".encode()[:3])
    assert out == "a" and truncated.flush() == ""


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_stream_decoder_shows_a_u_fffd_that_can_never_complete_at_once(kind: str) -> None:
    """A byte that is no UTF-8 (ff) decodes to U+FFFD, which the stream held back as a character still to come
    until a whole character followed: ff e4 bd a0 showed nothing until 你 (a stall of as many tokens as the model
    wrote bytes), and a reply ending in ff dropped it. With the tokenizer, a U+FFFD comes out with its token once
    no byte can complete it; the start of a character (e4, e4 bd) still waits. Byte-level BPE decodes ff e4 bd a0
    as "\ufffd你"; byte fallback (lmforge's char tokenizer) as four U+FFFD, the whole run of bytes being invalid."""
    from lmforge.detokenize import continuation_decoder
    from lmforge.tokenizer.tokenizer import bytes_to_unicode
    from lmforge.tokenizer.train import train_bpe, train_char

    if kind == "bpe":
        tok = train_bpe(["hello world"], vocab_size=300)
        byte = {b: tok.hf.token_to_id(ch) for b, ch in bytes_to_unicode().items()}
    else:
        tok = train_char(["hello world"])
        byte = {b: tok.hf.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    ff, e4, bd, a0, h = byte[0xFF], byte[0xE4], byte[0xBD], byte[0xA0], tok.encode("h")[0]

    def streamed(ids: list[int]) -> list[str]:
        stream = StreamDecoder(tok.decode, tok)
        return [stream.feed(i) for i in ids] + [stream.flush()]

    last = "你" if kind == "bpe" else "\ufffd" * 3
    assert streamed([ff, e4, bd, a0]) == ["\ufffd", "", "", last, ""]
    assert streamed([h, ff]) == ["h", "\ufffd", ""]  # the end: shown, as it was never a cut character
    assert streamed([h, e4, bd, a0]) == ["h", "", "", "你", ""]
    assert streamed([h, e4, bd]) == ["h", "", "", ""]  # cut by the token limit: dropped at the end
    assert streamed([e4, h]) == ["", "\ufffdh", ""]  # (a start that another character ended)
    assert streamed([bd, h]) == ["\ufffd", "h", ""]  # a stray continuation byte: final at once
    assert streamed([ff, e4]) == ["\ufffd", "", ""]  # (ff's, then a start cut by the token limit)
    # a continuation of ids that end in a character's start: bd alone is no UTF-8, after e4 it may still become 你
    for echoed in (True, False):  # (serve's echo of token ids: the e4 is in the continuation's text)
        stream = StreamDecoder(continuation_decoder(tok.decode, [h, e4], echoed=echoed), tok, [h, e4])
        assert [stream.feed(i) for i in (bd, a0)] + [stream.flush()] == ["", "你", ""], echoed


def test_continuation_keeps_its_first_space_with_a_unigram_tokenizer() -> None:
    """A SentencePiece-style decoder drops the word-start marker of a lone first piece: the continuation is
    decoded after its prompt instead, so `generate` prints "I will come", not "I willcome"."""
    from lmforge.detokenize import continuation_decoder
    from lmforge.tokenizer.train import train_unigram
    from tests.conftest import shakespeare_text

    tok = train_unigram(shakespeare_text(40_000).split("\n\n"), vocab_size=600)
    prompt, whole = tok.encode("I will"), tok.encode("I will come")
    assert whole[: len(prompt)] == prompt
    rest = whole[len(prompt) :]
    assert tok.decode(rest) == "come"  # alone: the space is lost
    assert continuation_decoder(tok.decode, prompt)(rest) == " come"


def test_a_continuation_that_completes_a_character_its_prompt_ids_cut_shows_it_whole() -> None:
    """A serve prompt given as token ids can end inside a character (the first 2 byte tokens of 你, e4 bd); the
    continuation's a0 completes it. Decoded alone, the continuation began with U+FFFD (streamed and returned) and
    the character was lost; it now begins with 你."""
    from lmforge.generate import StreamDecoder, continuation_decoder
    from lmforge.tokenizer.train import train_bpe

    tok = train_bpe(["hello world"], vocab_size=300)
    ids = tok.encode("你好")
    assert len(ids) == 6  # one byte token each
    decode = continuation_decoder(tok.decode, ids[:2])
    assert decode(ids[2:]) == "你好"
    stream = StreamDecoder(decode)
    assert [stream.feed(i) for i in ids[2:]] == ["你", "", "", "好"] and stream.flush() == ""
    assert decode(tok.encode("a")) == "a"  # (never completed: e4 bd, then a; the U+FFFD is the prompt's text)


def test_eval_answers_cut_mid_character_end_at_a_whole_character(tmp_path):
    """`eval --task` (and a fine-tune's final scoring) decoded its answers on their own: one cut by
    --max-new-tokens in the middle of a character ended with U+FFFD, shown in the samples and scored, where
    generate, chat and serve drop it (`shown_text`, the one rule for all of them: a U+FFFD that a stray byte makes,
    which no byte can complete, is text, shown by generate's stream and scored)."""
    from lmforge.adapt.load import load_finetuned
    from lmforge.detokenize import may_complete
    from lmforge.eval.tasks import _answers
    from lmforge.tokenizer.train import train_bpe
    from tests.test_finetune import make_base

    text = (Path(__file__).parent / "data" / "hongloumeng_ch1.txt").read_text(encoding="utf-8")
    ft = load_finetuned(make_base(tmp_path, max_seq_len=64, tok=train_bpe([text], 300)), torch.device("cpu"))
    prompts = [ft.tokenizer.encode(p) for p in ("红楼", "甄士隐", "贾雨村", "石头", "女娲", "通灵宝玉", "神瑛", "绛珠")]
    answers = _answers(ft, prompts, max_new_tokens=7)
    new = [generate(ft.model, p, max_new_tokens=7, temperature=0.0) for p in prompts]
    raw = [ft.tokenizer.decode(ids) for ids in new]
    cut = [r.endswith("\ufffd") and may_complete(ft.tokenizer, ids) for r, ids in zip(raw, new, strict=True)]
    assert any(cut)  # (these prompts do cut a character)
    for r, ids, answer, was_cut in zip(raw, new, answers, cut, strict=True):
        stream = StreamDecoder(ft.tokenizer.decode, ft.tokenizer)
        shown = "".join(stream.feed(i) for i in ids) + stream.flush()  # (what generate shows)
        assert answer == shown.strip() and (answer == r.strip() or was_cut and r.startswith(answer)), (answer, r)


def test_generate_from_checkpoint_returns_what_it_streamed(tmp_path):
    """Byte-level BPE on Chinese: a reply cut by max_new_tokens mid-character was streamed without its
    U+FFFD but returned with it (8 of these 16 seeds differed). (A U+FFFD the random model's stray bytes make is
    its text, streamed and returned: `test_stream_decoder_shows_a_u_fffd_that_can_never_complete_at_once`.)"""
    import io

    from lmforge.generate import generate_from_checkpoint
    from lmforge.tokenizer.train import train_bpe
    from tests.test_finetune import make_base

    text = (Path(__file__).parent / "data" / "hongloumeng_ch1.txt").read_text(encoding="utf-8")
    base = make_base(tmp_path, max_seq_len=64, tok=train_bpe([text], 300))
    for seed in range(16):
        out = io.StringIO()
        got = generate_from_checkpoint(base, prompt="红楼", max_new_tokens=7, seed=seed, stream=out)
        assert out.getvalue() == "红楼" + got, seed


def test_generate_on_a_terminal_that_is_not_utf8(tmp_path, monkeypatch):
    """A zh_CN.GBK (or Latin-1) locale's stdout cannot hold every character a model writes (U+FFFD from a stray
    byte token, an emoji): `lmforge generate` died with a UnicodeEncodeError traceback on the first one; it now
    writes it as a backslash escape, as Python writes stderr."""
    import io
    import sys

    from lmforge import cli
    from tests.test_finetune import make_base

    base = make_base(tmp_path, max_seq_len=64)
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="gbk", write_through=True))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", str(base), "--prompt", "红楼😀", "--max-new-tokens", "3", "--seed", "0"])
    assert exit_.value.code == 0
    assert raw.getvalue().startswith("红楼".encode("gbk") + b"\\U0001f600")


def test_ctrl_c_mid_stream_ends_the_text_s_line_before_the_interrupted_line(tmp_path: Path) -> None:
    """A real `lmforge generate --prompt` stopped by SIGINT mid-stream: the streamed text ends its line, so that
    "lmforge: interrupted" (stderr, exit 130) is a line of its own on a terminal; it was glued to the text."""
    import signal
    import time

    from tests.conftest import start_cli
    from tests.test_finetune import make_base

    base = make_base(tmp_path, max_seq_len=32)
    proc = start_cli("generate", str(base), "--prompt", "红楼", "--max-new-tokens", "100000", "--seed", "0")
    # a forked child (tests/cli_fork.py) writes its stdout to a file, watched here; a spawned one is given 10 s
    out = Path(proc.child["stdout"]) if hasattr(proc, "child") else None
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if out.stat().st_size > 40 if out is not None else time.monotonic() > deadline - 50:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    stdout, stderr = proc.communicate()
    assert stdout.startswith("红楼") and len(stdout) > 10 and stdout.endswith("\n")
    assert stderr == "lmforge: interrupted\n", stderr


def test_stop_ids_end_generation_like_eos() -> None:
    """`stop_ids` end a sequence as `eos_id` does (the stop token included), in `generate` and per row in
    `generate_batch`."""
    from lmforge.generate import generate_batch

    model = tiny()
    prompts = [[1, 2, 3], [4, 5]]
    free = [greedy_reference(model, p, 12) for p in prompts]
    stop = next(t for t in free[0][2:] if t not in free[0][:2])  # a token the first row reaches partway
    want = [f[: f.index(stop) + 1] if stop in f else f for f in free]
    assert len(want[0]) < 12
    for eos_id in (None, VOCAB - 1):
        assert generate(model, prompts[0], max_new_tokens=12, temperature=0, eos_id=eos_id, stop_ids=[stop]) == want[0]
        assert generate_batch(model, prompts, max_new_tokens=12, eos_id=eos_id, stop_ids={stop}) == want
    assert generate(model, prompts[0], max_new_tokens=12, temperature=0, eos_id=stop, stop_ids=[]) == want[0]


def test_stop_ids_of_a_run_and_of_its_fine_tunes(tmp_path: Path) -> None:
    """generation.json gives a run's stop ids; a fine-tune without one uses its base's; a damaged file is a
    one-line CheckpointError."""
    import json

    from lmforge.errors import CheckpointError
    from lmforge.generate import stop_ids_of, write_stop_ids

    base, tuned, other = tmp_path / "base", tmp_path / "tuned", tmp_path / "other"
    for run in (base, tuned, other):
        (run / "checkpoints" / "step-000000").mkdir(parents=True)
    assert stop_ids_of(base) == []
    write_stop_ids(base, [0, 7])
    assert stop_ids_of(base) == [0, 7]
    (tuned / "finetune.json").write_text(json.dumps({"base": str(base / "checkpoints" / "step-000000")}))
    assert stop_ids_of(tuned) == [0, 7]  # the base a fine-tune records: a checkpoint folder ...
    (other / "finetune.json").write_text(json.dumps({"base": str(tuned)}))
    assert stop_ids_of(other) == [0, 7]  # ... or a run directory, a fine-tune in turn
    write_stop_ids(tuned, [3])
    assert stop_ids_of(tuned) == [3]  # its own come first
    (tuned / "finetune.json").write_text(json.dumps({"base": str(tmp_path / "gone")}))
    (tuned / "generation.json").unlink()
    assert stop_ids_of(tuned) == []
    for bad in ("[1, 2]", '{"stop_ids": [1, "2"]}', '{"stop_ids": -1}', "{"):
        (base / "generation.json").write_text(bad)
        with pytest.raises(CheckpointError) as e:
            stop_ids_of(base)
        assert "generation.json" in str(e.value) and "\n" not in str(e.value)


def test_a_model_padded_past_its_tokenizer_never_samples_the_padding_ids(tmp_path) -> None:
    """`vocab_size`: only the tokenizer's ids are chosen (generate, generate_batch, and a checkpoint whose
    model.vocab_size is padded past its tokenizer, as `--model.vocab_size 50304` pads): those rows were never
    trained and no tokenizer decodes them, so at a high temperature most sampled tokens silently vanished."""
    from lmforge.generate import generate_batch, generate_from_checkpoint
    from lmforge.tokenizer.tokenizer import Tokenizer
    from tests.test_finetune import make_base

    tok = Tokenizer.load(make_base(tmp_path) / "tokenizer.json")
    padded = make_base(tmp_path / "padded", tok=tok, vocab_size=4 * tok.vocab_size)  # 3/4 of the ids: padding
    text = generate_from_checkpoint(padded, prompt="ab", max_new_tokens=30, temperature=50.0, seed=0)
    assert len(text) >= 25  # every sampled id decodes (a character each; byte-fallback ids may merge)

    model = tiny()  # VOCAB 96 ids; say the tokenizer has 64
    drawn = generate(model, [1, 2], max_new_tokens=40, temperature=50.0, seed=0)
    assert max(drawn) >= 64  # without the limit the padding ids are drawn
    limited = generate(model, [1, 2], max_new_tokens=40, temperature=50.0, seed=0, vocab_size=64)
    assert len(limited) == 40 and max(limited) < 64
    rows = generate_batch(model, [[1, 2], [3]], max_new_tokens=10, temperature=50.0, seed=0, vocab_size=64)
    assert all(len(r) == 10 and max(r) < 64 for r in rows)


def test_top_k_minus_one_is_off_as_in_serve() -> None:
    """serve took vLLM's `top_k` -1 as off, while generate and chat refused it ("top_k must be >= 0"): one rule
    now, in `check_sampling`, for all three: 0 and -1 are off (the same draws as no top-k), below -1 is refused."""
    from lmforge.generate import generate_batch
    from lmforge.sampling import check_sampling

    model = tiny()
    hot = {"max_new_tokens": 12, "temperature": 5.0, "seed": 3}
    assert generate(model, [1, 2], top_k=-1, **hot) == generate(model, [1, 2], top_k=0, **hot)
    assert generate(model, [1, 2], top_k=-1, **hot) != generate(model, [1, 2], top_k=2, **hot)
    assert generate_batch(model, [[1, 2], [3]], top_k=-1, **hot) == generate_batch(model, [[1, 2], [3]], **hot)
    with pytest.raises(LmforgeError, match=r"^top_k must be >= 1, or 0 or -1 for off, got -2$"):
        check_sampling(1.0, -2, 1.0)


def test_min_p_against_hand_computation_and_transformers() -> None:
    """min-p keeps the tokens at least min_p x as likely as the top one, after temperature, top-k and top-p (the
    order transformers applies its warpers in); the greedy pick never changes."""
    from lmforge.sampling import check_sampling, sampling_probs

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # min_p 0.2: cut at 0.2 x 0.5 = 0.1 -> 0.05 goes
    got = sampling_probs(probs.log(), 1.0, 0, 1.0, min_p=0.2)
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    # temperature 2 flattens it first, to sqrt(p) normalised: (.379, .294, .208, .120); the cut at 0.6 x .379
    # keeps the first two
    flat = probs.sqrt() * torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(sampling_probs(probs.log(), 2.0, 0, 1.0, min_p=0.6), flat / flat.sum())
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(probs.log().repeat(2000, 1), min_p=0.2, generator=g).tolist()) == {0, 1, 2}
    assert sample_next(probs.log(), temperature=0, min_p=1.0).tolist() == [0]
    for bad in (-0.1, 1.5):
        with pytest.raises(LmforgeError, match="min_p must be in"):
            check_sampling(1.0, 0, 1.0, bad)

    warpers = pytest.importorskip("transformers.generation.logits_process")
    if not hasattr(warpers, "MinPLogitsWarper"):
        pytest.skip("this transformers has no MinPLogitsWarper")
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 3  # (B, V)
    for temperature, top_k, top_p, min_p in [(1.0, 0, 1.0, 0.1), (0.7, 20, 0.9, 0.05), (1.5, 0, 0.95, 0.3)]:
        theirs = warpers.TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            theirs = warpers.TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1:
            theirs = warpers.TopPLogitsWarper(top_p)(None, theirs)
        theirs = torch.softmax(warpers.MinPLogitsWarper(min_p)(None, theirs), dim=-1)
        ours = sampling_probs(logits, temperature, top_k, top_p, min_p)
        assert ((ours > 0) == (theirs > 0)).all() and (ours > 0).sum() < ours.numel() // 2  # the same tokens cut
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)  # (float32 softmax rounding)


def test_stop_strings_cut_before_the_first_to_appear_and_hold_back_what_could_become_one() -> None:
    from lmforge.detokenize import StopStrings
    from lmforge.generate import generate_from_checkpoint

    cut = StopStrings(["o w", "rl"])  # hold: 2 characters
    assert [cut.feed(p) for p in ("Hel", "lo wo", "rld")] == ["H", "ell", ""]  # "o w" spans the two pieces
    assert cut.stopped and cut.text == "Hell" and cut.flush() == ""
    cut = StopStrings(["abc", "b"])  # "b" appears first (with the 2nd piece), though "abc" starts earlier
    assert "".join(cut.feed(p) for p in "abcd") == "a" and cut.text == "a"
    cut = StopStrings(["xyz"])
    assert "".join(cut.feed(p) for p in ("ab", "xy")) == "ab" and cut.flush() == "xy" and not cut.stopped
    with pytest.raises(LmforgeError, match="must not be empty"):
        StopStrings(["\n", ""])
    # one check, StopStrings' own, which `generate` runs before the model loads (no run is there to load)
    assert StopStrings.check(("\n", "Q:")) == ["\n", "Q:"]
    with pytest.raises(LmforgeError, match="must not be empty"):
        generate_from_checkpoint("no/such/run", prompt="x", stop=["\n", ""])


def test_generate_stop_string_spanning_two_tokens(tmp_path: Path) -> None:
    """`lmforge generate --stop S`: the text ends before S, which is matched on the decoded text, here across
    two character tokens; streamed, nothing of S is shown either."""
    import io

    from lmforge.generate import generate_from_checkpoint
    from lmforge.tokenizer.tokenizer import Tokenizer
    from tests.test_finetune import make_base

    base = make_base(tmp_path, max_seq_len=48, init_std=0.5)  # (init_std 0.5: a varied greedy text)
    tok = Tokenizer.load(base / "tokenizer.json")
    greedy = dict(prompt="Hello wor", max_new_tokens=30, temperature=0)
    full = generate_from_checkpoint(base, **greedy)
    at = next(i for i in range(4, len(full) - 1) if full.find(full[i : i + 2]) == i)  # first seen there
    stop = full[at : at + 2]
    assert len(tok.encode(stop)) == 2  # two tokens
    out = io.StringIO()
    got = generate_from_checkpoint(base, **greedy, stop=[stop, "never in it \u2603"], stream=out)
    assert got == full[:at] and out.getvalue() == "Hello wor" + full[:at]


def test_generate_refuses_max_new_tokens_0_as_chat_and_serve_do(tmp_path) -> None:
    """`generate --max-new-tokens 0` printed the prompt back (exit 0) while `chat` and `serve` refused 0; it is
    the same one-line error as chat's now, before the run is read (this one does not even exist)."""
    import io

    from lmforge.generate import generate_from_checkpoint

    out = io.StringIO()
    (tmp_path / "prompts.txt").write_text("Once\n", encoding="utf-8")
    for prompts in (dict(prompt="Once"), dict(prompt_file=tmp_path / "prompts.txt")):
        with pytest.raises(LmforgeError, match=r"--max-new-tokens must be >= 1 \(tokens to generate\), got 0"):
            generate_from_checkpoint(tmp_path / "no-run", **prompts, max_new_tokens=0, stream=out)
    assert out.getvalue() == ""
