"""`lmforge generate --prompt-file / --num-samples`: batched = one prompt at a time; JSONL out; one-line errors."""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path

import pytest

from lmforge import generate_many as many
from lmforge.errors import LmforgeError
from lmforge.generate import generate_from_checkpoint
from tests.test_generate import one_thread  # noqa: F401  (autouse: one intra-op thread here too)

# ragged lengths (1 to 32 characters: the char tokenizer's tokens), a special-token string, Chinese, a line that
# starts with spaces; with 20 new tokens in a 48-token context the 32-character one does not fit a batch cache
PROMPTS = ["Hello wor", "a", "The cat sat on the mat and then t", "   a", "<|endoftext|>ab", "红楼梦", "xyz, said he"]
GREEDY = dict(max_new_tokens=20, temperature=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_finetune import make_base

    return make_base(tmp_path_factory.mktemp("many"), max_seq_len=48, init_std=0.5)  # (0.5: varied greedy text)


def test_prompt_file_greedy_equals_one_prompt_at_a_time(base: Path, tmp_path: Path, monkeypatch) -> None:
    """Batched (left-padded, several batches, one prompt past the batch cache) greedy completions are those of
    `--prompt` one at a time, with and without --stop; .txt and .jsonl give the same; --out gets the JSONL."""
    monkeypatch.setattr(many, "PROMPT_BATCH", 3)  # 7 prompts: three batches, the last one partial
    alone = [generate_from_checkpoint(base, prompt=p, **GREEDY) for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS) and all(len(a) >= 15 for a in alone)
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(PROMPTS[:3]) + "\n\n" + "\r\n".join(PROMPTS[3:]) + "\n", encoding="utf-8")
    out = io.StringIO()
    written = generate_from_checkpoint(base, prompt_file=txt, **GREEDY, stream=out)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert written == out.getvalue() and [r["prompt"] for r in records] == PROMPTS
    assert [r["completion"] for r in records] == alone
    assert {r["finish_reason"] for r in records} == {"length"}

    stop = alone[0][6:8]  # two characters: two tokens; cut where each text first has it
    stopped = [generate_from_checkpoint(base, prompt=p, **GREEDY, stop=[stop]) for p in PROMPTS]
    assert (
        stopped[0] == alone[0][: alone[0].find(stop)] and sum(s != a for s, a in zip(stopped, alone, strict=True)) >= 1
    )
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n\n" for i, p in enumerate(PROMPTS)), "utf-8")
    generate_from_checkpoint(base, prompt_file=jsonl, out=tmp_path / "out" / "c.jsonl", **GREEDY, stop=[stop])
    records = [json.loads(line) for line in (tmp_path / "out" / "c.jsonl").read_text("utf-8").splitlines()]
    assert [r["completion"] for r in records] == stopped
    assert [r["finish_reason"] for r in records] == [
        "stop" if s != a else "length" for s, a in zip(stopped, alone, strict=True)
    ]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_a_compressed_prompt_file_is_read_as_prepare_reads_one(base: Path, tmp_path: Path, monkeypatch) -> None:
    """prompts.jsonl.gz is JSONL (it was read as text: its bytes "not UTF-8"), decompressed; gzip on stdin is a
    one-line error saying to pipe it through zcat."""
    plain = tmp_path / "p.jsonl"
    plain.write_text('{"id": 1, "prompt": "红楼"}\n{"id": 2, "prompt": "ab"}\n', encoding="utf-8")
    packed = tmp_path / "p.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    want = generate_from_checkpoint(base, prompt_file=plain, **GREEDY)
    assert generate_from_checkpoint(base, prompt_file=packed, **GREEDY) == want and '"id": 2' in want
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(packed.read_bytes())))
    with pytest.raises(LmforgeError, match="stdin is gzip-compressed; pipe it through zcat"):
        generate_from_checkpoint(base, prompt_file="-", **GREEDY)


def test_num_samples_are_seeded_and_differ(base: Path, tmp_path: Path) -> None:
    sampled = dict(max_new_tokens=12, temperature=1.0, seed=7)
    out = io.StringIO()
    text = generate_from_checkpoint(base, prompt="Hello", num_samples=3, **sampled, stream=out)
    assert out.getvalue() == text and text.startswith("=== sample 1/3 ===\nHello")
    samples = text.split("=== sample ")[1:]
    assert len(samples) == 3 and len(set(s.split("\n", 1)[1] for s in samples)) == 3  # three different draws
    assert generate_from_checkpoint(base, prompt="Hello", num_samples=3, **sampled) == text  # the same seed again
    assert generate_from_checkpoint(base, prompt="Hello", num_samples=3, **sampled | {"seed": 8}) != text
    # sample j is seeded 7 + j on its own: `--prompt --seed 7+j`'s text, in a batch of any size
    assert generate_from_checkpoint(base, prompt="Hello", num_samples=3, batch_size=2, **sampled) == text
    for j, sample in enumerate(samples):
        assert (
            sample.split("\n", 1)[1]
            == "Hello" + generate_from_checkpoint(base, prompt="Hello", **sampled | {"seed": 7 + j}) + "\n"
        )
    prompts = tmp_path / "p.txt"
    prompts.write_text("ab\ncd\n", encoding="utf-8")
    rows = [
        json.loads(r)
        for r in generate_from_checkpoint(base, prompt_file=prompts, num_samples=2, **sampled).split("\n")[:-1]
    ]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("ab", 0), ("ab", 1), ("cd", 0), ("cd", 1)]
    for r in rows:  # each prompt's sample j: `--prompt P --seed 7+j`'s, as serve's choice j
        assert r["completion"] == generate_from_checkpoint(
            base, prompt=r["prompt"], **sampled | {"seed": 7 + r["sample"]}
        )


def test_prompts_from_stdin_keep_their_fields_in_batches_of_batch_size(base: Path, monkeypatch, capsys) -> None:
    """`--prompt-file -` reads stdin (JSONL when its first line is a JSON object, else text; BOM and CRLF read
    past); a JSONL line's other fields start each of its output lines (an output field's name in it is replaced,
    with a note); `batch_size` is the rows per `generate_batch` call. Each completion equals `--prompt`'s."""
    import lmforge.generate as gen

    sizes: list[int] = []
    batch = gen.generate_batch
    monkeypatch.setattr(
        gen, "generate_batch", lambda model, rows, **kw: sizes.append(len(rows)) or batch(model, rows, **kw)
    )
    lines = [
        {"id": 7, "prompt": "Hello wor", "meta": {"tags": ["a", "红"]}},
        {"prompt": "a", "completion": "reference", "sample": 9},
        {"id": None, "prompt": "{xyz"},
    ]
    sampled = GREEDY | {"temperature": 1.0, "seed": 3}  # (greedy, the two samples of a prompt would be one text)
    alone = [
        [generate_from_checkpoint(base, prompt=line["prompt"], **sampled | {"seed": 3 + j}) for j in range(2)]
        for line in lines
    ]
    stdin = "\ufeff" + "\r\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\r\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    records = [json.loads(r) for r in generate_from_checkpoint(base, prompt_file="-", num_samples=2, batch_size=4,
                                                               **sampled).splitlines()]  # fmt: skip
    kept = [{k: v for k, v in line.items() if k not in ("completion", "sample")} for line in lines]
    assert records == [
        fields | {"completion": texts[j], "finish_reason": records[i * 2 + j]["finish_reason"], "sample": j}
        for i, (fields, texts) in enumerate(zip(kept, alone, strict=True))
        for j in range(2)
    ]
    assert list(records[0]) == ["id", "prompt", "meta", "completion", "finish_reason", "sample"]
    err = capsys.readouterr().err
    assert sizes == [4, 2] and 'note: stdin has "completion", "sample" fields' in err
    assert "reading prompts from the terminal" not in err  # (not a terminal: test_prompts_from_a_terminal_...)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"{xyz\n\na\n")))  # text: a "{" line is a prompt
    records = [json.loads(r) for r in generate_from_checkpoint(base, prompt_file="-", **sampled).splitlines()]
    assert [(r["prompt"], r["completion"]) for r in records] == [("{xyz", alone[2][0]), ("a", alone[1][0])]


def test_a_long_generation_keeps_an_imported_tokenizers_bos_first(tmp_path: Path) -> None:
    """Past the context `generate` slid its window to the last tokens, dropping the BOS an imported Llama-style
    tokenizer puts first (`prompt_prefix`); `--prompt` and a `--prompt-file` row (decoded alone: past the batch
    cache) now keep it first, as `generate(..., prefix=)` does (tested against a reference loop)."""
    from tokenizers import processors

    from lmforge.generate import command_prompt_ids, generate, load_generator
    from lmforge.tokenizer.tokenizer import Tokenizer
    from lmforge.tokenizer.train import train_char
    from tests.test_finetune import DATA, make_base

    hf = train_char([p.read_text(encoding="utf-8") for p in sorted(DATA.glob("*.txt"))]).hf
    bos = hf.token_to_id("<|endoftext|>")
    hf.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    run = make_base(tmp_path, max_seq_len=24, init_std=0.5, tok=Tokenizer(hf))
    settings = dict(max_new_tokens=30, temperature=0, stop_at_eos=False)
    loaded = load_generator(run, "cpu")
    ids = command_prompt_ids(loaded, "The cat sat", "test")
    assert ids[0] == bos and bos not in ids[1:]
    expected, plain = (generate(loaded.model, ids, max_new_tokens=30, temperature=0, prefix=p) for p in ([bos], ()))
    assert expected != plain and bos not in expected  # (the window made the difference; no document break)
    text = loaded.tokenizer.decode(expected, skip_special_tokens=True)
    assert generate_from_checkpoint(run, prompt="The cat sat", **settings) == text
    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat sat\n", encoding="utf-8")
    assert json.loads(generate_from_checkpoint(run, prompt_file=prompts, **settings))["completion"] == text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_prompt_file_shows_progress_and_an_interrupt_keeps_the_old_out(
    base: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A long --prompt-file showed nothing until it ended: a bar of completions now runs on stderr (a terminal's;
    --quiet: none), and "wrote OUT (N completions)" counts lines (it counted a U+2028 in a prompt as one more).
    Ctrl-C or SIGTERM mid-file exits 130 with one line, the --out file as it was (atomic), the finished completions
    kept in OUT.partial."""
    import lmforge.generate as gen
    from lmforge.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt\u2028{i}\n" for i in range(5)), encoding="utf-8")  # (JSON keeps U+2028)
    run = ["generate", str(base), "--prompt-file", str(prompts), "--max-new-tokens", "3", "--batch-size", "2"]
    for quiet in (False, True):
        monkeypatch.setattr("sys.stderr", _Terminal())
        with pytest.raises(SystemExit) as e:
            main(run + ["--out", str(tmp_path / "o.jsonl")] + ["--quiet"] * quiet)
        bar = sys.stderr.getvalue()
        assert not e.value.code and ("generating: 100%" in bar and "5/5" in bar) != quiet, bar
        assert capsys.readouterr().out == f"wrote {tmp_path / 'o.jsonl'} (5 completions)\n"
    kept = (tmp_path / "o.jsonl").read_bytes()
    batch = gen.generate_batch
    calls = iter([batch, None])

    def interrupted(*args, **kwargs):
        call = next(calls)
        if call is None:
            raise KeyboardInterrupt  # (as Ctrl-C, or SIGTERM through cli's handler, arrives mid-decode)
        return call(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_batch", interrupted)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with pytest.raises(SystemExit) as e:
        main(run + ["--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "4"])
    note = f"lmforge: interrupted: 2 of 5 completions done, kept in {tmp_path / 'o.jsonl.partial'}; run the same "
    assert e.value.code == 130 and sys.stderr.getvalue().startswith(note) and sys.stderr.getvalue().count("\n") == 1
    assert (tmp_path / "o.jsonl").read_bytes() == kept and sorted(p.name for p in tmp_path.iterdir()) == [
        "o.jsonl",
        "o.jsonl.partial",
        "p.txt",
    ]


@pytest.mark.parametrize(
    ("name", "content", "flags", "needle"),
    [
        ("p.jsonl", b'{"prompt": "a"}\n\n{"prompt": "b"\n', [], "p.jsonl line 3 is not valid JSON"),
        ("p.jsonl", b'{"prompt": "a"}\n{"text": "b"}\n', [], 'p.jsonl line 2 has no "prompt" string'),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b\\ud800"}\n', [], "p.jsonl line 2 holds an unpaired surrogate"),
        ("p.jsonl", b'{"prompt": "a", "id": "\\udc80"}\n', [], "p.jsonl line 1 holds an unpaired surrogate"),
        ("p.txt", b"\n\n", [], "holds no prompts"),
        # a JSON list was read as text (each line a prompt); compressed bytes were "not UTF-8, convert from GBK"
        ("p.json", b'[{"prompt": "a"}]\n', [], "a .json file is neither JSONL nor one prompt per line; rename"),
        ("p.txt", gzip.compress(b"a\n", mtime=0), [], "p.txt is gzip-compressed; name it p.txt.gz or unpack it"),
        (
            "p.jsonl.gz",
            gzip.compress(b'{"prompt": "a"}\n', mtime=0)[:20],
            [],
            "could not be decompressed (Compressed file",
        ),
        ("p.txt", "ok\n红楼\n".encode("gbk"), [], "p.txt line 2 is not UTF-8"),
        (
            "p.txt",
            b"ok\n" + b"x" * 60 + b"\n",
            [],
            "p.txt line 2: the prompt is 60 tokens and the model's context is 48;",
        ),
        (None, b"", [], "does not exist"),
        ("p.txt", b"a\n", ["--prompt", "b"], "not both"),
        ("p.txt", b"a\n", ["--out", "OUT"], "overlaps the file being read"),
        # refused before generating (an OSError once every completion was done)
        ("p.txt", b"a\n", ["--out", "DIR"], "is a folder; pass a file name such as"),
        ("p.txt", b"a\n", ["--out", "FILE/c.jsonl"], "which is a file, not a folder"),
        ("p.txt", b"a\n", ["--num-samples", "0"], "--num-samples must be >= 1"),
        # N identical greedy rows, decoded N times over
        ("p.txt", b"a\n", ["--num-samples", "3", "--temperature", "0"], "--num-samples 3 with --temperature 0 decodes"),
        ("p.txt", b"a\n", ["--num-samples", "2", "--top-k", "1"], "--num-samples 2 with --top-k 1 decodes the same"),
        ("p.txt", b"a\n", ["--num-samples", "2", "--top-p", "0"], "with --top-p 0 decodes the same text 2 times"),
        ("p.txt", b"a\n", ["--compile"], "drop it"),
        ("p.txt", b"a\n", ["--stop", ""], "must not be empty: it would stop before the first token; drop the"),
        ("p.txt", b"a\n", ["--min-p", "1.5"], "min_p must be in [0, 1]"),
        ("p.txt", b"a\n", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_prompt_files_and_flags_are_one_line_errors(base, tmp_path, capsys, name, content, flags, needle) -> None:
    from lmforge.cli import main

    path = tmp_path / (name or "missing.txt")
    if name:
        path.write_bytes(content)
    (tmp_path / "other.txt").write_text("not a folder\n", encoding="utf-8")
    places = {"OUT": path, "DIR": tmp_path, "FILE/c.jsonl": tmp_path / "other.txt" / "c.jsonl"}
    flags = [str(places.get(f, f)) for f in flags]
    with pytest.raises(SystemExit) as e:
        main(["generate", str(base), "--prompt-file", str(path), "--max-new-tokens", "2", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("lmforge: error: ") and needle in err, err


def test_out_inside_the_run_is_refused_before_it_is_written(base: Path, tmp_path: Path, capsys) -> None:
    """`--out RUN/config.json` replaced the run's config with completions (the run no longer loaded); an --out in
    the run folder (also when a checkpoint folder of it is given) is refused in one line, the run left as it was."""
    from lmforge.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n", encoding="utf-8")
    checkpoint = next(p for p in (base / "checkpoints").iterdir() if (p / "state.json").is_file())
    config = (base / "config.json").read_bytes()
    for run, out in [(base, base / "config.json"), (checkpoint, base / "metrics.jsonl")]:
        with pytest.raises(SystemExit) as e:
            main(["generate", str(run), "--prompt-file", str(prompts), "--max-new-tokens", "2", "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "overlaps the directory being read" in err and str(base.resolve()) in err, err
    assert (base / "config.json").read_bytes() == config


def test_an_interrupted_out_resumes_to_the_uninterrupted_file(base: Path, tmp_path: Path, monkeypatch) -> None:
    """`--out` wrote once at the end: Ctrl-C (or a kill) at prompt 9,000 of 10,000 lost every completion. Finished
    batches now go to OUT.partial as they come; the same command again, with another --batch-size too, decodes only
    the rest, each once (a torn last line, as a SIGKILL mid-write leaves, dropped) and writes OUT equal, byte for
    byte, to an uninterrupted run's (seeded sampling, several samples, a row decoded alone past the batch cache),
    the partial file then removed. (A resume used to need the same --batch-size, seeds being per batch.)"""
    import lmforge.generate as gen
    from lmforge.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)), "utf-8")
    run = ["generate", str(base), "--prompt-file", str(prompts), "--num-samples", "2"]
    run += ["--max-new-tokens", "20", "--temperature", "1", "--seed", "5", "--quiet"]
    with pytest.raises(SystemExit):
        main(run + ["--batch-size", "4", "--out", str(tmp_path / "straight.jsonl")])
    straight = (tmp_path / "straight.jsonl").read_bytes()

    batch, alone, calls = gen.generate_batch, gen.generate, []

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3 and interrupt:
            raise KeyboardInterrupt  # (as Ctrl-C, or SIGTERM through cli's handler, arrives mid-decode)
        return batch(*args, **kwargs)

    def counted_alone(*args, **kwargs):
        calls.append(1)
        return alone(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_batch", counted)
    monkeypatch.setattr(gen, "generate", counted_alone)
    out, interrupt = tmp_path / "out" / "c.jsonl", True
    with pytest.raises(SystemExit) as e:
        main(run + ["--batch-size", "3", "--out", str(out)])
    partial = out.with_name("c.jsonl.partial")
    lines = partial.read_text("utf-8").splitlines()
    assert e.value.code == 130 and not out.exists() and len(lines) == 1 + 6  # a header, two batches of 3 rows
    partial.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20], "utf-8")  # the last line torn by a kill
    calls.clear()
    interrupt = False
    with pytest.raises(SystemExit) as e:
        main(run + ["--batch-size", "2", "--out", str(out)])
    assert e.value.code == 0 and out.read_bytes() == straight and not partial.exists()
    # 14 rows, 5 done: the 9 others once each (the last batch, the 32-character prompt's 2 rows, goes row by row)
    assert calls == [2, 2, 2, 1, 1, 1]


def test_a_partial_file_of_another_job_is_refused(base: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """OUT.partial is continued only by the job that made it (prompts, checkpoint, sampling settings, seed):
    anything else is one line naming what differs and what to do, the file left as it was; so is a file there that
    lmforge did not write, and a second run while one writes it."""
    import fcntl

    from lmforge.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("ab\ncd\n", encoding="utf-8")
    out = tmp_path / "c.jsonl"
    partial = tmp_path / "c.jsonl.partial"
    run = ["generate", str(base), "--prompt-file", str(prompts), "--max-new-tokens", "3", "--out", str(out)]
    import lmforge.generate as gen

    with monkeypatch.context() as m:
        m.setattr(gen, "generate_batch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(SystemExit):
            main(run + ["--seed", "1"])  # stopped at once: a header only
    kept = partial.read_bytes()
    capsys.readouterr()
    for flags, needle in [
        (["--seed", "2"], "(what differs: --seed; it was made by: "),
        (["--seed", "1", "--prompt", "x"], "not both"),  # (flag errors come first)
    ]:
        with pytest.raises(SystemExit) as e:
            main(run + flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err
        assert partial.read_bytes() == kept
    assert f"run that command to finish it, or delete {partial} to start over" in main_error(run + ["--seed", "2"])
    partial.write_text('{"lmforge_generate_partial": 1, "job": {}}\n', encoding="utf-8")  # rows seeded per batch
    assert "of another lmforge version (partial format 1, this one reads 2)" in main_error(run)
    partial.write_text("my notes\n", encoding="utf-8")
    assert "is not such a file of lmforge generate; move it away" in main_error(run)
    partial.unlink()
    with open(partial, "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
        assert f"another lmforge generate is writing {partial} right now" in main_error(run)
    assert not out.exists()


def main_error(argv: list[str]) -> str:
    """The one stderr line `lmforge ARGV` exits 2 with."""
    from lmforge.cli import main

    err = io.StringIO()
    with pytest.raises(SystemExit) as e, pytest.MonkeyPatch.context() as m:
        m.setattr("sys.stderr", err)
        main(argv)
    assert e.value.code == 2 and err.getvalue().count("\n") == 1, err.getvalue()
    return err.getvalue()


@pytest.mark.parametrize("signum", ["SIGINT", "SIGKILL"])
def test_a_stopped_process_is_finished_by_the_same_command_with_any_batch_size(
    base: Path, tmp_path: Path, signum: str
) -> None:
    """A real `lmforge generate --out` process stopped mid-file (Ctrl-C: exit 130; SIGKILL) keeps the completions
    it finished in OUT.partial; the same command with another --batch-size finishes the file as an uninterrupted
    run with a third one writes it (seeded sampling). A resume used to be refused unless --batch-size matched."""
    import signal
    import time

    from lmforge.cli import main
    from tests.conftest import start_cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"{i} {PROMPTS[i % 7][:9]}\n" for i in range(12)), encoding="utf-8")
    run = ["generate", str(base), "--prompt-file", str(prompts), "--max-new-tokens", "24", "--temperature", "1"]
    run += ["--seed", "1", "--quiet", "--out"]
    partial = tmp_path / "c.jsonl.partial"
    proc = start_cli(*run, str(tmp_path / "c.jsonl"), "--batch-size", "1")
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if partial.is_file() and partial.read_bytes().count(b"\n") >= 3:  # the header and two completions
            break
        time.sleep(0.005)
    proc.send_signal(getattr(signal, signum))
    code = proc.wait(60)
    assert code == (130 if signum == "SIGINT" else -signal.SIGKILL), proc.communicate()
    assert not (tmp_path / "c.jsonl").exists() and 3 <= partial.read_bytes().count(b"\n") < 13
    for out, batch_size in (("c.jsonl", "5"), ("straight.jsonl", "3")):
        with pytest.raises(SystemExit) as e:
            main([*run, str(tmp_path / out), "--batch-size", batch_size])
        assert e.value.code == 0
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert not partial.exists()


def test_prompts_from_a_terminal_say_what_they_wait_for(base: Path) -> None:
    """`--prompt-file -` with stdin a terminal waited without a word; it now says on stderr what it reads and how
    to end it (only on a terminal: piped, as in the test above, it says nothing more). A real terminal (a pty)
    needs a child process: ~2 s, more when it is the first to start the forking interpreter (imports torch)."""
    import os
    import pty

    from tests.cli_fork import ForkedProcess

    args = ["generate", str(base), "--prompt-file", "-", "--max-new-tokens", "2", "--temperature", "0", "--quiet"]
    master, terminal = pty.openpty()
    os.write(master, b"a\n\x04")  # a prompt, then Ctrl-D (held by the terminal until it is read)
    proc = ForkedProcess(args, {**os.environ, "OMP_NUM_THREADS": "1"}, stdin=os.ttyname(terminal))
    try:
        assert proc.wait(120) == 0, proc.stderr
    finally:
        proc.kill()
        os.close(master)
        os.close(terminal)
    assert proc.stderr == "reading prompts from the terminal, one per line; end with Ctrl-D\n", proc.stderr
    assert [json.loads(line)["prompt"] for line in proc.stdout.splitlines()] == ["a"]


@pytest.mark.parametrize("then", ["write", "interrupt"])
def test_a_silent_prompt_fifo_is_noted_then_read_or_interrupted_in_one_line(base: Path, tmp_path: Path, then):
    """`--prompt-file FIFO` whose writer sends nothing waited without a word. A real process now says once on
    stderr what it waits for (after LMFORGE_PIPE_NOTE_SECONDS, here 0.05 s), then reads the prompt written
    later; or a Ctrl-C (SIGINT) ends the wait with its one line, exit 130."""
    import errno
    import os
    import signal
    import time

    from tests.conftest import start_cli

    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    args = ["generate", str(base), "--prompt-file", str(fifo), "--max-new-tokens", "2", "--temperature", "0"]
    proc = start_cli(*args, "--quiet", env={"LMFORGE_PIPE_NOTE_SECONDS": "0.05"})
    try:
        deadline = time.monotonic() + 60
        while True:  # a write end opens (without waiting) only once the process has opened the FIFO to read
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                assert e.errno == errno.ENXIO and time.monotonic() < deadline and proc.poll() is None, proc.stderr
                time.sleep(0.02)
        time.sleep(1.0)  # connected, silent: the note's 0.05 s pass
        if then == "write":
            os.write(fd, b"a\n")
        else:
            proc.send_signal(signal.SIGINT)
        os.close(fd)
        code = proc.wait(120)
    finally:
        proc.kill()
    note = f"waiting for data on {fifo} (a pipe): nothing came in 0.05 s; Ctrl-C stops\n"
    if then == "write":
        assert code == 0 and proc.stderr == note, proc.stderr
        assert [json.loads(line)["prompt"] for line in proc.stdout.splitlines()] == ["a"]
    else:
        assert code == 130 and proc.stderr == note + "lmforge: interrupted\n", proc.stderr


def test_without_out_each_completion_prints_in_order_and_ctrl_c_keeps_the_finished(base: Path, tmp_path: Path) -> None:
    """`--prompt-file` without --out printed every completion at the end, so a Ctrl-C lost all of them. A real
    process now prints each as soon as it and those before it are done (in input order); a real SIGINT prints the
    finished ones held behind an unfinished one too, as whole lines, and ends with one line: how many are missing
    and the --out command that keeps them. What it printed equals the uninterrupted run's lines."""
    import signal
    import time

    from tests.conftest import start_cli

    # the 2nd prompt is the longest: batched alone (--batch-size 1, shortest first) it is done last, so the 58
    # after it wait behind it, and the 1st prints at once (60 rows: ~2 s of decoding, still going at the SIGINT)
    texts = ["a", "x" * 20, *(f"{i} {PROMPTS[i % 7][:9]}" for i in range(58))]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(texts) + "\n", encoding="utf-8")
    run = ["generate", str(base), "--prompt-file", str(prompts), "--max-new-tokens", "27", "--temperature", "0"]
    straight = io.StringIO()
    generate_from_checkpoint(base, prompt_file=prompts, max_new_tokens=27, temperature=0, stream=straight)
    lines = straight.getvalue().splitlines(keepends=True)
    assert len(lines) == 60

    proc = start_cli(*run, "--batch-size", "1")
    stdout = Path(proc.child["stdout"]) if hasattr(proc, "child") else None
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if stdout is None or stdout.read_text(encoding="utf-8").count("\n") >= 1:  # the 1st, before the rest
            break
        time.sleep(0.005)
    time.sleep(0.2)  # (a few more done, held behind the 2nd)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(60)
    out, err = proc.communicate()
    assert code == 130, err
    printed = out.splitlines(keepends=True)
    assert printed[0] == lines[0] and 1 <= len(printed) < 60 and set(printed) <= set(lines), out
    assert [lines.index(p) for p in printed] == sorted(lines.index(p) for p in printed)  # (input order)
    missing = 60 - len(printed)
    assert err.startswith(f"lmforge: interrupted: {len(printed)} of 60 completions printed, {missing} missing; with")
    assert err.endswith(" --out completions.jsonl\n") and err.count("\n") == 1, err


def test_a_ctrl_c_while_a_line_is_written_is_raised_after_it() -> None:
    """The lines printed as they are done are written with Ctrl-C and SIGTERM held (Python checks for signals
    between a full pipe's partial writes: a line could be cut short); a real SIGINT meanwhile is raised after."""
    import os
    import signal
    import time

    wrote = []
    with pytest.raises(KeyboardInterrupt):
        with many._signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (a signal is handled between bytecodes: here, were it not held)
            wrote.append("the whole line")
    assert wrote == ["the whole line"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as on Linux")
def test_a_full_disk_under_out_is_one_line_and_the_same_command_finishes_the_file(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Writes that fail (a real EFBIG from a file-size limit, as a full disk) while OUT.partial's header, a batch's
    rows or OUT itself is written: one line naming the file, OUT untouched, no temporary left; once there is room,
    the same command finishes OUT equal to an uninterrupted run's. The header cut at its first byte read "is not
    such a file of lmforge generate; move it away", so every later run was refused, and the errors named no file."""
    from lmforge.cli import main
    from tests.conftest import file_size_limit

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"{i} {PROMPTS[i % 7][:9]}\n" for i in range(12)), encoding="utf-8")
    run = ["generate", str(base), "--prompt-file", str(prompts), "--max-new-tokens", "12", "--temperature", "0"]
    run += ["--batch-size", "4", "--quiet", "--out"]
    with pytest.raises(SystemExit):
        main([*run, str(tmp_path / "straight.jsonl")])
    straight = (tmp_path / "straight.jsonl").read_bytes()
    out, partial = tmp_path / "c.jsonl", tmp_path / "c.jsonl.partial"
    sizes = []
    for limit in (1, 1_000, 1_400, len(straight) - 1):  # the header, then a batch's rows, then OUT itself fail
        with file_size_limit(limit), pytest.raises(SystemExit) as e:
            main([*run, str(out)])
        err = capsys.readouterr().err  # ("resuming: 4 of 12 completions are done in ..." and the like before it)
        assert e.value.code == 2 and "Traceback" not in err, err
        err = err.splitlines()[-1]
        assert err.startswith("lmforge: error: cannot write ") and "file too large" in err, err
        assert str(partial) in err or str(out) in err, err
        assert not out.exists() and not list(tmp_path.glob(".c.jsonl*"))
        sizes.append(partial.stat().st_size)
    assert sizes[0] == 1 and 1 < sizes[1] < sizes[2]  # (each case was met: the header cut, rows done, all done)
    with pytest.raises(SystemExit) as e:
        main([*run, str(out)])
    assert e.value.code == 0 and out.read_bytes() == straight and not partial.exists()


def test_one_completion_is_counted_in_the_singular(base: Path, tmp_path: Path, capsys) -> None:
    """`generate --prompt-file 提示.jsonl --out 补全.jsonl` (README.zh-CN) of one prompt said "(1 completions)"."""
    from lmforge.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "宝玉"}\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    with pytest.raises(SystemExit) as e:
        main(["generate", str(base), "--prompt-file", str(prompts), "--max-new-tokens", "2", "--out", str(out)])
    assert not e.value.code and capsys.readouterr().out == f"wrote {out} (1 completion)\n"


def test_a_text_prompt_file_ends_its_lines_as_prepare_does(tmp_path: Path, monkeypatch) -> None:
    """A text prompt file's line ends at \\n, \\r\\n or a lone \\r (old Mac OS files), as `prepare` reads text: lone
    \\r line ends made one prompt "a\\rb" of two. A .jsonl's lines end at \\n only (a \\r is JSON whitespace)."""
    import io

    from lmforge.generate_many import read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes("宝玉\r黛玉\r\nthird\n\rfourth\r".encode())
    assert [(n, p) for n, p, _ in read_prompts(path)] == [(1, "宝玉"), (2, "黛玉"), (3, "third"), (5, "fourth")]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"one\rtwo\r")))
    assert [p for _, p, _ in read_prompts("-")] == ["one", "two"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(b'{"prompt": "a"}\r\n{"prompt": "b"\r}\n')
    assert [p for _, p, _ in read_prompts(jsonl)] == ["a", "b"]


def test_a_prompt_file_skips_lines_of_spaces_and_counts_the_blank_lines(tmp_path: Path, capsys) -> None:
    """A text file's line of spaces or tabs was a prompt (the model continued whitespace) while the same line in a
    .jsonl was skipped as blank: both skip it now, as an empty line, and one note says how many were skipped."""
    from lmforge.generate_many import read_prompts

    path = tmp_path / "p.txt"
    path.write_text("a\n   \n\t \n\nb\n", encoding="utf-8")
    assert [(n, p) for n, p, _ in read_prompts(path)] == [(1, "a"), (5, "b")]
    assert capsys.readouterr().err == f"note: {path}: 3 blank lines skipped\n"
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n \t\n{"prompt": "   "}\n', encoding="utf-8")  # (a prompt of spaces, given)
    assert [(n, p) for n, p, _ in read_prompts(jsonl)] == [(1, "a"), (3, "   ")]
    assert capsys.readouterr().err == f"note: {jsonl}: 1 blank line skipped\n"
    path.write_text("a\nb\n", encoding="utf-8")  # none skipped (the last line end is no blank line): no note
    assert [p for _, p, _ in read_prompts(path)] == ["a", "b"] and capsys.readouterr().err == ""
    path.write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="holds no prompts"):
        read_prompts(path)


def test_a_jsonl_prompt_file_reads_a_bom_at_the_start_of_any_line(tmp_path: Path) -> None:
    """`cat a.jsonl b.jsonl` of Windows-saved prompt files puts b's BOM mid-file: "line 2 is not valid JSON"."""
    from lmforge.generate_many import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_bytes('\ufeff{"prompt": "a"}\n\ufeff{"prompt": "宝玉"}\n'.encode())
    assert [p for _, p, _ in read_prompts(path)] == ["a", "宝玉"]


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="needs /dev/fd (bash's <(...) names a pipe there)")
def test_a_pipe_is_read_as_a_prompt_file(base: Path, capsys) -> None:
    """`--prompt-file <(cut -f2 questions.tsv)` names a pipe (/dev/fd/63), not a regular file: it was refused as
    'does not exist'. It is read as the file would be, and gives the same lines."""
    import os

    from lmforge.cli import main

    read, write = os.pipe()
    os.write(write, b"To be\nor not\n")
    os.close(write)
    try:
        with pytest.raises(SystemExit) as e:
            main(
                [
                    "generate",
                    str(base),
                    "--prompt-file",
                    f"/dev/fd/{read}",
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "3",
                ]
            )
    finally:
        os.close(read)
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["To be", "or not"]
