"""Chat and serve round trips on a tiny model that was SFT-ed to answer "hi" with "hello there":
the terminal chat through stdin (streaming, /reset, /exit), history trimming, and the
OpenAI-compatible server (completions, chat, SSE streaming, request limits)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from lmforge.finetune import FinetuneConfig, finetune
from tests.conftest import have_cpp_compiler, run_cli, start_cli
from tests.test_finetune import FAST, make_base

if TYPE_CHECKING:
    from lmforge.serve import LMServer

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}],
]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    base = make_base(root, max_seq_len=64)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    overrides = {"train": {"max_steps": 50, "batch_size": 4, "lr": 1e-2, "warmup_steps": 5}}
    finetune(
        base, train_file=data, out=root / "run", cfg=FinetuneConfig(task="sft"), overrides=overrides, progress=False
    )
    return root / "run"


def test_chat_template_is_stored(chat_run: Path):
    config = json.loads((chat_run / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "<|assistant|>" in config["chat_template"] and config["eos_token"] == "<|endoftext|>"


def test_hf_export_of_a_chat_run_carries_its_template(chat_run: Path, tmp_path: Path):
    """transformers' apply_chat_template on the exported tokenizer renders lmforge's prompt, and the EOS
    written after an assistant turn encodes as the EOS id (not as its characters)."""
    transformers = pytest.importorskip("transformers")
    from lmforge.adapt.load import load_finetuned
    from lmforge.chat import ChatTemplate, openai_text_messages
    from lmforge.export.hf import export_hf

    hf = transformers.AutoTokenizer.from_pretrained(str(export_hf(chat_run, tmp_path / "hf")))
    tok = load_finetuned(chat_run, torch.device("cpu")).tokenizer
    history = [*CONVERSATIONS[0], {"role": "user", "content": "bye"}]
    text = hf.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    ours = ChatTemplate().segments(tok, history, add_generation_prompt=True)
    assert hf(text)["input_ids"] == [i for ids, _ in ours for i in ids]
    assert hf(text)["input_ids"].count(tok.eos_id) == 1
    # OpenAI's newer message forms, as serve and sft files read them (`openai_text_messages`): a developer turn is
    # the system turn, text parts are joined by newlines. The template rendered "<|developer|>" and failed on parts
    openai_forms = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": "bye"},
    ]
    text = hf.apply_chat_template(openai_forms, tokenize=False, add_generation_prompt=True)
    ours = ChatTemplate().segments(tok, openai_text_messages(openai_forms), add_generation_prompt=True)
    assert text.startswith("<|system|>\nbe brief\n<|user|>\nhi\nthere\n<|assistant|>\nhello<|endoftext|>"), text
    assert hf(text)["input_ids"] == [i for ids, _ in ours for i in ids]


def test_hf_export_keeps_the_trained_ids_when_the_tokenizer_reserves_the_markers(tmp_path: Path):
    """A BPE tokenizer with <|user|>/<|assistant|> reserved (--special-tokens all): lmforge trains on the
    markers as text, and the export's apply_chat_template gives those same ids, not the reserved ones."""
    transformers = pytest.importorskip("transformers")
    from lmforge.adapt.load import load_finetuned
    from lmforge.chat import ChatTemplate
    from lmforge.export.hf import export_hf
    from lmforge.tokenizer.train import train_bpe

    texts = [(Path(__file__).parent / "data" / "alpaca.jsonl").read_text(encoding="utf-8")]
    base = make_base(tmp_path, max_seq_len=64, tok=train_bpe(texts, 400, extra_specials=True))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    run = tmp_path / "run"
    finetune(base, train_file=data, out=run, cfg=FinetuneConfig(task="sft"), overrides=FAST, progress=False)
    tok = load_finetuned(run, torch.device("cpu")).tokenizer
    assert "<|user|>" in tok.to_str()  # reserved in the run's tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(export_hf(run, tmp_path / "hf")))
    history = [*CONVERSATIONS[0], {"role": "user", "content": "bye"}]
    ours = [i for ids, _ in ChatTemplate().segments(tok, history, add_generation_prompt=True) for i in ids]
    theirs = hf.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
    assert (theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ours  # a dict in transformers 5
    assert hf.decode(ours) == tok.decode(ours)


def test_hf_export_of_a_chat_run_on_a_bos_tokenizer_starts_with_its_bos(tmp_path: Path):
    """A base whose tokenizer adds a BOS (an imported Llama-style one) is chat-tuned with lmforge's template,
    whose prompts start with that BOS (ChatTemplate.segments): the export's template renders it too, so
    transformers' apply_chat_template gives the ids the run trained on (it had no BOS)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors

    from lmforge.adapt.load import load_finetuned
    from lmforge.chat import ChatTemplate
    from lmforge.export.hf import export_hf
    from lmforge.tokenizer.tokenizer import Tokenizer
    from lmforge.tokenizer.train import train_bpe

    texts = [(Path(__file__).parent / "data" / "alpaca.jsonl").read_text(encoding="utf-8")]
    hf_tok = train_bpe(texts, 400).hf
    bos = hf_tok.token_to_id("<|endoftext|>")
    hf_tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    base = make_base(tmp_path, max_seq_len=64, tok=Tokenizer(hf_tok))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    run = tmp_path / "run"
    finetune(base, train_file=data, out=run, cfg=FinetuneConfig(task="sft"), overrides=FAST, progress=False)
    tok = load_finetuned(run, torch.device("cpu")).tokenizer
    assert tok.prompt_prefix == [bos]
    history = [*CONVERSATIONS[0], {"role": "user", "content": "bye"}]
    ours = [i for ids, _ in ChatTemplate().segments(tok, history, add_generation_prompt=True) for i in ids]
    assert ours[0] == bos and ours[1] != bos
    # the export, and the run folder itself (its tokenizer_config.json had no BOS, nor serve's /tokenizer_info)
    for folder in (export_hf(run, tmp_path / "hf"), run):
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        theirs = hf.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        assert (theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ours, folder


@pytest.mark.parametrize("nfkc", [False, True])
def test_hf_chat_template_gives_the_trained_ids_with_a_unigram_tokenizer(nfkc: bool):
    """A Unigram tokenizer marks a word start ("▁") before every text it encodes, so `segments`, which encodes each
    piece on its own (training, chat, serve), has one before every piece; transformers encodes the rendered
    template whole. The template written for such a tokenizer (`jinja_for`, used by the HF export, the run's
    tokenizer_config.json and serve's /tokenizer_info) renders those marks, so both give the same ids."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.chat import ChatTemplate, openai_text_messages
    from lmforge.export.hf import without_chat_markers
    from lmforge.tokenizer.train import train_unigram, with_nfkc

    texts = [(Path(__file__).parent / "data" / "alpaca.jsonl").read_text(encoding="utf-8"), "你好，再见。"]
    tok = train_unigram(texts, 400)
    tok = with_nfkc(tok) if nfkc else tok
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(without_chat_markers(tok.to_str())), eos_token="<|endoftext|>"
    )
    hf.chat_template = ChatTemplate().jinja_for(tok)
    conversations = [
        [{"role": "system", "content": "你是助手"}, *CONVERSATIONS[0], {"role": "user", "content": "bye"}],
        [
            {"role": "user", "content": "  two spaces"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": ""},
        ],
        [  # OpenAI's forms, read as `openai_text_messages` reads them (below)
            {"role": "developer", "content": "简短"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
            {"role": "user", "content": "bye"},
        ],
        [
            {"role": "user", "content": "\u3000全角空格"},
            {"role": "assistant", "content": " 你好\n"},
            {"role": "user", "content": "\nx"},
        ],
    ]
    for history in conversations:
        read = openai_text_messages(history)
        ours = [i for ids, _ in ChatTemplate().segments(tok, read, add_generation_prompt=True) for i in ids]
        theirs = hf.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        assert (theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ours, history
        trained = [i for ids, _ in ChatTemplate().segments(tok, read[:-1]) for i in ids]
        theirs = hf.apply_chat_template(history[:-1], tokenize=True)
        assert (theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == trained


def test_piped_chat_prints_the_replies_alone(chat_run: Path):
    """`printf 'hi\\n...' | lmforge chat RUN` printed what a terminal needs, prompts and notices among the replies:
    `lmforge chat: RUN. /reset ...\\nyou> bot> hello there\\nyou> bot> see you\\nyou> (history cleared)\\n...`. With
    stdin not a terminal, stdout holds the replies alone, a line each; the banner and notices go to stderr.
    (/quit, no such command, went to the model as a message and got a reply; it is answered with the commands.)"""
    r = run_cli("chat", str(chat_run), "--temperature", "0", input="hi\nbye\n/reset\n/quit\nhi\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello there\nsee you\nhello there\n", r.stdout
    assert r.stderr.splitlines() == [
        f"lmforge chat: {chat_run}. /reset clears the history, /exit quits.",
        "(history cleared)",
        "(no command /quit: /reset clears the history, /exit or Ctrl-D quits)",
    ]
    gbk = subprocess.run(  # a GBK terminal: the line is refused with a hint, the session goes on
        [sys.executable, "-m", "lmforge", "chat", str(chat_run), "--temperature", "0"],
        input="你好\n".encode("gbk") + b"hi\n/exit\n",
        capture_output=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    out, err = gbk.stdout.decode("utf-8"), gbk.stderr.decode("utf-8")
    assert gbk.returncode == 0 and "not valid UTF-8" in err and out == "hello there\n", err
    bad = run_cli("chat", str(chat_run), "--top-p", "1.5", input="hi\n")  # refused before the first message
    assert bad.returncode == 2 and "top_p" in bad.stderr and "you>" not in bad.stdout, (bad.stdout, bad.stderr)


def test_chat_reads_a_file_with_a_bom_and_crlf_lines(chat_run: Path):
    """Windows line ends and a byte-order mark went into the messages: "hi\r" got "see you", not "hello there"."""
    import io

    from lmforge.chat import chat

    out = io.StringIO()
    replies = chat(chat_run, stdin=io.StringIO("\ufeffhi\r\nbye\r\n/exit\r\nnever read\r\n"), stdout=out, temperature=0)
    assert replies == 2 and out.getvalue() == "hello there\nsee you\n", out.getvalue()


def test_ctrl_c_during_a_reply_stops_the_reply_not_the_session(chat_run: Path, monkeypatch, capsys):
    """Ctrl-C while a reply streamed ended the whole chat ('lmforge: interrupted', exit 130). It stops the reply:
    what was shown stays in the history, and the next message is read. The interrupt is raised by the CLI's
    SIGINT handler where it lands while streaming: in the write of a reply's text. Once the chat recovered, the
    CLI no longer takes a later error for that interrupt (it reported any later error as 'interrupted')."""
    import io
    import signal

    from lmforge import cli, errors
    from lmforge.chat import chat

    monkeypatch.setattr(cli, "_starting", False)
    monkeypatch.setattr(errors, "_interrupt_seen", False)

    class CtrlCOnce(io.StringIO):
        armed = True

        def write(self, text: str) -> int:
            if self.armed and self.getvalue().endswith("hello"):  # after the first token, at the second
                self.armed = False
                cli._on_sigint(signal.SIGINT, None)
            return super().write(text)

    out = CtrlCOnce()
    replies = chat(chat_run, stdin=io.StringIO("hi\nbye\n/exit\n"), stdout=out, temperature=0, interactive=True)
    assert replies == 2, out.getvalue()
    assert "bot> hello\n(reply stopped; /exit or Ctrl-D quits)\nyou> bot> see you\n" in out.getvalue(), out.getvalue()
    assert not errors.interrupt_seen()
    capsys.readouterr()
    out = CtrlCOnce()  # piped: the reply as far as it went, then the next; the note on stderr
    assert chat(chat_run, stdin=io.StringIO("hi\nbye\n"), stdout=out, temperature=0) == 2
    assert out.getvalue() == "hello\nsee you\n" and "(reply stopped)\n" in capsys.readouterr().err, out.getvalue()


CHAT_ON_A_TTY = """
import io, os, sys
tty = os.open(os.environ["CHAT_TTY"], os.O_RDWR)  # a terminal's side of a pty as stdin and stdout
os.dup2(tty, 0)
os.dup2(tty, 1)
sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False), encoding="utf-8")
sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), encoding="utf-8", line_buffering=True)
from lmforge.cli import main
main(sys.argv[1:])
"""


def test_chat_in_a_terminal_edits_wide_characters_and_takes_a_pasted_block_as_one_message(
    chat_run: Path, tmp_path: Path
):
    """In a terminal, the tty's own line editing erased one byte per backspace: "hi你" and a backspace sent "hi" and
    two bytes of 你, refused as not UTF-8 (a pasted block of lines was one message per line, escapes included).
    Read with readline, the backspace erases the character and a bracketed paste is one message."""
    import pty
    import select

    from tests.cli_fork import ForkedProcess

    script = tmp_path / "chat_on_a_tty.py"
    script.write_text(CHAT_ON_A_TTY, encoding="utf-8")
    master, terminal = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm", "CHAT_TTY": os.ttyname(terminal)}
    proc = ForkedProcess(["chat", str(chat_run), "--temperature", "0"], env, stdin=os.devnull, script=str(script))
    seen = b""

    def until_prompt(n: int) -> None:  # read the terminal until it has shown `you> ` n times
        nonlocal seen
        deadline = time.monotonic() + 60
        while seen.count(b"you> ") < n and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        assert seen.count(b"you> ") >= n, (seen, proc.poll(), proc.stderr)

    try:
        until_prompt(1)
        os.write(master, "hi你".encode() + b"\x7f\r")  # a backspace over the Chinese character
        until_prompt(2)
        os.write(master, b"\x1b[200~bye\nhi\x1b[201~\r")  # a pasted block of two lines
        until_prompt(3)
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(60) == 0, proc.stderr
    finally:
        proc.kill()
        os.close(master)
        os.close(terminal)
    text = seen.decode("utf-8", errors="replace")
    assert "not valid UTF-8" not in text and "bot> hello there" in text, text
    assert text.count("bot> ") == 2, text  # one reply to the pasted block


def test_chat_refuses_a_message_longer_than_the_context_as_generate_and_serve_do(chat_run: Path):
    """A message the model cannot see whole beside the reply was cut to its end (a note said only 56 of its tokens
    were used), so the reply answered a text the user had not written, while `generate` and `serve` refuse a
    prompt over the context. It is not sent now: a notice says by how much to shorten it, and the session goes on
    (the next message is answered as if it had not come)."""
    r = run_cli("chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "8", input="x" * 300 + "\nhi\n")
    assert r.returncode == 0, r.stderr
    refused = [line for line in r.stderr.splitlines() if line.startswith("(message not sent")]
    assert refused == [
        "(message not sent: with the chat template the message is 324 tokens and the model's context is 64, which "
        "holds 56 beside 8 new tokens (--max-new-tokens); shorten it to at most 56 tokens (268 fewer))"
    ], r.stderr
    assert "note:" not in r.stderr and r.stdout == "hello th\n", (r.stdout, r.stderr)  # hi's reply alone


def test_chat_and_serve_refuse_bad_options_before_loading(tmp_path: Path):
    """Out-of-range numbers are one-line errors before the run is read (this one does not even exist)."""
    missing = str(tmp_path / "no-run")
    cases = [
        (("serve", missing, "--port", "99999"), "--port must be 0-65535"),  # was an OverflowError traceback
        (("serve", missing, "--port", "-1"), "--port must be 0-65535"),
        (("serve", missing, "--max-tokens", "0"), "--max-tokens must be >= 1"),  # every request failed
        (("serve", missing, "--max-body-bytes", "-5"), "--max-body-bytes must be >= 1"),
        (("serve", missing, "--max-prompts", "0"), "--max-prompts must be >= 1"),
        (("serve", missing, "--idle-timeout", "0"), "--idle-timeout must be > 0 seconds"),
        (("serve", missing, "--cors-origin", "localhost:3000/app"), "--cors-origin 'localhost:3000/app': give"),
        (("serve", missing, "--idle-timeout", "nan"), "--idle-timeout must be > 0 seconds"),
        (("chat", missing, "--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
        (("chat", missing, "--seed", "-1"), "seed must be in [0, 2**63)"),  # was refused after the first message
        (("chat", missing, "--frequency-penalty", "-3"), "frequency penalty must be in [-2, 2]"),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:  # fresh interpreters importing torch: two at a time
        replies = list(pool.map(lambda case: run_cli(*case[0], input="hi\n"), cases))
    for (args, needle), r in zip(cases, replies, strict=True):
        assert r.returncode == 2 and r.stderr.startswith("lmforge: error: ") and needle in r.stderr, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1, r.stderr


def test_serve_and_chat_take_min_p(chat_run: Path, capsys: pytest.CaptureFixture[str]):
    """vLLM's "min_p" was ignored by serve, and chat had no --min-p: at min_p 1 only the most likely token is left,
    so a hot sample is the greedy reply; out of range it is a 400 in OpenAI's shape (chat: a one-line error)."""
    import io

    from lmforge.chat import chat
    from lmforge.cli import main

    hot = {"messages": [{"role": "user", "content": "hi"}], "temperature": 2.0, "max_tokens": 16, "seed": 3}
    with _serving(chat_run) as server:
        url = server.url + "/v1"
        replies = [json.loads(_post(url + "/chat/completions", hot | extra)[1]) for extra in ({}, {"min_p": 1.0})]
        assert [r["choices"][0]["message"]["content"] for r in replies][1] == "hello there"
        assert replies[0]["choices"][0]["message"]["content"] != "hello there"  # (so min_p made the difference)
        prompt = {"prompt": "<|user|>\nhi\n<|assistant|>\n", "max_tokens": 12, "seed": 3, "stream": True}
        status, body = _post(url + "/completions", prompt | {"temperature": 2.0, "min_p": 1.0})
        assert status == 200 and "".join(e["choices"][0]["text"] for e in _events(body)) == "hello there"
        status, body = _post(url + "/completions", {"prompt": "hi", "min_p": 1.5})
        error = json.loads(body)["error"]
        assert (
            status == 400 and error["param"] == "min_p" and "'min_p' must be a number in [0.0, 1.0]" in error["message"]
        )
    for min_p, same in ((1.0, True), (0.0, False)):
        out = io.StringIO()
        chat(chat_run, stdin=io.StringIO("hi\n"), stdout=out, temperature=2.0, top_k=0, seed=3, min_p=min_p)
        assert (out.getvalue() == "hello there\n") == same, out.getvalue()
    capsys.readouterr()  # (the banners of those piped chats, on stderr)
    with pytest.raises(SystemExit) as e:
        main(["chat", str(chat_run), "--min-p", "2"])  # refused before the run loads
    err = capsys.readouterr().err
    assert (
        e.value.code == 2 and err.startswith("lmforge: error: min_p must be in [0, 1]") and len(err.splitlines()) == 1
    )


def test_serve_takes_top_k(chat_run: Path):
    """vLLM's "top_k" was ignored by serve: at top_k 1 a hot sample is the greedy reply, -1 and 0 are off (the
    seeded sample of a request without it), and anything else below 1 is a 400 naming it."""
    hot = {"messages": [{"role": "user", "content": "hi"}], "temperature": 2.0, "max_tokens": 16, "seed": 3}
    with _serving(chat_run) as server:
        url = server.url + "/v1/chat/completions"
        replies = [
            json.loads(_post(url, hot | extra)[1])["choices"][0]["message"]["content"]
            for extra in ({}, {"top_k": 1}, {"top_k": -1}, {"top_k": 0})
        ]
        assert replies[1] == "hello there" and replies[0] != "hello there" and replies[2] == replies[3] == replies[0]
        status, body = _post(url, hot | {"top_k": -2})
        assert status == 400 and json.loads(body)["error"]["param"] == "top_k"


def test_serve_bind_errors_name_the_flag_to_change(chat_run: Path):
    from lmforge.errors import ConfigError
    from lmforge.serve import make_server

    with pytest.raises(ConfigError, match="--host must name this machine"):  # 192.0.2.1: TEST-NET, never local
        make_server(chat_run, host="192.0.2.1", port=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="pick another --port"):
            make_server(chat_run, port=taken.getsockname()[1])


def test_serve_listens_on_an_ipv6_address(chat_run: Path):
    """--host ::1 was refused as "Address family for hostname not supported" with the advice that --host must
    name this machine, which it does: the server bound IPv4 only."""
    with _serving(chat_run, host="::1") as server:
        assert server.url == f"http://[::1]:{server.server_address[1]}"
        with urllib.request.urlopen(server.url + "/health", timeout=30) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}


def test_chat_notes_a_reply_length_capped_to_half_the_context(chat_run: Path):
    """--max-new-tokens above half the context was capped to it without a word: one note on stderr says so."""
    r = run_cli("chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "500", input="hi\nbye\n")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: --max-new-tokens 500 is more than half the model's context (64 tokens); replies are capped at 32 "
        "tokens, the other half holds the conversation"
    ], r.stderr
    r = run_cli("chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "32", input="hi\n")
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr  # exactly half: nothing to say


def test_history_is_trimmed_to_the_context(chat_run: Path):
    from lmforge.chat import ChatTemplate
    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(chat_run / "tokenizer.json")
    history = [{"role": "system", "content": "S"}]
    for i in range(6):
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "last"})
    ids, dropped = ChatTemplate().prompt_ids(tok, history, budget=100)
    assert len(ids) <= 100 and dropped == 10  # five of the six question/answer pairs
    text = tok.decode(ids)
    assert text.startswith("<|system|>\nS\n") and text.endswith("<|user|>\nlast\n<|assistant|>\n")
    assert "question 4" not in text and "question 5" in text and "answer 5" in text


def test_a_message_too_long_beside_the_system_message_keeps_the_system_message(chat_run: Path):
    """The last message alone over the budget cut the prompt's ids from the start: the system message went first,
    then the message's role marker. The system message and the marker stay; the message keeps its end (`eval`'s
    chat prompts). `lmforge chat` does not send such a message, and refuses a --system that leaves no room for one."""
    from lmforge.chat import ChatTemplate
    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(chat_run / "tokenizer.json")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    history += [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "x" * 80 + " the end"}]
    ids, dropped = ChatTemplate().prompt_ids(tok, history, budget=70)
    text = tok.decode(ids)
    assert dropped == 2 and len(ids) == 70, (dropped, text)  # (a character tokenizer: the budget is filled)
    assert text.startswith("<|system|>\nBe brief.\n<|user|>\nxxx") and text.endswith(" the end\n<|assistant|>\n")
    r = run_cli("chat", str(chat_run), "--system", "Be brief.", "--max-new-tokens", "8", input="y" * 300 + "\n")
    assert r.returncode == 0 and "(message not sent: with the system message and the chat template" in r.stderr
    r = run_cli("chat", str(chat_run), "--system", "z" * 300, "--max-new-tokens", "8", input="hi\n")
    assert r.returncode == 2 and r.stderr.startswith("lmforge: error: --system is 326 tokens"), r.stderr
    assert "with no room for a message: shorten --system (or lower --max-new-tokens)" in r.stderr, r.stderr


@contextlib.contextmanager
def _serving(run: Path, **kwargs: Any) -> Iterator[LMServer]:
    """A `make_server` server answering on a background thread for the duration of the block."""
    from lmforge.serve import make_server

    server = make_server(run, port=0, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _events(body: bytes) -> list[dict]:
    """A streamed reply's Server-Sent Events as JSON chunks; it must end with `data: [DONE]`."""
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", body
    return [json.loads(e) for e in events[:-1]]


def _post(url: str, payload: dict | bytes) -> tuple[int, bytes]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_serve_says_how_far_a_prompt_is_over_the_context(chat_run: Path):
    """Without max_tokens the server generates what the context leaves (up to the default), so a prompt is
    refused only when it fills the context; the error said "N tokens + 1 to generate" as if 1 were asked."""
    chat = {"messages": [{"role": "user", "content": "y" * 70}]}
    with _serving(chat_run) as server:  # the model's context: 64 tokens
        for path, payload, said in [
            ("/completions", {"prompt": "y" * 70}, "the prompt is 70 tokens and the model's context is 64, which "
             "holds 63 beside 1 new token; shorten it to at most 63 tokens (7 fewer)"),
            ("/completions", {"prompt": "y" * 64}, "the prompt is 64 tokens and the model's context is 64"),
            ("/chat/completions", chat, "tokens and the model's context is 64, which holds 63 beside 1 new token; "
             "shorten them to at most 63 tokens"),
            ("/completions", {"prompt": "y" * 60, "max_tokens": 16}, "the prompt is 60 tokens and the model's context "
             "is 64, which holds 48 beside 16 new tokens ('max_tokens'); shorten it to at most 48 tokens (12 fewer) "
             "or lower 'max_tokens' to at most 4"),
            ("/completions", {"prompt": "y" * 70, "max_tokens": 2}, "the prompt is 70 tokens and the model's context "
             "is 64, which holds 62 beside 2 new tokens ('max_tokens'); shorten it to at most 62 tokens (8 fewer)"),
            # a max_tokens past the context (below the server's 512 limit): "holds -36 ... at most -36 tokens"
            ("/completions", {"prompt": "y" * 5, "max_tokens": 100}, "the prompt is 5 tokens and the model's context "
             "is 64, which holds no prompt beside 100 new tokens ('max_tokens'); lower 'max_tokens' to at most 59"),
        ]:  # fmt: skip
            status, body = _post(server.url + "/v1" + path, payload)
            error = json.loads(body)["error"]
            assert status == 400 and error["code"] == "context_length_exceeded" and said in error["message"], error
        status, body = _post(server.url + "/v1/completions", {"prompt": "y" * 63, "temperature": 0})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 1  # what the context left


def test_openai_compatible_server_round_trip(chat_run: Path):
    from lmforge.serve import ServeLimits, make_server

    server = make_server(chat_run, port=0, limits=ServeLimits(max_body_bytes=2000, max_tokens=16))
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = server.url + "/v1"
    try:
        with urllib.request.urlopen(base + "/models", timeout=30) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "run"

        hi = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 16}
        status, body = _post(base + "/chat/completions", hi)
        reply = json.loads(body)
        assert status == 200 and reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"] == {"role": "assistant", "content": "hello there"}
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["usage"]["completion_tokens"] == len("hello there") + 1  # char tokens + EOS

        status, body = _post(base + "/chat/completions", {**hi, "stream": True})
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # as OpenAI's first chunk
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "hello there"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

        prompt = "<|user|>\nhi\n<|assistant|>\n"
        status, body = _post(base + "/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 16, "stop": " "})
        choice = json.loads(body)["choices"][0]
        assert status == 200 and choice["text"] == "hello" and choice["finish_reason"] == "stop"

        # limits and bad requests: OpenAI-style error bodies, never a traceback
        status, body = _post(base + "/completions", {"prompt": "x" * 3000})
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
        assert json.loads(body)["error"]["message"].endswith(
            "takes at most 2,000; send less, or start lmforge serve with a larger --max-body-bytes"
        )
        status, body = _post(base + "/completions", {"prompt": "hi", "max_tokens": 17})
        assert status == 400 and "max_tokens" in json.loads(body)["error"]["message"]
        status, body = _post(base + "/chat/completions", {"messages": []})
        error = json.loads(body)["error"]
        assert status == 400 and "empty conversation" in error["message"] and error["param"] == "messages", error
        status, body = _post(base + "/completions", {"prompt": "y" * 60, "max_tokens": 16})
        assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"
        status, body = _post(base + "/chat/completions", {"messages": [{"role": "user", "content": "y" * 60}]})
        assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"  # not cut silently
        status, _ = _post(base + "/completions", b"{not json")
        assert status == 400
        bad = [
            ("/chat/completions", {"max_tokens": 3}, "messages"),
            ("/chat/completions", {"messages": "hi"}, "messages"),
            ("/chat/completions", {"messages": ["hi"]}, "role"),
            ("/completions", b'{"prompt": "\\udc00 x"}', "surrogate"),
            ("/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "surrogate"),
            ("/completions", {"prompt": "hi", "max_tokens": 3.5}, "whole number"),
            ("/completions", {"prompt": "hi", "seed": -1, "stream": True}, "'seed'"),  # a 400, not an SSE error
            ("/completions", {"prompt": "hi", "n": 0}, "'n' must be a whole number >= 1"),
            ("/completions", {"prompt": "hi", "stream": "false"}, "'stream' must be true or false"),
            ("/completions", {"prompt": "hi", "logprobs": 21}, "'logprobs' must be a whole number 0-20"),
            ("/completions", {"prompt": "hi", "echo": "yes"}, "'echo' must be true or false"),
            ("/completions", {"prompt": "hi", "max_tokens": 0}, '0 is for "echo": true'),
            ("/completions", {"prompt": "hi", "stop": [str(i) for i in range(17)]}, "'stop' holds 17 strings"),
            ("/completions", {"prompt": "hi", "stop": [""]}, 'list of non-empty strings, got [""]'),
            ("/completions", {"prompt": "hi", "stop": ""}, 'list of non-empty strings, got ""'),  # was no stop
            ("/completions", {"prompt": "hi", "stop": {}}, "list of non-empty strings, got {}"),  # was no stop
            (
                "/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3},
                "presence_penalty",
            ),
        ]
        for path, payload, needle in bad:
            status, body = _post(base + path, payload)
            assert status == 400 and needle in json.loads(body)["error"]["message"], (payload, body)
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Length", "-5")
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == 400 and "Content-Length" in json.loads(reply.read())["error"]["message"]
        conn.close()
        neutral = {"logprobs": None, "echo": False, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}}
        status, body = _post(base + "/completions", {"prompt": "hi", "max_tokens": 2, **neutral})
        assert status == 200, body  # the "off" values clients send by default are accepted
        chat_off = {
            "echo": False,
            "logprobs": False,
            "top_logprobs": 0,
            "tools": [],
            "response_format": {"type": "text"},
        }
        status, body = _post(base + "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **chat_off})
        assert status == 200, body  # (echo false and top_logprobs 0 were refused with a 400)
        status, body = _post(base + "/completions", {"prompt": "hi", "max_tokens": 2.0, "temperature": 0})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] <= 2
    finally:
        server.shutdown()
        server.server_close()


def test_serve_reads_a_request_body_that_starts_with_a_bom(chat_run: Path):
    """A JSON file saved with a byte-order mark and sent with `curl -d @file` was "not valid JSON"."""
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "temperature": 0}).encode()
    with _serving(chat_run) as server:
        status, plain = _post(server.url + "/v1/completions", body)
        status_bom, with_bom = _post(server.url + "/v1/completions", b"\xef\xbb\xbf" + body)
    assert status == status_bom == 200, with_bom
    assert json.loads(with_bom)["choices"] == json.loads(plain)["choices"]


def test_serve_speaks_what_the_openai_client_sends_and_reads(chat_run: Path):
    """The request forms and reply fields the official `openai` client (3.x) uses, checked with it and pinned
    here over plain HTTP: model lookup, `max_completion_tokens`, `stream_options.include_usage`, the
    `developer` role, text content parts, and `{"error": {message, type, param, code}}` on a refusal."""
    hi = [{"role": "user", "content": "hi"}]
    with _serving(chat_run) as server:
        base = server.url + "/v1"
        with urllib.request.urlopen(base + "/models/run", timeout=30) as resp:  # client.models.retrieve("run")
            assert json.loads(resp.read()) == {"id": "run", "object": "model", "created": 0, "owned_by": "lmforge"}
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + "/models/gpt-4", timeout=30)
        error = json.loads(missing.value.read())["error"]
        assert missing.value.code == 404 and error["code"] == "model_not_found" and error["param"] == "model"

        plain = {"messages": hi, "temperature": 0, "max_tokens": 16}
        status, body = _post(base + "/chat/completions", plain)
        reply = json.loads(body)
        assert status == 200 and reply["id"].startswith("chatcmpl-") and isinstance(reply["created"], int)
        assert reply["model"] == "run" and reply["choices"][0]["message"]["content"] == "hello there"
        usage = {"prompt_tokens": len("<|user|>\nhi\n<|assistant|>\n"), "completion_tokens": 12, "total_tokens": 38}
        assert reply["usage"] == usage  # char tokens; "hello there" + EOS
        # top_p 0, which OpenAI's API accepts: the most likely token alone, whatever the temperature
        status, body = _post(base + "/chat/completions", {**plain, "temperature": 1.0, "top_p": 0, "seed": 5})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "hello there"

        # the chat API's newer name for max_tokens, which the client sends (max_tokens is marked deprecated)
        status, body = _post(base + "/chat/completions", {"messages": hi, "temperature": 0, "max_completion_tokens": 3})
        reply = json.loads(body)
        assert status == 200 and reply["choices"][0] == {
            "index": 0,
            "message": {"role": "assistant", "content": "hel"},
            "logprobs": None,
            "finish_reason": "length",
        }
        assert reply["usage"]["completion_tokens"] == 3

        # streamed: no usage unless asked; asked, it comes in one more chunk with no choices, null before it
        status, body = _post(base + "/chat/completions", {**plain, "stream": True})
        assert status == 200 and all("usage" not in c for c in _events(body))
        asked = {**plain, "stream": True, "stream_options": {"include_usage": True}}
        status, body = _post(base + "/chat/completions", asked)
        chunks = _events(body)
        assert status == 200 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == usage and chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "hello there"

        # streamed completions: each chunk a "text_completion" holding text (OpenAI sends no empty first one)
        prompt = {"prompt": "<|user|>\nhi\n<|assistant|>\n", "temperature": 0, "max_tokens": 4, "stream": True}
        status, body = _post(base + "/completions", prompt)
        chunks = _events(body)
        assert status == 200 and {c["object"] for c in chunks} == {"text_completion"}
        assert [c["choices"][0]["text"] for c in chunks] == ["h", "e", "l", "l", ""]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

        # the developer role is the system prompt; text content parts are their text
        system = [{"role": "system", "content": "be brief"}, *hi]
        developer = [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}, *hi]
        parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        replies = [
            json.loads(_post(base + "/chat/completions", {**plain, "messages": m})[1]) for m in (system, developer)
        ]
        assert replies[0] == {**replies[1], "id": replies[0]["id"], "created": replies[0]["created"]}
        status, body = _post(base + "/chat/completions", {**plain, "messages": parts})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "hello there"

        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
        refused = [
            ("/chat/completions", {"messages": image}, "messages", "only text content parts"),
            ("/chat/completions", {"messages": hi, "n": 1.5}, "n", "'n' must be a whole number"),
            ("/chat/completions", {"messages": hi, "logprobs": 2}, "logprobs", "'logprobs' must be true or false"),
            ("/chat/completions", {"messages": hi, "top_logprobs": 2}, "top_logprobs", 'needs "logprobs": true'),
            ("/chat/completions", {"messages": hi, "echo": True}, "echo", "for /v1/completions"),
            ("/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
            ("/chat/completions", {"messages": hi, "max_tokens": 4, "max_completion_tokens": 3}, "max_tokens", "both"),
            ("/chat/completions", {"messages": hi, "max_completion_tokens": 0}, "max_completion_tokens", "nothing"),
            ("/chat/completions", {"messages": hi, "tools": [{"type": "function"}]}, "tools", "not supported"),
            # the message as JSON, with its index (it was Python's repr: {'role': 'assistant', 'content': None})
            ("/chat/completions", {"messages": [*hi, {"role": "tool", "content": "4"}]}, "messages",
             'bad message 1 {"role": "tool", "content": "4"}: its \'role\' must be system, user or assistant'),
            ("/chat/completions", {"messages": [{"role": "assistant", "content": None}, *hi]}, "messages",
             'bad message 0 {"role": "assistant", "content": null}: its \'content\' must be a string (or a list '
             "of text parts), not null"),
        ]  # fmt: skip
        for path, payload, param, needle in refused:
            status, body = _post(base + path, payload)
            error = json.loads(body)["error"]
            assert status == 400 and set(error) == {"message", "type", "param", "code"}, (payload, body)
            assert error["type"] == "invalid_request_error" and error["param"] == param, (payload, error)
            assert needle in error["message"], (payload, error)


@pytest.mark.skipif(not have_cpp_compiler(), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.timeout(900)  # a cold inductor cache (a fresh machine) compiles C++ kernels: ~1 min quiet, 4+ loaded
def test_chat_and_serve_with_compile(chat_run: Path):
    """--compile: the same replies; serve compiles before it answers, so a request adds no graph."""
    from torch._dynamo.utils import counters

    from lmforge.serve import make_server

    r = run_cli("chat", str(chat_run), "--temperature", "0", "--compile", input="hi\nbye\n/exit\n", timeout=600)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert r.stdout == "hello there\nsee you\n", r.stdout
    before = counters["stats"]["unique_graphs"]
    server = make_server(chat_run, port=0, compile=True)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled == before + 1
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        hi = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 16}
        status, body = _post(server.url + "/v1/chat/completions", hi)
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "hello there"
        assert counters["stats"]["unique_graphs"] == compiled
    finally:
        server.shutdown()
        server.server_close()


def test_serve_stop_strings_match_an_nfkc_models_text(tmp_path: Path):
    """`prepare --normalize NFKC` gives the tokenizer an NFKC normalizer: the model trained on "你好，朋友"
    writes "你好,朋友", and a stop string "，" (as the user types it) never matched; it is looked for as ","."""
    from lmforge.tokenizer.train import train_char, with_nfkc
    from tests.test_finetune import DATA

    tok = with_nfkc(train_char([p.read_text(encoding="utf-8") for p in sorted(DATA.glob("*.txt"))]))
    assert tok.unicode_forms == ("NFKC",) and tok.in_unicode_form("你好，朋友。") == "你好,朋友。"
    plain = train_char(["你好，"])  # (NFC, the default, adds no normalizer)
    assert plain.unicode_forms == () and plain.in_unicode_form("，") == "，"
    base = make_base(tmp_path, max_seq_len=64, tok=tok)
    data = tmp_path / "chat.jsonl"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "你好，朋友。再见"}]
    data.write_text(json.dumps({"messages": conversation}, ensure_ascii=False) + "\n", encoding="utf-8")
    overrides = {"train": {"max_steps": 50, "batch_size": 4, "lr": 1e-2, "warmup_steps": 5}}
    cfg = FinetuneConfig(task="sft")
    finetune(base, train_file=data, out=tmp_path / "run", cfg=cfg, overrides=overrides, progress=False)
    hi = {"messages": conversation[:1], "temperature": 0, "max_tokens": 16}
    with _serving(tmp_path / "run") as server:
        url = server.url + "/v1/chat/completions"
        for stop, want in [(None, "你好,朋友。再见"), ("，", "你好"), (["再见", "朋友。"], "你好,")]:
            status, body = _post(url, hi | ({"stop": stop} if stop else {}))
            assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == want, (stop, body)
        status, body = _post(url, hi | {"stop": "，", "stream": True})  # streamed: held back until it can't be one
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in _events(body))
        assert status == 200 and content == "你好"


@pytest.mark.parametrize("known_eos", [True, False])
def test_chat_and_serve_stop_at_an_imported_models_end_of_turn(known_eos: bool, tmp_path: Path):
    """An imported instruct model whose generation_config lists `<|eot_id|>` beside its eos: chat and serve
    end the reply there (without showing it), as transformers' generate does. The same when lmforge does
    not know its end-of-text token (`known_eos=False`, named `<|end|>`): past replies are rendered without
    one, and only a completion with an empty prompt (a new document after one) is refused, saying why."""
    import io

    from lmforge.chat import ChatTemplate, chat
    from lmforge.export.hf_import import import_hf
    from lmforge.serve import make_server
    from lmforge.tokenizer.train import train_bpe
    from tests.test_export import CONTEXT, instruct_llama_dir

    turn = "<|user|>\nhi\n<|assistant|>\n"  # in the corpus, so the prompt is a few tokens
    bpe = train_bpe([turn * 20, "the lazy dog " * 20], vocab_size=300)
    hi = [{"role": "user", "content": "hi"}]
    reply_budget = CONTEXT // 2  # what chat allows a reply
    prompt_ids, _ = ChatTemplate().prompt_ids(bpe, hi, budget=CONTEXT - reply_budget)
    _, tok, theirs = instruct_llama_dir(
        bpe, tmp_path / "hf", prompt_ids, max_new_tokens=reply_budget, known_eos=known_eos
    )
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    want = tok.decode(theirs[:-1]).rstrip("\ufffd")  # as streamed: no half character at the end
    assert len(prompt_ids) <= CONTEXT - reply_budget  # not cut to fit

    out = io.StringIO()
    assert chat(run, stdin=io.StringIO("hi\n/exit\n"), stdout=out, temperature=0, device="cpu") == 1
    assert out.getvalue() == f"{want}\n"

    server = make_server(run, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, body = _post(
            server.url + "/v1/chat/completions", {"messages": hi, "temperature": 0, "max_tokens": reply_budget}
        )
        reply = json.loads(body)
        assert status == 200 and reply["choices"][0]["message"]["content"] == want
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["usage"]["completion_tokens"] == len(theirs)  # the stop token counted, as eos is
        past = "the lazy dog"  # a past reply ends with the eos, where the tokenizer has one
        again = [*hi, {"role": "assistant", "content": past}, *hi]
        status, body = _post(server.url + "/v1/chat/completions", {"messages": again, "max_tokens": 2})
        eos = [tok.eos_id] if known_eos else []
        assert status == 200, body
        assert json.loads(body)["usage"]["prompt_tokens"] == len(prompt_ids + tok.encode(past) + eos + prompt_ids)
        status, body = _post(server.url + "/v1/completions", {"prompt": "", "max_tokens": 2})
        if known_eos:  # a new document, after the eos
            assert status == 200, body
        else:
            message = json.loads(body)["error"]["message"]
            assert status == 400 and "no end-of-text token" in message and "send some text" in message, body
    finally:
        server.shutdown()
        server.server_close()


def _exchange(
    conn: http.client.HTTPConnection, method: str, path: str, payload: dict | bytes | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on `conn` (kept alive by HTTP/1.1) and its whole reply."""
    body = payload if payload is None or isinstance(payload, bytes) else json.dumps(payload).encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp, resp.read()


def _raw(server: LMServer, data: bytes) -> tuple[bytes, bytes]:
    """Send bytes on a fresh socket and read until the server closes it: (status line and headers, body)."""
    with socket.create_connection(server.server_address[:2], timeout=30) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return head, body


def test_serve_keeps_one_connection_for_many_requests(chat_run: Path):
    """HTTP/1.1 keep-alive, as the openai client (httpx) uses it: one socket carries requests after replies of
    every kind (JSON, errors, 404/405, HEAD, a chunked stream), each sized by Content-Length, and the body of
    a request refused before it was read does not become the next request."""
    from lmforge.serve import ServeLimits

    hi = {"prompt": "<|user|>\nhi\n<|assistant|>\n", "temperature": 0, "max_tokens": 16}
    with _serving(chat_run, limits=ServeLimits(max_body_bytes=2000, max_tokens=16)) as server:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.connect()
        sock = conn.sock
        steps: list[tuple[str, str, dict | bytes | None, int]] = [
            ("GET", "/health", None, 200),
            ("GET", "/v1/models", None, 200),
            ("POST", "/v1/completions", hi, 200),
            ("POST", "/v1/completions", b"{not json", 400),
            ("POST", "/v1/completions", hi, 200),
            ("GET", "/v1/nowhere", None, 404),
            ("POST", "/v1/nowhere", json.dumps(hi).encode(), 404),  # its body is dropped, not read as a request
            ("GET", "/v1/models/gpt-4", None, 404),
            ("POST", "/v1/responses", {"model": "m", "input": "hi"}, 404),  # the openai client's responses.create
            ("GET", "/v1/completions", None, 405),
            ("POST", "/v1/models", json.dumps(hi).encode(), 405),
            ("DELETE", "/v1/models", None, 405),
            ("HEAD", "/health", None, 200),  # headers alone: a body here would be read as the next reply
            ("POST", "/v1/completions", {**hi, "max_tokens": 99}, 400),
            ("GET", "/v1/models?limit=5", None, 200),
        ]
        for method, path, payload, status in steps:
            resp, body = _exchange(conn, method, path, payload)
            assert resp.status == status and resp.version == 11, (method, path, resp.status, body)
            assert conn.sock is sock and resp.getheader("Connection") is None, (method, path)  # still open
            if method == "HEAD":
                assert body == b"" and int(resp.getheader("Content-Length")) == len(b'{"status": "ok"}')
                continue
            assert int(resp.getheader("Content-Length")) == len(body), (method, path)
            reply = json.loads(body)
            if status == 200 and method == "POST":
                assert reply["choices"][0]["text"] == "hello there", reply
            elif status != 200:
                assert set(reply["error"]) == {"message", "type", "param", "code"}, reply
                assert "\n" not in reply["error"]["message"]
            if path == "/v1/nowhere":  # what to call instead (it said "unknown path /v1/nowhere" alone)
                assert reply["error"]["message"] == (
                    "unknown path /v1/nowhere; lmforge serve answers /v1/chat/completions, /v1/completions and "
                    "/v1/models"
                )
            if path == "/v1/responses":
                assert reply["error"]["message"].endswith("(the Responses API is not served: call "
                                                          "client.chat.completions.create)")  # fmt: skip
            if status == 405:
                assert reply["error"]["code"] == "method_not_allowed" and method in reply["error"]["message"]
                assert resp.getheader("Allow") == ("POST" if path == "/v1/completions" else "GET, HEAD")

        # a stream is chunked and ends with the zero-length chunk: the connection goes on after it
        for _ in range(2):
            resp, body = _exchange(conn, "POST", "/v1/completions", {**hi, "stream": True})
            assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
            assert "".join(c["choices"][0]["text"] for c in _events(body)) == "hello there"
            assert conn.sock is sock
            resp, body = _exchange(conn, "GET", "/health", None)
            assert resp.status == 200 and json.loads(body) == {"status": "ok"} and conn.sock is sock
        conn.close()

        # an HTTP/1.0 client has no chunked coding: its stream is ended by closing the connection
        data = json.dumps({**hi, "stream": True}).encode()
        head, body = _raw(server, b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head and b"chunked" not in head
        assert "".join(c["choices"][0]["text"] for c in _events(body)) == "hello there"


def test_serve_refusals_that_end_the_connection_still_answer_in_json(chat_run: Path):
    """A body too large to read (or of unknown size) and malformed HTTP are refused with a one-line JSON
    error and `Connection: close`; the client reads the whole reply (the server drains what it still sends)."""
    from lmforge.serve import ServeLimits

    with _serving(chat_run, limits=ServeLimits(max_body_bytes=2000)) as server:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        resp, body = _exchange(conn, "POST", "/v1/completions", {"prompt": "x" * 5_000_000})  # unread, and big
        assert resp.status == 413 and resp.getheader("Connection") == "close"
        assert json.loads(body)["error"]["code"] == "request_too_large"
        resp, body = _exchange(conn, "GET", "/health")  # http.client reconnects
        assert resp.status == 200 and json.loads(body) == {"status": "ok"}
        conn.close()

        chunked = b'POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n0\r\n\r\n'
        cases = [
            (chunked, b"411", "Content-Length"),
            (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 1_0\r\n\r\n{}", b"400", "Content-Length"),
            (b"NONSENSE\r\n\r\n", b"400", "Bad request syntax"),
            (b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", b"431", "Too many headers"),
            (b"BREW /health HTTP/1.1\r\n\r\n", b"501", "Unsupported method"),
        ]
        for request, status, needle in cases:
            head, body = _raw(server, request)
            assert head.startswith(b"HTTP/1.1 " + status) and b"Connection: close" in head, (request, head)
            assert b"Content-Length: %d" % len(body) in head, (request, head, body)
            error = json.loads(body)["error"]
            assert needle in error["message"] and "\n" not in error["message"], (request, error)


def test_serve_threads_idle_and_dropped_connections(chat_run: Path, capfd: pytest.CaptureFixture[str]):
    """Each connection has its own thread: an idle kept-alive one, or one stuck sending its body, does not
    hold up another's requests; a client gone mid-stream leaves the server answering (no traceback); an
    idle connection is closed after `idle_timeout_s`."""
    from lmforge.serve import ServeLimits

    hi = {"prompt": "<|user|>\nhi\n<|assistant|>\n", "temperature": 0, "max_tokens": 16}
    with _serving(chat_run, limits=ServeLimits(idle_timeout_s=1.0)) as server:
        address = server.server_address[:2]
        idle = http.client.HTTPConnection(*address, timeout=30)
        assert _exchange(idle, "GET", "/health")[0].status == 200  # then left open, idle
        stuck = socket.create_connection(address, timeout=30)
        stuck.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # 99 bytes never come
        resp, body = _exchange(http.client.HTTPConnection(*address, timeout=30), "POST", "/v1/completions", hi)
        assert resp.status == 200 and json.loads(body)["choices"][0]["text"] == "hello there"

        # gone mid-stream: the connection is reset while the reply streams (SO_LINGER 0 sends a reset)
        data = json.dumps({**hi, "stream": True}).encode()
        for _ in range(3):
            gone = socket.create_connection(address, timeout=30)
            gone.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            gone.close()
        resp, body = _exchange(http.client.HTTPConnection(*address, timeout=30), "POST", "/v1/completions", hi)
        assert resp.status == 200 and json.loads(body)["choices"][0]["text"] == "hello there"

        # idle past idle_timeout_s: the server closes it (recv sees the end)
        for s in (idle.sock, stuck):
            s.settimeout(10)
            assert s.recv(1) == b""
        stuck.close()
        idle.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err


def test_serve_takes_a_burst_of_connections(chat_run: Path):
    """The listen backlog was socketserver's 5: connections past it while the accept loop was busy waited for a
    SYN retry (1 s and more), and the async openai client's bursts got "Connection error"s."""
    from lmforge.serve import make_server

    server = make_server(chat_run, port=0)  # not accepting yet: every connection waits in the backlog
    clients, refused = [], 0
    for _ in range(32):
        sock = socket.socket()
        sock.settimeout(0.5)
        try:
            sock.connect(server.server_address[:2])  # timed out past the 5th before
        except TimeoutError:
            refused += 1
        clients.append(sock)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert refused == 0
        for sock in clients:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for sock in clients:
            sock.close()
        server.shutdown()
        server.server_close()


def test_serve_is_quiet_when_a_client_resets_an_idle_connection(chat_run: Path, capfd: pytest.CaptureFixture[str]):
    """A kept-alive connection reset between requests (a client process exiting with pooled connections) is a
    client that left: socketserver printed a traceback on the server's stderr for each one."""
    with _serving(chat_run) as server:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        assert _exchange(conn, "GET", "/health")[0].status == 200  # its thread now waits for the next request
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # SO_LINGER 0: a reset
        deadline = time.monotonic() + 30
        while any("process_request" in t.name for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.02)  # until the connection's thread is done
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err, err


def test_serve_drops_a_reply_whose_client_left_before_it_was_ready(chat_run: Path):
    """A reply that is not streamed is written at the end: a client that gave up before then (a timeout,
    Ctrl-C on curl) held the model for all the tokens it had asked for, every other request waiting behind
    it. Its socket reads as ended now, and the server drops the request without running the model."""
    data = json.dumps({"prompt": "<|user|>\nhi\n<|assistant|>\n", "temperature": 0, "max_tokens": 16}).encode()
    with _serving(chat_run) as server:
        calls = []
        hook = server.ft.model.register_forward_hook(lambda *_: calls.append(1))
        with server.lock:  # the client is gone before the request can start, however the threads are scheduled
            with socket.create_connection(server.server_address[:2], timeout=30) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        deadline = time.monotonic() + 60
        while any("process_request" in t.name for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.02)  # until the request's thread is done
        assert not any("process_request" in t.name for t in threading.enumerate())
        assert calls == []  # not even the prompt's forward pass
        resp, body = _exchange(
            http.client.HTTPConnection(*server.server_address[:2], timeout=30), "POST", "/v1/completions", data
        )
        assert resp.status == 200 and json.loads(body)["choices"][0]["text"] == "hello there" and calls
        hook.remove()


def test_serve_completions_take_every_prompt_form(chat_run: Path):
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of lists of ids.
    A list gives one choice per prompt, `index` in order, each as that prompt alone gets it (seeded
    sampling included); streamed chunks carry their choice's index; usage sums over the prompts."""
    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(chat_run / "tokenizer.json")
    hi, bye = "<|user|>\nhi\n<|assistant|>\n", "<|user|>\nbye\n<|assistant|>\n"
    greedy = {"temperature": 0, "max_tokens": 16}
    with _serving(chat_run) as server:
        url = server.url + "/v1/completions"

        def complete(prompt: Any, **options: Any) -> dict:
            status, body = _post(url, {"prompt": prompt, **options})
            assert status == 200, body
            return json.loads(body)

        alone = [complete(p, **greedy) for p in (hi, bye)]
        assert [r["choices"][0]["text"] for r in alone] == ["hello there", "see you"]
        usage = {k: alone[0]["usage"][k] + alone[1]["usage"][k] for k in alone[0]["usage"]}
        choices = [
            {"index": 0, "text": "hello there", "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "text": "see you", "logprobs": None, "finish_reason": "stop"},
        ]
        ids = [tok.encode(hi), tok.encode(bye)]
        for prompt in ([hi, bye], ids):
            reply = complete(prompt, **greedy)
            assert reply["choices"] == choices and reply["usage"] == usage, (prompt, reply)
        reply = complete(ids[1], **greedy)  # one prompt as token ids
        assert reply["choices"] == [{**choices[1], "index": 0}] and reply["usage"] == alone[1]["usage"]
        assert complete([hi], **greedy)["choices"] == choices[:1]

        sampled = {"temperature": 1.0, "max_tokens": 8, "seed": 7}  # each prompt draws as if alone
        together = complete(["once", "upon", "once"], **sampled)["choices"]
        assert [c["text"] for c in together] == [
            complete(p, **sampled)["choices"][0]["text"] for p in ("once", "upon", "once")
        ]

        # streamed: each choice's chunks (then its finish) carry its index; stop strings cut each prompt's text
        options = {**greedy, "stream": True, "stop": " ", "stream_options": {"include_usage": True}}
        status, body = _post(url, {"prompt": [hi, bye], **options})
        chunks = _events(body)
        assert (
            status == 200
            and chunks[-1]["choices"] == []
            and chunks[-1]["usage"]["prompt_tokens"] == usage["prompt_tokens"]
        )
        texts: dict[int, str] = {}
        finished = []
        for c in chunks[:-1]:
            (choice,) = c["choices"]
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                finished.append((choice["index"], choice["finish_reason"]))
        assert texts == {0: "hello", 1: "see"} and finished == [(0, "stop"), (1, "stop")]

        vocab = tok.vocab_size
        refused = [
            ([], "got an empty list"),
            ([[]], "'prompt[0]' is an empty list of token ids"),
            ([ids[0], []], "'prompt[1]' is an empty list of token ids"),
            ([1, vocab], f"token id {vocab}, outside this model's vocabulary (ids 0 to {vocab - 1})"),
            ([[1], [-1]], "'prompt[1]' holds token id -1, outside"),
            ([1, "a"], 'must hold token ids (integers), got "a"'),
            ([[1.5]], "got 1.5"),
            ([True], "got a list of true"),
            (["a", 1], "'prompt[1]' is 1; a list of prompts holds strings"),
            ([[1], "a"], "'prompt[1]' must be a list of token ids"),
            ({"text": "a"}, "'prompt' must be a string, a list of strings, a list of token ids, or a list of lists"),
            (None, "got null"),
            ([hi, "y" * 60], "'prompt[1]' is 60 tokens and the model's context is 64, which holds 48 beside 16"),
            # each prompt is generated in turn: 100,000 of them (600 kB) kept the server busy for minutes
            ([hi] * 65, "'prompt' holds 65 prompts; this server takes at most 64 per request (--max-prompts)"),
        ]
        for prompt, needle in refused:
            status, body = _post(url, {"prompt": prompt, **greedy})
            error = json.loads(body)["error"]
            assert status == 400 and error["param"] == "prompt" and needle in error["message"], (prompt, error)
        status, body = _post(url, {"prompt": [ids[0], [vocab]], **greedy, "stream": True})  # checked before streaming
        assert status == 400 and "token id" in json.loads(body)["error"]["message"], body


def test_serve_logprobs_echo_and_n_are_the_models_numbers(chat_run: Path):
    """logprobs are log-softmax of the model's own logits (checked against a forward pass here); echo with
    max_tokens 1 and logprobs 1 is lm-evaluation-harness's `local-completions` scoring request, and the sum
    it takes over a continuation's tokens is the continuation's log-likelihood; n gives n seeded samples."""
    from lmforge.adapt.load import load_finetuned

    ft = load_finetuned(chat_run, torch.device("cpu"))
    context, answer = ft.tokenizer.encode("<|user|>\nhi\n<|assistant|>\n"), ft.tokenizer.encode("hello there")
    with torch.no_grad():
        logp = torch.log_softmax(ft.model(torch.tensor([context + answer]))[0].float(), dim=-1)
    expected = [logp[t - 1, tok].item() for t, tok in enumerate(context + answer) if t > 0]
    with _serving(chat_run) as server:
        url = server.url + "/v1"
        status, body = _post(url + "/completions", {"prompt": [context + answer], "max_tokens": 1, "temperature": 0,
                                                    "echo": True, "logprobs": 1, "seed": 1234})  # fmt: skip
        assert status == 200, body
        choice = json.loads(body)["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"].startswith("<|user|>\nhi\n<|assistant|>\nhello there")
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(context + answer) + 1  # + the generated one
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:-1] == pytest.approx(expected, abs=1e-4)
        assert lp["tokens"][len(context) : len(context) + 5] == list("hello")
        assert lp["text_offset"][len(context)] == len("<|user|>\nhi\n<|assistant|>\n")
        # the trained reply is greedy: each of its tokens is its position's top-1 (what the harness checks)
        answer_part = slice(len(context), len(context) + len(answer))
        for value, top in zip(lp["token_logprobs"][answer_part], lp["top_logprobs"][answer_part], strict=True):
            assert value == max(top.values())
        # max_tokens 0: the prompt scored, nothing generated
        status, body = _post(url + "/completions", {"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 0})
        reply = json.loads(body)
        assert reply["choices"][0]["text"] == "hi" and reply["usage"]["completion_tokens"] == 0
        assert reply["choices"][0]["logprobs"]["tokens"] == ["h", "i"]

        hi = [{"role": "user", "content": "hi"}]
        status, body = _post(url + "/chat/completions", {"messages": hi, "temperature": 0, "logprobs": True,
                                                         "top_logprobs": 3})  # fmt: skip
        choice = json.loads(body)["choices"][0]
        content = choice["logprobs"]["content"]
        assert "".join(c["token"] for c in content) == choice["message"]["content"] == "hello there"  # no EOS
        assert [c["logprob"] for c in content] == pytest.approx(expected[len(context) - 1 :], abs=1e-4)
        assert all(len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["token"] == c["token"] for c in content)
        assert content[0]["bytes"] == [ord("h")]

        sampled = {"prompt": ["once", "upon"], "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 3}
        choices = json.loads(_post(url + "/completions", sampled)[1])["choices"]
        assert [c["index"] for c in choices] == list(range(6))
        for i, prompt in enumerate(["once", "upon"]):  # choice j of a prompt samples with seed + j
            for j in range(3):
                alone = json.loads(_post(url + "/completions", {**sampled, "prompt": prompt, "n": 1, "seed": 5 + j})[1])
                assert choices[i * 3 + j]["text"] == alone["choices"][0]["text"]
        assert len({c["text"] for c in choices[:3]}) > 1

        # best_of: of the draws with seeds 5, 6, 7 the one with the highest log-probability per token
        draws = []
        for j in range(3):
            one = {"prompt": "once", "max_tokens": 6, "temperature": 1.0, "seed": 5 + j, "logprobs": 0}
            choice = json.loads(_post(url + "/completions", one)[1])["choices"][0]
            draws.append(
                (sum(choice["logprobs"]["token_logprobs"]) / len(choice["logprobs"]["tokens"]), choice["text"])
            )
        best = {"prompt": "once", "max_tokens": 6, "temperature": 1.0, "seed": 5, "best_of": 3}
        reply = json.loads(_post(url + "/completions", best)[1])
        assert [c["text"] for c in reply["choices"]] == [max(draws)[1]]
        assert reply["usage"]["completion_tokens"] >= 3  # every draw's tokens
        for payload, where, needle in [
            ({"prompt": "hi", "n": 2, "best_of": 1}, "/completions", "'best_of' must be a whole number >= 'n' (2)"),
            ({"prompt": "hi", "best_of": 2, "stream": True}, "/completions", "cannot stream"),
            ({"messages": hi, "best_of": 2}, "/chat/completions", "'best_of' is for /v1/completions"),
        ]:
            status, body = _post(url + where, payload)
            error = json.loads(body)["error"]
            assert status == 400 and error["param"] == "best_of" and needle in error["message"], error

        # penalties: the server's greedy text is generate()'s with the same Penalties
        from lmforge.generate import generate, run_stops
        from lmforge.sampling import Penalties

        asked = {"presence_penalty": 1.0, "frequency_penalty": 0.5, "repetition_penalty": 1.2}
        status, body = _post(url + "/completions", {"prompt": "once", "max_tokens": 12, "temperature": 0, **asked})
        ids = generate(ft.model, ft.tokenizer.encode("once"), max_new_tokens=12, temperature=0,
                       stop_ids=run_stops(ft), penalties=Penalties(1.0, 0.5, 1.2))  # fmt: skip
        assert json.loads(body)["choices"][0]["text"] == ft.tokenizer.decode(ids, skip_special_tokens=True)
        plain = json.loads(_post(url + "/completions", {"prompt": "once", "max_tokens": 12, "temperature": 0})[1])
        assert plain["choices"][0]["text"] != json.loads(body)["choices"][0]["text"]
        # logit_bias -100 bans a token: the trained reply "hello there" cannot start with its "h"
        h = str(ft.tokenizer.encode("h")[0])
        greedy_hi = {"messages": hi, "temperature": 0, "max_tokens": 5}
        reply = json.loads(_post(url + "/chat/completions", {**greedy_hi, "logit_bias": {h: -100}})[1])
        assert not reply["choices"][0]["message"]["content"].startswith("h")
        for bias, needle in [
            ({"x": 1}, "key 'x' is not a token id"),
            ({h: 200}, "must be a number in [-100, 100]"),
            ([1], "must be an object"),
            ({"²": 1}, "key '²' is not a token id"),
            ({"١": 1}, "key '١' is not a token id"),
        ]:  # (Unicode digits: "²" was a 500, "١" token 1)
            status, body = _post(url + "/chat/completions", {**greedy_hi, "logit_bias": bias})
            error = json.loads(body)["error"]
            assert status == 400 and error["param"] == "logit_bias" and needle in error["message"], error
    r = run_cli("generate", str(chat_run), "--prompt", "hi", "--repetition-penalty", "0")
    assert r.returncode == 2 and r.stderr.strip() == (
        "lmforge: error: repetition penalty must be > 0 (1 = off; 1.1-1.3 is typical), got 0.0"
    )


def test_logprobs_text_offsets_around_cut_characters():
    """A byte-level token can hold part of a character: the token that completes it starts where the character
    does, and a stray byte that never completes one (shown as U+FFFD) still takes up its character."""
    from types import SimpleNamespace

    from lmforge.serve_logprobs import completion_logprobs

    pieces = {1: b"ab", 2: b"\xe4", 3: b"\xbd\xa0", 4: b"\xff", 5: b"cd"}  # ab, 你 in two tokens, a stray byte

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    names = SimpleNamespace(name=str)
    scored = [(None, [])] + [(-1.0, [])] * 4
    result = completion_logprobs(names, decode, [1, 2, 3, 4, 5], [], scored, echo=True)
    assert decode([1, 2, 3, 4, 5]) == "ab你\ufffdcd" and result["text_offset"] == [0, 2, 2, 3, 4]


def test_logprobs_text_offsets_index_the_text_returned_after_a_special_token(chat_run: Path):
    """With `echo`, a string prompt comes back as sent, <|endoftext|> as its 13 characters, but the offsets
    were found by decoding the prompt's ids, which drops it: every later token's offset was 13 too small."""
    past = "see you<|endoftext|><|user|>\nhi\n<|assistant|>\n"
    with _serving(chat_run) as server:
        for echo in (True, False):
            asked = {"prompt": past, "echo": echo, "logprobs": 0, "max_tokens": 4, "temperature": 0}
            status, body = _post(server.url + "/v1/completions", asked)
            choice = json.loads(body)["choices"][0]
            text, lp = (choice["text"] if echo else past + choice["text"]), choice["logprobs"]
            assert status == 200 and text.startswith(past) and len(lp["tokens"]) == (len(past) - 12 + 4 if echo else 4)
            for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
                if offset < len(past) or token != "<|endoftext|>":  # (a generated one ends the text, unwritten)
                    assert text[offset : offset + len(token)] == token, (token, offset, text)
            if echo:
                assert lp["text_offset"][7:9] == [7, 20]  # <|endoftext|>, then the <|user|> after it
            else:
                assert lp["text_offset"][0] == len(past)  # a completion's offsets count from the prompt's start


def test_serve_streams_logprobs_in_each_chunk(chat_run: Path):
    """`"stream": true` with logprobs was refused; OpenAI sends each chunk's tokens' logprobs in that chunk. The
    chunks' lists joined are the unstreamed reply's (the numbers from the decode step's logits, to 1e-4)."""

    def joined(chunks: list[dict], chat: bool) -> dict[str, list]:
        out: dict[str, list] = {}
        for c in chunks:
            choice = c["choices"][0]
            if choice["logprobs"] is None:
                continue
            for key, values in choice["logprobs"].items():
                out[key] = out.get(key, []) + (values or [])
            if chat:  # each token's logprobs ride in the chunk that carries its text (one character each here)
                assert "".join(e["token"] for e in choice["logprobs"]["content"]) == choice["delta"]["content"]
        return out

    completion = {"prompt": "<|user|>\nhi\n<|assistant|>\n", "temperature": 0, "max_tokens": 16, "logprobs": 2}
    chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "logprobs": True, "top_logprobs": 2}
    with _serving(chat_run) as server:
        for path, payload in [
            ("/v1/completions", completion),
            ("/v1/completions", {**completion, "echo": True, "stop": " "}),  # the prompt's first, a stop string
            ("/v1/chat/completions", chat),
        ]:
            status, body = _post(server.url + path, payload)
            whole = json.loads(body)["choices"][0]
            status, body = _post(server.url + path, {**payload, "stream": True})
            assert status == 200, body
            chunks = _events(body)
            is_chat = "messages" in payload
            streamed = joined(chunks, is_chat)
            if is_chat:
                content, expected = streamed["content"], whole["logprobs"]["content"]
                assert "".join(e["token"] for e in content) == whole["message"]["content"] == "hello there"
                assert [e["token"] for e in content] == [e["token"] for e in expected]
                assert [e["logprob"] for e in content] == pytest.approx([e["logprob"] for e in expected], abs=1e-4)
                assert [[a["token"] for a in e["top_logprobs"]] for e in content] == [
                    [a["token"] for a in e["top_logprobs"]] for e in expected
                ]
                continue
            expected = whole["logprobs"]
            assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
            assert streamed["tokens"] == expected["tokens"] and streamed["text_offset"] == expected["text_offset"]
            first = 1 if payload.get("echo") else 0  # (the prompt's first token has no logprob: null)
            assert streamed["token_logprobs"][:first] == expected["token_logprobs"][:first]
            assert streamed["token_logprobs"][first:] == pytest.approx(expected["token_logprobs"][first:], abs=1e-4)
            assert [list(t or {}) for t in streamed["top_logprobs"]] == [
                list(t or {}) for t in expected["top_logprobs"]
            ]


def test_serve_logprobs_leave_out_the_stop_strings_tokens(chat_run: Path):
    """A stop string is cut from the text, but its tokens were still in `logprobs` ("hello" came with the tokens
    of "hello there"), streamed or not, and a stream sent those it held back early. The tokens listed are now
    the text's, in every chunk with the text they begin in; usage still counts every token generated."""
    hi = [{"role": "user", "content": "hi"}]
    with _serving(chat_run) as server:
        for path, payload in [
            ("/v1/completions", {"prompt": "<|user|>\nhi\n<|assistant|>\n", "logprobs": 1}),
            ("/v1/chat/completions", {"messages": hi, "logprobs": True, "top_logprobs": 1}),
        ]:
            asked = {**payload, "temperature": 0, "max_tokens": 16, "stop": [" there", "zz"]}
            chat = "messages" in payload
            status, body = _post(server.url + path, asked)
            reply = json.loads(body)
            choice = reply["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            tokens = [e["token"] for e in choice["logprobs"]["content"]] if chat else choice["logprobs"]["tokens"]
            assert status == 200 and text == "hello" and choice["finish_reason"] == "stop", body
            assert "".join(tokens) == "hello"  # (was "hello there")
            assert reply["usage"]["completion_tokens"] == len("hello there")
            status, body = _post(server.url + path, {**asked, "stream": True})
            streamed = []
            for event in _events(body):
                piece = event["choices"][0]
                if piece["logprobs"] is None:
                    continue
                names = [e["token"] for e in piece["logprobs"]["content"]] if chat else piece["logprobs"]["tokens"]
                assert "".join(names) == (piece["delta"]["content"] if chat else piece["text"]), event
                streamed += names
            assert streamed == tokens


def test_logprobs_text_offsets_of_a_character_in_three_tokens():
    """界 as three byte tokens: the middle one left the decoded text as it was ("a\ufffd") and was put after
    the cut character (offsets 0, 1, 2, 1, 2); every piece of it starts where the character does."""
    from lmforge.serve_logprobs import TextOffsets

    pieces = {1: b"a", 2: b"\xe7", 3: b"\x95", 4: b"\x8c", 5: b"b"}

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    assert TextOffsets(decode).feed([1, 2, 3, 4, 5]) == [0, 1, 1, 1, 2]
    assert TextOffsets(decode, start=3).feed([2, 3, 5]) == [3, 3, 4]  # never completed: it takes up its place


def test_serve_logprobs_of_a_model_padded_past_its_tokenizer(tmp_path: Path):
    """A model padded past its tokenizer (`--model.vocab_size 50304`) samples only the tokenizer's ids, but its
    unstreamed logprobs were a log-softmax over the padding rows too (and differed from the streamed ones)."""
    from lmforge.adapt.load import load_finetuned
    from lmforge.tokenizer.train import train_char

    tok = train_char(["once upon a time"])
    base = make_base(tmp_path, max_seq_len=32, tok=tok, vocab_size=4 * tok.vocab_size)  # 3/4 of the ids: padding
    ft = load_finetuned(base, torch.device("cpu"))
    ids = ft.tokenizer.encode("once upon")
    with torch.no_grad():
        logits = ft.model(torch.tensor([ids]))[0, :, : ft.tokenizer.vocab_size].float()
    logp = torch.log_softmax(logits, dim=-1)
    with _serving(base) as server:
        asked = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3}
        lp = json.loads(_post(server.url + "/v1/completions", asked)[1])["choices"][0]["logprobs"]
    expected = [logp[t - 1, token].item() for t, token in enumerate(ids) if t > 0]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)


def test_serve_tokenizer_endpoints_as_vllm_has_them(chat_run: Path):
    """GET /tokenizer_info, POST /tokenize and /detokenize: what lm-evaluation-harness's remote tokenizer reads
    (it then needs no exported tokenizer), and clients use to count tokens."""
    from lmforge.adapt.load import load_finetuned
    from lmforge.chat import ChatTemplate

    ft = load_finetuned(chat_run, torch.device("cpu"))
    hi = [{"role": "user", "content": "hi"}]
    with _serving(chat_run) as server:
        with urllib.request.urlopen(server.url + "/tokenizer_info", timeout=30) as resp:
            info = json.loads(resp.read())
        assert info["eos_token"] == "<|endoftext|>" and info["bos_token"] is None
        assert info["chat_template"] == ChatTemplate().jinja and info["model_max_length"] == 64
        status, body = _post(server.url + "/tokenize", {"prompt": "hi<|endoftext|>", "add_special_tokens": False})
        reply = json.loads(body)
        assert reply["tokens"] == [*ft.tokenizer.encode("hi"), ft.tokenizer.eos_id] and reply["count"] == 3
        status, body = _post(server.url + "/tokenize", {"messages": hi})
        assert json.loads(body)["tokens"] == ChatTemplate().prompt_ids(ft.tokenizer, hi, budget=64)[0]
        status, body = _post(server.url + "/detokenize", {"tokens": reply["tokens"]})
        assert status == 200 and json.loads(body) == {"prompt": "hi<|endoftext|>"}
        for path, payload, needle in [
            ("/tokenize", {"prompt": 5}, "'prompt' must be a string"),
            ("/tokenize", {"messages": "hi"}, "'messages' must be a list"),
            ("/detokenize", {"tokens": [10**6]}, "outside this model's vocabulary"),
        ]:
            status, body = _post(server.url + path, payload)
            assert status == 400 and needle in json.loads(body)["error"]["message"], body


def test_tokenize_without_a_generation_prompt_gives_any_conversations_ids(chat_run: Path):
    """/tokenize with "add_generation_prompt": false refused a conversation without an assistant turn ("nothing to
    learn", a check of training data): it gives the ids of the conversation as rendered, as transformers'
    apply_chat_template(..., add_generation_prompt=False) gives them from the template /tokenizer_info serves."""
    transformers = pytest.importorskip("transformers")
    from lmforge.adapt.load import load_finetuned
    from lmforge.chat import ChatTemplate
    from lmforge.serve_request import RequestError, tokenize_reply

    ft = load_finetuned(chat_run, torch.device("cpu"))
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(chat_run / "tokenizer.json"), eos_token="<|endoftext|>"
    )
    hf.chat_template = ChatTemplate().jinja_for(ft.tokenizer)
    user = {"role": "user", "content": "hi"}
    for messages in (
        [user],
        [{"role": "system", "content": "be brief"}, user],
        [user, {"role": "assistant", "content": "yo"}],
    ):
        for prompt in (False, True):
            got = tokenize_reply(ft, {"messages": messages, "add_generation_prompt": prompt}, 64)["tokens"]
            theirs = hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            assert got == (theirs["input_ids"] if hasattr(theirs, "keys") else theirs), (messages, prompt)
    with pytest.raises(RequestError, match="empty conversation"):  # a malformed one is still refused
        tokenize_reply(ft, {"messages": [], "add_generation_prompt": False}, 64)


def test_serve_reads_special_tokens_in_a_prompt_string_as_tokenize_does(chat_run: Path):
    """A completion's string prompt holding "<|endoftext|>" went to the model as 13 characters' tokens, while
    /tokenize counted it as the one EOS id: a client that rendered past replies with the chat template from
    /tokenizer_info (each ends with the EOS) prompted the model with ids it was never trained on."""
    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(chat_run / "tokenizer.json")
    past = "see you<|endoftext|><|user|>\nhi\n<|assistant|>\n"  # (a char tokenizer, a 64-token context)
    greedy = {"temperature": 0, "max_tokens": 8}
    with _serving(chat_run) as server:
        tokens = json.loads(_post(server.url + "/tokenize", {"prompt": past})[1])["tokens"]
        assert tok.eos_id in tokens
        status, body = _post(server.url + "/v1/completions", {"prompt": past, **greedy})
        as_text = json.loads(body)
        status, body = _post(server.url + "/v1/completions", {"prompt": tokens, **greedy})
        as_ids = json.loads(body)
        assert status == 200 and as_text["usage"] == as_ids["usage"], (as_text, as_ids)
        assert as_text["usage"]["prompt_tokens"] == len(tokens)
        assert as_text["choices"][0]["text"] == as_ids["choices"][0]["text"]


def test_generate_reads_a_prompt_as_serve_does(chat_run: Path):
    """`lmforge generate --prompt` read "<|endoftext|>" as 13 characters while serve's completions read it as the
    EOS id: the same prompt gave the model other ids (here 69 of them, past the 64-token context: an error)."""
    import io

    from lmforge.adapt.load import load_finetuned
    from lmforge.generate import generate_from_checkpoint, prompt_text_ids

    ft = load_finetuned(chat_run, torch.device("cpu"))
    prompt = "y" * 30 + "<|endoftext|><|user|>\nhi\n<|assistant|>\n"
    ids = prompt_text_ids(ft, prompt)
    assert len(ids) == 57 and ids[30] == ft.tokenizer.eos_id
    shown = io.StringIO()
    text = generate_from_checkpoint(chat_run, prompt=prompt, temperature=0, max_new_tokens=7, stream=shown)
    assert shown.getvalue() == prompt + text
    with _serving(chat_run) as server:
        for sent in (prompt, ids):
            status, body = _post(server.url + "/v1/completions", {"prompt": sent, "temperature": 0, "max_tokens": 7})
            reply = json.loads(body)
            assert status == 200 and reply["usage"]["prompt_tokens"] == 57, reply
            assert reply["choices"][0]["text"] == text


def test_serve_prompt_text_keeps_lmforge_role_markers_as_text():
    """With <|user|>/<|assistant|> reserved in the tokenizer (--special-tokens all, unigram), lmforge's chat
    template trains on them as text: a prompt's markers stay text, as the HF export reads them, and only the
    EOS string becomes its id; an imported model's own template reads every special-token string as its id."""
    from types import SimpleNamespace

    from lmforge.chat import ChatTemplate, JinjaChatTemplate
    from lmforge.generate import prompt_text_ids
    from lmforge.tokenizer.train import train_bpe

    tok = train_bpe([(Path(__file__).parent / "data" / "alpaca.jsonl").read_text(encoding="utf-8")], 400,
                    extra_specials=True)  # fmt: skip
    turn = "<|user|>\nhi\n<|assistant|>\nok"
    want = tok.encode(turn) + [tok.eos_id]
    assert tok.encode_markup(turn + "<|endoftext|>").ids != want  # the reserved marker ids
    for template in (ChatTemplate(), None):  # a chat-tuned run, and a plain one (serve chats with lmforge's)
        assert prompt_text_ids(SimpleNamespace(tokenizer=tok, template=template), turn + "<|endoftext|>") == want
    imported = SimpleNamespace(tokenizer=tok, template=JinjaChatTemplate(source="", eos_token="<|endoftext|>"))
    assert prompt_text_ids(imported, turn) == tok.encode_markup(turn).ids


def test_serve_cors_lets_only_the_pages_named_call_it(chat_run: Path):
    """Browser pages: none may call the API by default (a page the user visits cannot use the model); with
    --cors-origin the named page's preflight and requests get CORS's allow headers, another page's do not."""
    import http.client

    page, other = "http://localhost:3000", "http://evil.example"

    def ask(server, method: str, path: str, origin: str | None, body: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        headers = {"Content-Type": "application/json"} | ({"Origin": origin} if origin else {})
        if method == "OPTIONS" and origin:
            headers |= {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        data = reply.read()
        conn.close()
        return reply.status, dict(reply.getheaders()), data

    completion = json.dumps({"prompt": "ROMEO:", "max_tokens": 2, "temperature": 0}).encode()
    with _serving(chat_run) as server:
        status, headers, _ = ask(server, "GET", "/v1/models", page)
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
        status, _, data = ask(server, "OPTIONS", "/v1/completions", page)
        assert status == 403 and "--cors-origin http://localhost:3000" in json.loads(data)["error"]["message"]
        status, headers, _ = ask(server, "OPTIONS", "/v1/completions", None)  # not a browser: the methods
        assert status == 204 and headers["Allow"] == "POST, OPTIONS"
    with _serving(chat_run, cors_origins=(page,)) as server:
        status, headers, data = ask(server, "OPTIONS", "/v1/chat/completions", page)
        assert status == 204 and data == b"" and headers["Access-Control-Allow-Origin"] == page
        assert headers["Access-Control-Allow-Methods"] == "POST, OPTIONS" and headers["Vary"] == "Origin"
        assert headers["Access-Control-Allow-Headers"] == "authorization"
        status, headers, data = ask(server, "POST", "/v1/completions", page, completion)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == page and json.loads(data)["choices"]
        status, headers, _ = ask(server, "POST", "/v1/completions", other, completion)
        assert status == 200 and "Access-Control-Allow-Origin" not in headers  # the browser hides the reply
        assert ask(server, "OPTIONS", "/v1/completions", other)[0] == 403
        status, headers, _ = ask(server, "GET", "/nowhere", page)  # errors carry it too: the page can read them
        assert status == 404 and headers["Access-Control-Allow-Origin"] == page
    with _serving(chat_run, cors_origins=("*",)) as server:
        status, headers, _ = ask(server, "OPTIONS", "/v1/models", other)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in headers
        assert headers["Access-Control-Allow-Methods"] == "GET, HEAD, OPTIONS"


def test_serve_a_stream_nobody_reads_does_not_hold_up_other_requests(chat_run: Path):
    """The model lock was held while a streamed reply was written, so a client that stopped reading (its
    socket buffers full) blocked every other request until `idle_timeout_s` ended its connection. Now the
    model hands the text to the connection's thread, which writes it without the lock."""
    from lmforge.serve import ServeLimits

    hi = {"prompt": "<|user|>\nhi\n<|assistant|>\n", "temperature": 0, "max_tokens": 16}
    with _serving(chat_run, limits=ServeLimits(idle_timeout_s=60.0)) as server:
        # small buffers (a listening socket's are inherited by the connections it accepts): a few kB of
        # events fill them, where the defaults would take megabytes
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(server.server_address[:2])
        data = json.dumps({**hi, "prompt": [hi["prompt"]] * 100, "stream": True}).encode()  # ~150 kB of events
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        assert stalled.recv(1)  # the stream started; from here on it is never read
        time.sleep(1.0)  # its writes fill the buffers and block
        try:
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=20)
            resp, body = _exchange(conn, "POST", "/v1/completions", hi)  # old code: timed out waiting for the lock
            assert resp.status == 200 and json.loads(body)["choices"][0]["text"] == "hello there"
            conn.close()
        finally:
            stalled.close()


def test_serve_stops_cleanly_on_ctrl_c_while_it_generates(chat_run: Path):
    """Ctrl-C (or SIGTERM, the same handler) while a generation ran (on a connection's daemon thread) left it
    inside torch as the interpreter exited: the process aborted (C++ `terminate called without an active
    exception`, exit -6) instead of ending. Now the generation ends at its next token first; `serve` exits 0."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    proc = start_cli("serve", str(chat_run), "--port", str(port), "--max-prompts", "1000")
    try:
        deadline = time.monotonic() + 60
        while True:  # until it listens
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
        with s:  # 1000 streamed choices of 40 tokens: far from done when the signal comes
            data = json.dumps({"prompt": "hi", "max_tokens": 40, "n": 1000, "stream": True}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            got = b""
            while b"data: " not in got:  # the first token is out: the generation runs
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "terminate" not in err, err


def test_serve_answers_expect_100_continue(chat_run: Path):
    """curl sends `Expect: 100-continue` for bodies over 1 kB and waits for "100 Continue" before sending the
    body: a body that will be read is invited and answered; one over the limit was invited too, then dropped
    after the upload, and is now refused at once (no 100), before the client sends it."""
    from lmforge.serve import ServeLimits

    data = json.dumps({"prompt": "<|user|>\nhi\n<|assistant|>\n" + " " * 1500, "max_tokens": 2}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
    with _serving(chat_run, limits=ServeLimits(max_body_bytes=4000)) as server:
        with socket.create_connection(server.server_address[:2], timeout=30) as s:
            s.sendall(head % len(data))
            assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            s.sendall(data)
            resp = http.client.HTTPResponse(s)
            resp.begin()
            error = json.loads(resp.read())["error"]
        assert resp.status == 400 and error["code"] == "context_length_exceeded", error  # it read the body

        with socket.create_connection(server.server_address[:2], timeout=30) as s:
            s.sendall(head % 5_000_000)  # the body is never sent
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 413") and b"Connection: close" in reply, reply
        assert b"request_too_large" in reply


# an imported instruct model's own (Jinja) chat template


def _imported_chatml(root: Path, template: str | None = None) -> tuple[Path, Any]:
    """A ChatML model built by transformers (tests.test_export.chatml_dir), imported; and its HF tokenizer."""
    from lmforge.export.hf_import import import_hf
    from lmforge.tokenizer.train import train_bpe
    from tests.test_export import CHATML, CONVERSATION, chatml_dir

    bpe = train_bpe([m["content"] for m in CONVERSATION] * 20 + ["system user assistant\n"] * 20, vocab_size=300)
    hf_tok = chatml_dir(bpe, root / "hf", template=template or CHATML)
    return import_hf(root / "hf", root / "run"), hf_tok


def test_imported_chat_template_prompts_as_transformers_does(tmp_path: Path):
    """The ids chat, serve and eval prompt an imported ChatML model with are transformers' apply_chat_template
    ids (multi-turn, system message, the template's own BOS), and its `<|im_end|>` ends a reply."""
    import io

    from lmforge.adapt.load import load_finetuned
    from lmforge.chat import JinjaChatTemplate, chat
    from lmforge.generate import run_stops
    from lmforge.serve_request import tokenizer_info
    from tests.test_export import CONVERSATION

    run, hf_tok = _imported_chatml(tmp_path)
    ft = load_finetuned(run, torch.device("cpu"))
    assert isinstance(ft.template, JinjaChatTemplate)
    theirs = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids, dropped = ft.template.prompt_ids(ft.tokenizer, CONVERSATION, budget=10_000)
    assert ids == theirs and dropped == 0 and ids[0] == hf_tok.convert_tokens_to_ids("<s>")
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") in run_stops(ft)
    info = tokenizer_info(ft, 64)  # the bos/eos strings a client renders the template with, as vLLM names them
    assert (info["bos_token"], info["eos_token"], info["chat_template"]) == ("<s>", "<|im_end|>", hf_tok.chat_template)
    out = io.StringIO()
    kwargs = {"max_new_tokens": 4, "temperature": 0, "device": "cpu", "interactive": True}  # (the banner on stdout)
    assert chat(run, stdin=io.StringIO("hi\n/exit\n"), stdout=out, **kwargs) == 1
    assert "not chat-tuned" not in out.getvalue() and "bot> " in out.getvalue()


def test_imported_chat_template_errors_are_one_line(tmp_path: Path):
    from lmforge.chat import load_template
    from lmforge.errors import DataError
    from lmforge.tokenizer.tokenizer import Tokenizer

    refusing = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message comes first') }}{% endif %}"
    )
    run, _ = _imported_chatml(tmp_path, template=refusing + "{{ messages[0]['content'] }}")
    template = load_template(run)
    with pytest.raises(DataError, match="^the chat template refuses this conversation: a system message comes first$"):
        template.prompt_ids(Tokenizer.load(run / "tokenizer.json"), [{"role": "user", "content": "hi"}], budget=100)


def test_imported_chat_template_marks_the_replies_for_training(tmp_path: Path):
    """sft on an imported ChatML model: the conversation's ids are transformers' (no generation prompt), and the
    targets are exactly each reply + `<|im_end|>` (the newline the template writes after it is context, since
    generation stops at `<|im_end|>`); nothing of the system or user turns. The fine-tune keeps the template."""
    from lmforge.chat import JinjaChatTemplate, load_template
    from lmforge.errors import DataError
    from lmforge.tokenizer.tokenizer import Tokenizer
    from tests.test_export import CONVERSATION

    run, hf_tok = _imported_chatml(tmp_path)
    tok, template = Tokenizer.load(run / "tokenizer.json"), load_template(run)
    replies = ["jumps over the lazy dog, twice.", "你好！ The lazy dog."]
    conversation = [*CONVERSATION[:2], {"role": "assistant", "content": replies[0]}, CONVERSATION[3]]
    conversation.append({"role": "assistant", "content": replies[1]})
    segments = template.segments(tok, conversation)
    assert [i for ids, _ in segments for i in ids] == hf_tok.apply_chat_template(
        conversation, tokenize=True, return_dict=False
    )
    assert [ids for ids, train in segments if train] == [hf_tok.encode(r + "<|im_end|>") for r in replies]
    assert [train for _, train in segments] == [False, True, False, True, False]  # the last: the final "\n"

    rewriting = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DataError, match="^the chat template rewrites earlier turns .* cannot be marked for training"):
        JinjaChatTemplate(source=rewriting).segments(tok, conversation)

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": conversation}, ensure_ascii=False) + "\n", encoding="utf-8")
    overrides = {"train": {"max_steps": 2, "batch_size": 1}}
    finetune(
        run,
        train_file=data,
        out=tmp_path / "ft",
        cfg=FinetuneConfig(task="sft", max_new_tokens=8),
        overrides=overrides,
        progress=False,
    )
    assert load_template(tmp_path / "ft") == template


def test_serve_answers_only_its_served_model_names_when_given(chat_run: Path):
    """`--served-model-name` (vLLM's): /v1/models lists those names, replies carry the first, and a completion or
    chat request (streamed or not) for another model is OpenAI's 404 `model_not_found`, not this model's text.
    Without it any name is answered, as before (an OpenAI app runs unchanged)."""
    from lmforge.serve import make_server

    hi = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 2}
    with _serving(chat_run, served_model_names=("tiny", "tiny-alias", "tiny")) as server:
        base = server.url + "/v1"
        with urllib.request.urlopen(base + "/models", timeout=30) as resp:
            assert [m["id"] for m in json.loads(resp.read())["data"]] == ["tiny", "tiny-alias"]
        with urllib.request.urlopen(base + "/models/tiny-alias", timeout=30) as resp:
            assert json.loads(resp.read())["id"] == "tiny-alias"
        for path, payload in [
            ("/completions", {"prompt": "a", "max_tokens": 2, "model": "gpt-4o"}),
            ("/chat/completions", {**hi, "model": "run"}),  # (the run directory's name is no longer one)
            ("/chat/completions", {**hi, "model": "gpt-4o", "stream": True}),
        ]:
            status, body = _post(base + path, payload)
            error = json.loads(body)["error"]
            assert status == 404 and error == {
                "message": f"The model '{payload['model']}' does not exist; this server serves 'tiny', 'tiny-alias'",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        for model in ("tiny-alias", None):  # (none named: the served model, as vLLM)
            status, body = _post(base + "/chat/completions", {**hi, "model": model})
            assert status == 200 and json.loads(body)["model"] == "tiny", body
    with _serving(chat_run) as server:
        status, body = _post(server.url + "/v1/chat/completions", {**hi, "model": "gpt-4o"})
        assert status == 200 and json.loads(body)["model"] == "run"
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="--served-model-name must not be empty"):
        make_server(chat_run, port=0, served_model_names=(" ",))


def test_chat_seed_gives_each_reply_of_a_session_its_own_draws(chat_run: Path):
    """`chat --seed S` seeded every reply with S: they all drew the same random numbers, so a message sent again
    after /reset got the very same reply. Reply i now samples with S + i (serve's choice j: seed + j): the session
    is still reproducible, and the second reply is the one a session seeded S + 1 gives first."""
    import io

    from lmforge.chat import chat

    def replies(stdin: str, seed: int) -> list[str]:
        out = io.StringIO()
        kwargs = {"temperature": 2.0, "top_k": 0, "seed": seed, "max_new_tokens": 12, "interactive": True}
        chat(chat_run, stdin=io.StringIO(stdin), stdout=out, **kwargs)  # (a reply of random text may hold a newline)
        return [line.split("bot> ", 1)[1] for line in out.getvalue().splitlines() if "bot> " in line]

    first, again = replies("hi\n/reset\nhi\n", seed=3)
    assert first != again and [first, again] == replies("hi\n/reset\nhi\n", seed=3)
    assert replies("hi\n", seed=4) == [again] and replies("hi\n", seed=3) == [first]


def test_serve_echo_of_token_ids_cut_inside_a_character_reads_as_whole_characters(tmp_path: Path):
    """A token-id prompt that ends inside a character (你's first 2 byte tokens, e4 bd) was echoed as its decoding,
    "\\ufffd", and the completion that completes it (a0, forced by logit_bias) then gave "你": the reply read
    "\\ufffd你". The echo is the prompt's whole characters and the completion goes on from there, streamed or not,
    with the text offsets of that text; a character the completion never completes stays the prompt's U+FFFD."""
    from lmforge.tokenizer.train import train_bpe

    tok = train_bpe(["hello world"], vocab_size=300)
    ids = tok.encode("a你")
    assert len(ids) == 4  # a, then one token per byte of 你
    base = make_base(tmp_path, max_seq_len=32, tok=tok)
    with _serving(base) as server:
        url = server.url + "/v1/completions"
        for bias, text, offsets in (
            ({ids[3]: 100}, "a你", [0, 1, 1, 1]),
            ({tok.encode("b")[0]: 100}, "a\ufffdb", [0, 1, 1, 2]),
        ):
            asked = {"prompt": ids[:3], "max_tokens": 1, "temperature": 0, "echo": True, "logit_bias": bias}
            choice = json.loads(_post(url, asked | {"logprobs": 0})[1])["choices"][0]
            assert choice["text"] == text and choice["logprobs"]["text_offset"] == offsets, choice
            events = _events(_post(url, asked | {"stream": True})[1])
            assert "".join(e["choices"][0]["text"] for e in events) == text, events
            assert not any(e["choices"][0]["text"].endswith("\ufffd") for e in events if text == "a你"), events
