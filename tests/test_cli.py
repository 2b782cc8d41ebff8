"""The command line as a user runs it: --help of every command, prepare -> pretrain -> eval ->
generate end to end, and every user mistake -> exit 2 + one line on stderr, no traceback, nothing
half-written."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO, have_cpp_compiler, run_cli

COMMANDS = ["quickstart", "prepare", "pretrain", "eval", "generate", "export", "import", "estimate", "report", "runs"]
COMMANDS += ["finetune", "chat", "serve"]
COMMANDS += ["quantize"]


def _one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("lmforge"), lines[0]
    assert pattern.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert f"usage: lmforge {command}" in result.stdout
    if command in ("pretrain", "quickstart"):
        for key in ("--train.max_steps", "--train.time_budget", "--train.lr", "--train.batch_size",
                    "--train.micro_batch_size", "--train.seed", "--model.n_layer", "--model.n_head",
                    "--model.d_model", "--model.max_seq_len", "--eval.every", "--checkpoint.every",
                    "--checkpoint.keep"):  # fmt: skip
            assert key in result.stdout


def test_an_unset_default_reads_as_its_help_says():
    """--train.min_lr's help said "unset = lr / 10" and then "(default: None)"; a setting unset by default has its
    help text say what unset means, and no "(default: None)" after it."""
    from lmforge.config import help_lines

    unset = {key: text for key, text, default in help_lines() if default is None}
    assert "train.min_lr" in unset and all("unset" in text for text in unset.values()), unset
    text = run_cli("pretrain", "--help").stdout
    assert "(default: None)" not in text
    assert "unset = lr / 10, 0 = decay to zero\n" in text


def test_prepare_help_says_languages_take_any_case():
    """`--languages ZH,En` works as `zh,en` does (data/filters.py: language_list); --help did not say so."""
    text = " ".join(run_cli("prepare", "--help").stdout.split())  # (argparse wraps the help text)
    assert "--languages LANGUAGES keep only these guessed languages, comma-separated, any case (" in text


def test_top_level_help_and_version():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    assert run_cli("--version").stdout.startswith("lmforge ")


def test_console_script_and_import_stay_light():
    """`import lmforge` must not drag in torch or optional packages."""
    heavy = "('torch', 'matplotlib', 'transformers', 'pyarrow', 'tensorboard')"
    code = f"import sys, lmforge, lmforge.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_help_and_flag_errors_answer_without_torch(tmp_path):
    """`--help`, each command's `--help` and the flag/config errors parse and answer before torch loads (1.8 s of
    the 3 s `lmforge --help` took): torch is imported by the functions that run a command, not by the parser."""
    missing = str(tmp_path / "missing.toml")
    argvs = (
        [["--help"]]
        + [[c, "--help"] for c in COMMANDS]
        + [
            ["pretrain", "--train.lrr", "1"],  # unknown key (did you mean)
            ["pretrain", "--train.lr", "abc"],  # bad value
            ["pretrain", "--model.n_head", "5"],  # a section's own check
            ["pretrain", "--config", missing],  # missing file
            ["pretrain", "--preset", "nope"],
            ["finetune", "gpt2", "--train", "t.jsonl", "--out", str(tmp_path / "o"), "--lora-rank", "3"],
            ["pretrain", "--no-such-flag"],
            ["quickstart", "--train.lrr", "1"],
            ["estimate", "--tokens", "1000", "--train.lrr", "1"],
            # estimate's own checks of its flags, which ran after its planner had imported torch (~1.5 s)
            ["estimate", "--tokens", "0"],
            ["estimate", "--tokens", "1000", "--mfu", "2"],
            ["estimate", "--tokens", "1000", "--hardware", "xyz"],
            ["estimate", "--tokens", "1000", "--interconnect", "xyz"],
            ["estimate", "--tokens", "1000", "--adapt", "lora", "--lora-rank", "0"],
            ["estimate", "--tokens", "1000", "--data.seq_len", "99999"],
            ["estimate", "--tokens", "1000", "--train.dtype", "float16"],
        ]
    )
    code = (
        "import contextlib, io, json, sys\n"
        "from lmforge.cli import main\n"
        "codes = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['lmforge', *argv]\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            main()\n"
        "        except SystemExit as e:\n"
        "            codes.append(e.code)\n"
        "print(json.dumps([codes, sorted(m for m in ('torch', 'transformers') if m in sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    codes, heavy = json.loads(out.stdout)
    assert codes == [0] * (1 + len(COMMANDS)) + [2] * 16  # every help answered, every bad flag refused
    assert heavy == []


def test_no_library_module_imports_the_cli():
    """cli dispatches to the commands, never the reverse (chat imported cli for its Ctrl-C flag, which now lives in
    errors.py): only `python -m lmforge` (__main__) imports lmforge.cli."""
    import ast

    importers = []
    for path in sorted((REPO / "lmforge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if "lmforge.cli" in names:
                importers.append(path.relative_to(REPO).as_posix())
    assert importers == ["lmforge/__main__.py"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_file):
    root = tmp_path_factory.mktemp("cli")
    data, run = root / "data", root / "run"
    prep = run_cli("prepare", str(corpus_file), "--out", str(data), "--tokenizer", "char", "--quiet")
    assert prep.returncode == 0, prep.stderr
    train = run_cli(
        "pretrain", "--data", str(data), "--out", str(run), "--preset", "tiny",
        "--model.d_model", "32", "--model.max_seq_len", "64", "--train.max_steps", "30",
        "--train.batch_size", "8", "--eval.every", "15", "--eval.max_batches", "2", "--checkpoint.every", "15",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    return data, run


def test_eval_json_gives_the_data_directory_absolute_whether_given_or_not(trained_run):
    """`eval --json` said "data" as typed (relative) with --data and absolute (as the run records it) without."""
    data, run = trained_run
    flags = ["--split", "test", "--max-batches", "1", "--json"]
    given = run_cli("eval", str(run), "--data", data.name, *flags, cwd=str(data.parent))
    recorded = run_cli("eval", str(run), *flags)
    assert given.returncode == 0 and recorded.returncode == 0, given.stderr + recorded.stderr
    said = [json.loads(r.stdout)["data"] for r in (given, recorded)]
    assert said == [str(data.resolve())] * 2, said


def test_end_to_end(trained_run):
    data, run = trained_run
    for name in ("config.json", "env.json", "metrics.jsonl", "loss.png", "tokenizer.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000030"
    for name in ("model.safetensors", "optim.safetensors", "state.json"):
        assert (run / "checkpoints" / "step-000030" / name).is_file()
    env = json.loads((run / "env.json").read_text(encoding="utf-8"))
    assert {"argv", "torch", "python", "device", "git_commit"} <= env.keys()

    result = run_cli("eval", str(run), "--split", "test", "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["split"] == "test" and metrics["step"] == 30
    assert metrics["ppl"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert 0 < metrics["bpb"] < 8

    ckpt = run / "checkpoints" / "step-000015"
    a = run_cli("generate", str(ckpt), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3")
    b = run_cli("generate", str(ckpt), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("ROMEO:") and len(a.stdout) > len("ROMEO:")
    greedy = run_cli("generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0")
    nocache = run_cli(
        "generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0", "--no-cache"
    )
    assert greedy.stdout == nocache.stdout
    # --compile: the same text; without a C++ compiler, one warning line and the same text, eagerly
    if have_cpp_compiler():
        compiled = run_cli(
            "generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0", "--compile"
        )
        assert compiled.returncode == 0 and compiled.stdout == greedy.stdout, compiled.stderr
        assert "warning" not in compiled.stderr
    no_cxx = run_cli(
        "generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0", "--compile",
        env={"CXX": "/nonexistent/c++"},
    )  # fmt: skip
    assert no_cxx.returncode == 0 and no_cxx.stdout == greedy.stdout, no_cxx.stderr
    warnings = [line for line in no_cxx.stderr.splitlines() if line.strip()]
    assert (
        len(warnings) == 1 and warnings[0].startswith("warning: --compile failed (") and "C++ compiler" in warnings[0]
    )


def test_user_errors_are_one_line(trained_run, tmp_path):
    data, run = trained_run
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    binary = tmp_path / "image.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    base = ["pretrain", "--data", str(data), "--out", str(tmp_path / "r")]
    on_cpu = ["--preset", "tiny", "--train.device", "cpu", "--train.attention", "cudnn"]
    hf = ["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]
    task_file = str(REPO / "tests" / "data" / "sentiment_val.jsonl")
    no_cxx = {"CXX": "/nonexistent/c++"}
    cases: list[tuple[list[str], dict[str, str] | None, str]] = [  # (arguments, environment, the error says)
        (["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d")], None, "missing.txt"),
        (["prepare", str(empty), "--out", str(tmp_path / "d")], None, "no documents"),
        (["prepare", str(binary), "--out", str(tmp_path / "d")], None, "binary"),
        ([*base, "--preset", "tinny"], None, "did you mean 'tiny'"),
        ([*base, "--train.lrr", "1"], None, "did you mean 'train.lr'"),
        ([*base, "--train.lr", "fast"], None, "train.lr: expected float"),
        ([*base, "--data.dir", str(tmp_path)], None, "--data and --data.dir name the same setting"),
        (["eval", str(run)], {"WORLD_SIZE": "2"}, "eval runs in one process, not under torchrun (2 processes)"),
        ([*base, "--config", str(tmp_path / "nope.toml")], None, "nope.toml"),
        (["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r")], None, "lmforge prepare"),
        (["pretrain", "--data", str(data), "--out", str(tmp_path / "c"), "--preset", "tiny", "--train.compile", "true"],
         no_cxx, "--train.compile on CPU needs a C++ compiler"),
        ([*base, *on_cpu], None, "picks a CUDA attention kernel"),
        (["pretrain", "--data", str(data), "--out", str(run), "--preset", "tiny", "--model.n_layer", "3"], None,
         "different model config"),
        (["eval", str(tmp_path)], None, "not an lmforge run"),
        (["generate", str(tmp_path / "nope"), "--prompt", "x"], None, "does not exist"),
        (["generate", str(run), "--prompt", "x" * 500], None, "context"),
        (["eval", str(run), "--batch-size", "-4"], None, "--batch-size must be >= 1"),
        ([*hf, "--dtype", "f16"], None, "f16, bf16 and q8_0 are GGUF types, for --to gguf"),
        (["report", str(run), "--out", str(tmp_path / "r.pdf")], None, "name it .html or .md"),
        ([*base, "--preset", "tiny", "--train.seed", "-1"], None, "train.seed must be in"),
        ([*base, "--preset", "tiny", "--train.lr", "inf"], None, "train.lr must be a number > 0"),
    ]  # fmt: skip
    refused_before_echo = [  # refused before the prompt is echoed: nothing on stdout
        (("--seed", "-1"), "seed must be in"),
        (("--seed", "99999999999999999999"), "seed must be in"),
        (("--temperature", "inf"), "temperature"),
        (("--max-new-tokens", "-5"), "--max-new-tokens"),
    ]
    cases += [
        (["generate", str(run), "--prompt", "ROMEO:", *flags], None, needle) for flags, needle in refused_before_echo
    ]
    for flags, needle in [  # a flag of eval's other mode (or another task) would be ignored
        (("--k-shot", "4"), "--k-shot is for task metrics"),
        (("--task", "clm", "--data", task_file, "--max-batches", "1"), "--max-batches is for evaluating a prepared"),
        (("--task", "qa", "--data", task_file, "--k-shot", "2"), "--k-shot and --shots are for --task classify"),
        (("--task", "classify", "--data", task_file, "--max-new-tokens", "5"), "--max-new-tokens is for --task sft"),
        # written at its default value it still does nothing here: refused too
        (("--task", "classify", "--data", task_file, "--max-new-tokens=48"), "--max-new-tokens is for --task sft"),
        (("--max-batches", "0", "--task", "clm", "--data", task_file), "--max-batches is for evaluating a prepared"),
    ]:
        cases.append((["eval", str(run), *flags], None, needle))
    # each is a fresh interpreter importing torch (~1.5 s): two at a time on CI's two cores
    with ThreadPoolExecutor(max_workers=2) as pool:
        replies = list(pool.map(lambda case: run_cli(*case[0], env=case[1]), cases))
    for (args, _, needle), reply in zip(cases, replies, strict=True):
        _one_line_error(reply, needle)
        if args[0] == "generate" and "ROMEO:" in args:
            assert reply.stdout == "", reply.stdout
    for made in ("d", "d.tmp", "c", "r", "hf", "r.pdf"):  # nothing half-written, nothing made before refusing
        assert not (tmp_path / made).exists(), made

    other = tmp_path / "other"
    ok = run_cli("prepare", str(REPO / "README.md"), "--out", str(other), "--tokenizer", "bpe", "--vocab-size", "300")
    assert ok.returncode == 0, ok.stderr
    _one_line_error(run_cli("eval", str(run), "--data", str(other)), "another tokenizer")

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    weights = broken / "checkpoints" / "step-000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _one_line_error(run_cli("eval", str(broken)), "model.safetensors")
    state = broken / "checkpoints" / "step-000030" / "state.json"
    state.write_text('{"format_version": 1, "files"', encoding="utf-8")
    _one_line_error(run_cli("generate", str(broken / "checkpoints" / "step-000030")), "state.json")


def test_quickstart_help_shows_the_settings_it_trains_with():
    from lmforge.presets import preset_dict

    text = run_cli("quickstart", "--help").stdout
    preset = preset_dict("quickstart")
    assert f"--model.n_layer                Transformer blocks (default: {preset['model']['n_layer']})" in text
    assert f"(default: {preset['train']['time_budget']!r})" in text


@pytest.mark.slow
def test_quickstart_writes_where_the_readme_says_and_its_next_commands_run(tmp_path, monkeypatch, capsys):
    """README: quickstart writes data/quickstart/ and runs/quickstart/ under the current folder and ends with
    the commands to try next. Those were printed joined by ' | ', which a shell reads as a pipe."""
    import shlex

    from lmforge.quickstart import quickstart

    monkeypatch.chdir(tmp_path)
    quickstart(overrides=["--train.max_steps", "2", "--train.warmup_steps", "1", "--eval.every", "0"])
    assert (tmp_path / "data" / "quickstart" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "quickstart" / "checkpoints" / "latest").read_text().strip() == "step-000002"
    out = capsys.readouterr().out
    commands = [line.strip() for line in out.split("next (one command a line):\n", 1)[1].splitlines()]
    assert commands == [
        "lmforge generate runs/quickstart --prompt 'JULIET:'",
        "lmforge eval runs/quickstart --split test",
    ]
    for command in commands:
        extra = ["--max-new-tokens", "5"] if "generate" in command else ["--max-batches", "2"]
        result = run_cli(*shlex.split(command)[1:], *extra, cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr


@pytest.mark.slow  # two quickstarts: each samples 400 tokens (~6 s on a busy core)
def test_a_quickstart_run_again_says_it_trained_nothing_not_that_the_budget_ended_it(tmp_path, data_dir, capsys):
    """A re-run of a finished quickstart trains nothing (pretrain: "nothing to do"), but then said "the 3 s time
    budget ended training at step 2 of 1000 (this machine is slower or busier than the README's)". It now says
    that nothing new was trained, and which step the numbers are for. (Small data: the command's own corpus
    takes ~40 s.)"""
    from lmforge.quickstart import quickstart

    run = tmp_path / "run"
    flags = ["--train.time_budget", "0.001", "--eval.every", "0"]  # the budget ends it after its first step
    quickstart(out=str(run), data_out=str(data_dir), overrides=flags)
    first = capsys.readouterr().out
    assert "      the 0.001 s time budget ended training at step 1 of 1000" in first, first
    assert "nothing new was trained" not in first
    quickstart(out=str(run), data_out=str(data_dir), overrides=flags)
    again = capsys.readouterr().out
    assert "time budget ended training" not in again, again
    assert f"      nothing new was trained: {run} was trained before, to step 1 of 1000 (" in again, again
    val = [line for line in first.splitlines() if line.startswith("      val loss ")]
    assert len(val) == 1 and val[0] in again.splitlines()  # the same run's numbers


def test_quickstart_quotes_the_run_path_in_its_next_commands():
    """`quickstart --out 'my runs/q'` ended with `lmforge eval my runs/q --split test`, which a shell reads as
    two paths; the path is now quoted, while runs/quickstart is printed as before."""
    import shlex
    from pathlib import Path

    from lmforge.quickstart import next_commands

    assert next_commands(Path("runs/quickstart"))[1] == "lmforge eval runs/quickstart --split test"
    for run in ("my runs/q", "运行 it's"):
        generate, evaluate = (shlex.split(command) for command in next_commands(Path(run)))
        assert generate == ["lmforge", "generate", run, "--prompt", "JULIET:"]
        assert evaluate == ["lmforge", "eval", run, "--split", "test"]


def _as_from_a_terminal() -> None:
    """In the child, before exec: Ctrl-C as a terminal delivers it (default disposition, not blocked), whatever
    the test process inherited (a SIGINT ignored or blocked there would make every child ignore it too)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path):
    """A Ctrl-C that lands while torch and numpy are still importing (the first second or two of any command)
    printed a KeyboardInterrupt traceback, or, inside numpy's import, an AttributeError from the module it
    left half made. Each delay here lands somewhere else in the start-up; all must end the same way."""
    import signal
    import time

    text = tmp_path / "a.txt"
    text.write_text("Some text to prepare.\n\n" * 50, encoding="utf-8")

    def interrupt(delay: float) -> tuple[int, str]:
        # -X importtime prints each module as its import ends: the delay counts from lmforge.cli's, so a loaded
        # machine cannot land the Ctrl-C in Python's own start-up (`site`), before any lmforge code runs
        proc = subprocess.Popen(
            [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "lmforge",
                "prepare",
                str(text),
                "--out",
                str(tmp_path / f"o{delay}"),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_as_from_a_terminal,
        )
        lines: list[str] = []
        started = threading.Event()

        def read() -> None:
            for line in proc.stderr:  # type: ignore[union-attr]
                lines.append(line)
                if line.rstrip().endswith("| lmforge.cli"):
                    started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(120), lines
        time.sleep(delay)
        running = proc.poll() is None
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=240)  # a Ctrl-C during torch's import is held until it ends: 2-8 s at load 6, 60+ at 10
        reader.join(60)
        code = proc.returncode if running else "done"  # finished before the Ctrl-C (a reader thread starved)
        return code, "".join(line for line in lines if not line.startswith("import time:"))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(interrupt, [0.01, 0.15, 0.3, 0.5, 0.8, 1.2]))
    # 130, or killed by the SIGINT itself as Python may end after a KeyboardInterrupt (a shell shows both as 130);
    # 0: the command had finished (a fast machine, the longest delays), and a Ctrl-C then must not print either
    stopped = [err for code, err in results if code in (130, -signal.SIGINT)]
    assert len(stopped) >= 3 or [c for c, _ in results].count("done") > 3, results
    for code, err in results:
        assert code in (130, -signal.SIGINT, 0, "done") and "Traceback" not in err, (code, err)
        assert err.strip() == ("lmforge: interrupted" if code in (130, -signal.SIGINT) else ""), (code, err)


def test_text_arguments_that_are_not_utf8_are_one_line(tmp_path):
    """A prompt, system message or column name typed in a GBK terminal (or a GBK script) reaches Python as
    lone surrogates: the tokenizer raised a TypeError traceback for --prompt and --system."""
    import os

    from tests.test_finetune import make_base

    base = str(make_base(tmp_path))
    gbk = os.fsdecode("你好".encode("gbk"))  # what Python makes of those bytes in a UTF-8 locale
    csv = tmp_path / "reviews.csv"
    csv.write_text("标签,评论\n1,很好\n", encoding="utf-8")
    ft = ["finetune", base, "--task", "classify", "--train", str(csv), "--out", str(tmp_path / "f")]
    for args, flag in [
        (["generate", base, "--prompt", gbk, "--max-new-tokens", "2"], "--prompt"),
        (["chat", base, "--system", gbk], "--system"),
        (["prepare", str(csv), "--text-field", gbk, "--out", str(tmp_path / "d")], "--text-field"),
        ([*ft, "--field", f"text={gbk}"], "--field"),
    ]:
        _one_line_error(run_cli(*args, input="hi\n/exit\n"), f"{flag} is not valid UTF-8")
    assert not (tmp_path / "d").exists() and not (tmp_path / "f").exists()


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["generate", "RUN", "--temprature", "0"], "unknown option --temprature; did you mean --temperature?"),
        (["generate", "RUN", "--max_new_tokens=5"], "did you mean --max-new-tokens?"),
        (["pretrain", "--data", "D", "--ovewrite"], "did you mean --overwrite?"),  # was 'settings look like ...'
        (["prepare", "x.txt", "--out", "D", "--tokenizr", "char"], "did you mean --tokenizer?"),
        (["pretrain", "--data", "D", "--resume"], "resumes from the latest checkpoint by itself"),  # its own hint
        (["eval", "RUN", "--bogus"], "unrecognized arguments: --bogus; see 'lmforge eval --help'"),
        (["pretrian", "--data", "D"], "; did you mean 'pretrain'? (see 'lmforge --help')"),  # a command's typo too
    ],
)
def test_a_mistyped_flag_names_the_flag_it_is_close_to(capsys, argv, said):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)  # refused before anything is read: the paths need not exist
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ") and said in err, err


def test_an_output_flag_given_once_keeps_its_default_otherwise() -> None:
    """Once tracks what was given, so a flag with a default (quickstart's --out) takes one value, and a dotted
    override given twice (scripts append them on purpose) still keeps the last."""
    from lmforge.cli import build_parser
    from lmforge.config import parse_overrides

    args = build_parser().parse_known_args(["quickstart", "--out", "mine"])[0]
    assert (args.out, args.data_out) == ("mine", "data/quickstart")
    args, extra = build_parser().parse_known_args(["pretrain", "--out", "o", "--train.lr", "1", "--train.lr", "2"])
    assert args.out == "o" and parse_overrides(extra) == {"train": {"lr": "2"}}


@pytest.mark.parametrize(
    "argv, said",
    [
        (["pretrain", "--data", "D", "--config", "a.toml", "--config", "b.toml"], "--config is given twice"),
        (["estimate", "--config=a.toml", "--config", "b.toml", "--tokens", "1e6"], "merge the files into one"),
        (["pretrain", "--data", "D1", "--data", "D2"], "--data.mix 'DIR=0.7,DIR2=0.3'"),  # D1 was not trained on
        (["generate", "RUN", "--prompt", "A", "--prompt", "B"], "pass --prompt-file FILE"),
        (["generate", "RUN", "--prompt", "", "--prompt=B"], "--prompt is given twice"),  # an empty one counts
        (["generate", "RUN", "--prompt-file", "a.txt", "--prompt-file", "b.txt"], "--prompt-file is given twice"),
        (["finetune", "B", "--train", "a.jsonl", "--train", "b.jsonl", "--out", "O"], "join the files into one"),
        (["finetune", "B", "--train", "a", "--val", "a.jsonl", "--val=b.jsonl", "--out", "O"], "--val is given twice"),
        (
            ["finetune", "B", "--train", "a", "--out", "O", "--adapt", "distill", "--teacher", "T1", "--teacher", "T2"],
            "--teacher is given twice",
        ),  # fmt: skip
        (["finetune", "B", "--train", "a", "--out", "O", "--replay", "r", "--replay", "s"], "--replay is given twice"),
        (["finetune", "B", "--train", "a", "--out", "O", "--old-val", "r", "--old-val", "s"], "--old-val is given"),
        (["eval", "RUN", "--data", "D1", "--data", "D2"], "run it once for each"),
        (["eval", "RUN", "--task", "choice", "--data", "F", "--shots", "a", "--shots", "b"], "--shots is given twice"),
        (["pretrain", "--data", "D", "--init-from", "R1", "--init-from", "R2"], "--init-from is given twice"),
        # (the last preset was trained alone: `--preset tiny --preset small` made a 10.9M-parameter `small`)
        (["pretrain", "--data", "D", "--preset", "tiny", "--preset=small"], "--preset is given twice"),
        (["estimate", "--preset", "tiny", "--preset", "small", "--tokens", "1e6"], "a config starts from one preset"),
        (["quantize", "RUN", "--out", "O", "--val", "a.jsonl", "--val", "b.jsonl"], "--val is given twice"),
        (["import", "HF", "--out", "O", "--generator", "G1", "--generator", "G2"], "--generator is given twice"),
        (["prepare", "in.txt", "--out", "O", "--tokenizer", "char", "--tokenizer", "t.json"], "one tokenizer"),
        # output flags: `--out a --out b` wrote b alone (a default, as quickstart's and report's, is no value given)
        (["pretrain", "--data", "D", "--out", "a", "--out=b"], "--out is given twice"),
        (["prepare", "in.txt", "--out", "a", "--out", "b"], "--out is given twice"),
        (["quickstart", "--out", "a", "--out", "b"], "--out is given twice"),
        (["quickstart", "--data-out", "a", "--data-out", "b"], "--data-out is given twice"),
        (["export", "RUN", "--out", "a", "--out", "b"], "--out is given twice"),
        (["finetune", "BASE", "--train", "t.jsonl", "--out", "a", "--out", "b"], "--out is given twice"),
        (["report", "RUN", "--out", "a.html", "--out", "b.html"], "--out is given twice"),
    ],
)
def test_an_option_of_one_value_given_twice_is_refused(capsys, argv, said):
    """argparse kept the last value without a word: `--config base.toml --config more.toml` trained with the
    defaults in place of base.toml's settings, and `generate --prompt A --prompt B` completed B alone."""
    from lmforge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)  # refused before anything is read: the paths need not exist
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ") and said in err, err


@pytest.mark.parametrize(
    "preset, flag, value",
    [
        ("tiny", "--model.d_ff", str(2**44)),
        ("tiny", "--model.n_layer", "99999999999999999999"),
        ("lstm-tiny", "--model.n_layer", "99999999999999999999"),
    ],
)
def test_a_model_too_big_for_memory_is_one_line(data_dir, tmp_path, capsys, preset, flag, value):
    """--model.d_ff 2**44 (a 4 PiB matrix) was a RuntimeError traceback from torch's CPU allocator, and
    --model.n_layer 99999999999999999999 grew to 21 GB building layers before it was killed; both are refused
    before the model is built, in one line naming the need and the machine's RAM, and no run folder is left.
    An LSTM was not checked at all (only GPT/Llama shapes were). (In process: the error is mapped in cli.main.)"""
    from lmforge.cli import main

    out = tmp_path / "big"
    argv = ["pretrain", "--data", str(data_dir), "--out", str(out), "--preset", preset, "--quiet"]
    with pytest.raises(SystemExit) as e:
        main([*argv, flag, value, "--train.max_steps", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("lmforge: error: the ") and "model (" in err and "of this machine's RAM" in err, err
    assert not out.exists()


def test_a_batch_past_any_memory_is_refused_before_the_run_folder_is_written(data_dir, tmp_path, capsys):
    """--train.batch_size 1e30 passed the checks and was a ValueError traceback ('Maximum allowed size exceeded')
    from the loader's np.arange of the batch, then numpy's out-of-memory line from the first step, with the run folder
    written and marked failed (an existing run's too). It is now refused before anything is written, with the line
    finetune gives (`check_batch_fits`), and an existing run is left as it was."""
    from lmforge.cli import main

    out = tmp_path / "big"
    argv = ["pretrain", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--quiet"]
    for batch in ("1e30", "1e11"):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--train.batch_size", batch, "--train.max_steps", "1"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        said = rf"lmforge: error: a micro-batch of {int(float(batch))} examples x \d+ tokens needs .* token ids alone"
        assert re.match(said, err) and "use a smaller --train.batch_size" in err, err
        assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main([*argv, "--train.batch_size", "2", "--train.max_steps", "1", "--eval.every", "0"])
    assert e.value.code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        main([*argv, "--train.batch_size", "1e11", "--train.max_steps", "2"])
    assert e.value.code == 2 and "token ids alone" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # not marked failed, nothing written
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    "argv",
    [
        ["finetune", "RUN", "--task", "classify", "--train", "TRAIN", "--out", "OUT"],
        ["pretrain", "--data", "DATA", "--preset", "tiny", "--init-from", "RUN", "--out", "OUT"],
        ["import", "RUN", "--out", "OUT"],
    ],
)
def test_a_run_stopped_before_its_first_checkpoint_is_not_taken_for_a_hugging_face_model(
    data_dir, tmp_path, capsys, argv
):
    """A run that stopped before its first checkpoint holds config.json (lmforge's), status.json and env.json:
    finetune and import read it as a Hugging Face directory ('config.json: model_type None is not supported'),
    --init-from said to import it; each now says what eval says (train it first), or that it is a run already."""
    from lmforge.cli import main

    run = tmp_path / "run"
    with pytest.raises(SystemExit):  # a real such run: it diverges with no checkpoint to roll back to
        main(["pretrain", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--train.lr", "1e30",
              "--train.warmup_steps", "0", "--train.batch_size", "2", "--quiet"])  # fmt: skip
    assert not (run / "checkpoints").exists()
    capsys.readouterr()
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n', encoding="utf-8")
    paths = {"RUN": str(run), "TRAIN": str(train), "DATA": str(data_dir), "OUT": str(tmp_path / "out")}
    with pytest.raises(SystemExit) as e:
        main([paths.get(a, a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    said = "is an lmforge run or checkpoint already" if argv[0] == "import" else "has no complete checkpoint yet"
    assert said in err and "model_type" not in err and "Hugging Face model folder" not in err, err
    assert not (tmp_path / "out").exists()


def test_an_allocation_beyond_memory_is_said_as_out_of_memory():
    """What slips past the up-front check (activations, another process's memory) is still one line."""
    import torch

    from lmforge.cli import _out_of_memory

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity")
    assert _out_of_memory(cuda) == "tried to allocate 20.00 MiB"
    assert _out_of_memory(RuntimeError("shape mismatch")) is None  # (a bug keeps its traceback)


def test_a_torchrun_rank_interrupted_before_joining_says_what_it_may_be(monkeypatch, capsys):
    """torchrun SIGTERMs every rank once one dies: rank 0, still importing torch when rank 1 died (2 of 20 real kills),
    printed a bare 'lmforge: interrupted', as for a Ctrl-C. Before the ranks join there is no group to show it the
    dead peer, so the line now says both; one process, or a rank that joined, still says 'interrupted'."""
    from lmforge import cli, dist

    def signalled(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_parse_and_run", signalled)
    for world, joined, said in [
        ("2", False, "lmforge: interrupted before the ranks joined (by Ctrl-C, or by torchrun stopping every rank "
         "after one failed: its report names it)\n"),
        ("2", True, "lmforge: interrupted\n"),
        ("1", False, "lmforge: interrupted\n"),
    ]:  # fmt: skip
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setattr(dist, "joined", joined)
        with pytest.raises(SystemExit) as exit_info:
            cli._main(["pretrain"])
        assert exit_info.value.code == 130 and capsys.readouterr().err == said


def test_a_signal_on_top_of_a_failed_collective_keeps_its_line(monkeypatch, capsys):
    """torchrun SIGTERMs every rank once one dies: a survivor whose collective had just failed got it while closing
    its log and printed 'lmforge: interrupted' (exit 130) instead of the failure's line, which says re-running
    resumes. A Ctrl-C with no failure under it is still an interrupt."""
    from lmforge import cli
    from lmforge.errors import CommFailure

    def failing_then_signalled(argv):
        try:
            raise CommFailure("rank 0: a collective failed; re-run the same command to resume")
        finally:
            raise KeyboardInterrupt  # the launcher's SIGTERM, during the clean-up

    monkeypatch.setattr(cli, "_parse_and_run", failing_then_signalled)
    with pytest.raises(SystemExit) as exit_info:
        cli._main(["pretrain"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "lmforge: error: rank 0: a collective failed; re-run the same command to resume\n"

    def signalled(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_parse_and_run", signalled)
    with pytest.raises(SystemExit) as exit_info:
        cli._main(["pretrain"])
    assert exit_info.value.code == 130 and capsys.readouterr().err == "lmforge: interrupted\n"


@pytest.mark.parametrize(
    "env", [{"RANK": "1"}, {"RANK": "5", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "LOCAL_RANK": "-1"}]
)
def test_a_rank_outside_the_world_is_one_line(env, data_dir, tmp_path, monkeypatch, capsys):
    """A hand-made launch (srun, a script exporting RANK) with RANK not below WORLD_SIZE: RANK=1 alone trained in
    one process as a rank that is not rank 0 until the loader's ValueError traceback, and RANK=5 of 2 waited
    dist.timeout_s (600 s) to say it could not connect. Both are refused at once in one line."""
    from lmforge.cli import main
    from lmforge.dist import DistInfo, env_info

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--train.max_steps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("lmforge: error: RANK=") and "launch with torchrun" in err, err
    assert not out.exists()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert env_info() == DistInfo(rank=1, local_rank=1, world_size=2)


def test_eval_of_a_split_a_tiny_corpus_left_empty_says_why(trained_run, tmp_path, capsys):
    """A few documents prepared at the default fractions can all hash into train: `eval --split test` then said
    'prepare with a test fraction', which the data was; it now says the split got no documents and how to give
    it some."""
    from lmforge.cli import main

    data, run = trained_run
    (tmp_path / "three.txt").write_text("ROMEO: a\nJULIET: b\nROMEO: c\n", encoding="utf-8")
    tokenizer = str(run / "tokenizer.json")
    with pytest.raises(SystemExit) as done:
        main(
            [
                "prepare",
                str(tmp_path / "three.txt"),
                "--tokenizer",
                tokenizer,
                "--quiet",
                "--no-card",
                "--out",
                str(tmp_path / "d"),
            ]
        )
    assert done.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["eval", str(run), "--data", str(tmp_path / "d"), "--split", "test"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1, err
    assert "the test split of" in err and "got no documents: 1 document in all" in err and "--test-input FILE" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["prepare", "LOOP", "--out", "OUT", "--tokenizer", "char"],
        ["prepare", "TEXT", "--val-input", "LOOP", "--out", "OUT", "--tokenizer", "char"],
        ["prepare", "TEXT", "--out", "LOOP", "--tokenizer", "char"],
        ["export", "LOOP", "--out", "OUT"],
        ["generate", "OUT", "--prompt-file", "LOOP"],  # (it said "does not exist")
    ],
)
def test_a_symbolic_link_loop_is_one_line(capsys, tmp_path, argv):
    """`ln -s loop loop`, then `lmforge prepare loop` or `export loop`: Python 3.10-3.12's Path.resolve() raises
    RuntimeError('Symlink loop from ...'), which was a traceback (3.13's OSError, ELOOP, says the same line)."""
    from lmforge.cli import main

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    (tmp_path / "text.txt").write_text("To be, or not to be: that is the question.\n" * 20, encoding="utf-8")
    paths = {"LOOP": str(loop), "TEXT": str(tmp_path / "text.txt"), "OUT": str(tmp_path / "out")}
    with pytest.raises(SystemExit) as exit_info:
        main([paths.get(a, a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    said = "is a symbolic link loop (its links lead back to themselves); fix or remove the link"
    assert err == f"lmforge: error: {loop} {said}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "text.txt"]  # nothing half-written


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "RUN", "--prompt-file", "PROMPTS", "--out", "FIFO", "--max-new-tokens", "1"],
        ["report", "RUN", "--out", "FIFO", "--format", "html", "--overwrite"],
        ["export", "RUN", "--to", "gguf", "--out", "FIFO", "--overwrite"],
    ],
)
def test_an_out_file_that_is_a_device_or_pipe_is_refused_and_kept(capsys, tmp_path, argv):
    """`--out /dev/null` was written whole beside it and renamed over it: as root, /dev/null became a regular file
    for every program on the machine (generate, and report and export --to gguf with --overwrite). A FIFO stands in
    for the device here: it is refused in one line before any work, and is still a FIFO."""
    import os
    import stat

    from lmforge.cli import main
    from tests.test_finetune import make_base

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\n", encoding="utf-8")
    paths = {"RUN": str(make_base(tmp_path / "run")), "PROMPTS": str(prompts), "FIFO": str(fifo)}
    with pytest.raises(SystemExit) as e:
        main([paths.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"lmforge: error: --out {fifo} is a device or pipe, not a file"), err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nothing can be created")
def test_an_out_that_cannot_be_created_is_named_as_given_not_by_its_hidden_build_folder(trained_run, tmp_path):
    """`prepare --out /proc/x` and `export RUN --out /proc/x` said "No such file or directory:
    '/proc/.x.lmforge-tmp-ad3301fd'": the hidden folder the output is built in, which the user never named."""
    data, run = trained_run
    (tmp_path / "text.txt").write_text("To be, or not to be: that is the question.\n" * 20, encoding="utf-8")
    for args in (["prepare", str(tmp_path / "text.txt"), "--tokenizer", "char"], ["export", str(run)]):
        result = run_cli(*args, "--out", "/proc/x")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "'/proc/x'; check the path" in result.stderr and "lmforge-tmp" not in result.stderr, result.stderr
