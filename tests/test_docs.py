"""The commands the docs show, held to the real parsers: every `lmforge ...` line of README.md, README.zh-CN.md,
the configs' comments, the bench docstrings and the Slurm example names a command that exists and only flags
(and `--section.key` settings) it takes, and the complete ones parse as typed (choices, numbers, settings); every
`python bench/X.py ...` line uses only flags that script defines. A renamed flag fails here, not on a new user.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex

import pytest

from lmforge.cli import build_parser
from lmforge.config import help_lines, load_config, parse_overrides
from tests.conftest import REPO

DOCS = ["README.md", "README.zh-CN.md"]
OTHER = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("configs/*.toml"), *REPO.glob("bench/*.py")])
OTHER += ["bench/gpu_check.sh", "examples/slurm-pretrain.sbatch"]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)  # (a double-backtick span may hold a single one)
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w.-]*")
DOTTED_COMMANDS = ("pretrain", "quickstart", "estimate", "finetune")  # the ones that take --section.key settings


def _lines(path: str) -> list[tuple[bool, str]]:
    """(in a code block, line) for each shell line of a doc: fenced blocks and comments line by line (with `\\`
    continuations joined), inline code spans whole."""
    text = (REPO / path).read_text(encoding="utf-8")
    if not path.endswith(".md"):  # configs, scripts: a comment or docstring line that is a command, or a span
        lines = [line.strip().lstrip("#").strip() for line in re.sub(r"\\\n\s*", " ", text).splitlines()]
        return [(False, line) for line in lines] + [(False, span) for line in lines for _, span in SPAN.findall(line)]
    lines = [(True, line) for block in FENCE.findall(text) for line in re.sub(r"\\\n", " ", block).splitlines()]
    return lines + [(False, " ".join(span.split())) for _, span in SPAN.findall(FENCE.sub("", text))]


def lmforge_commands(path: str) -> list[tuple[str, str, str, bool]]:
    """(command, its arguments, the line, whether a code block shows it) of every `lmforge COMMAND ...` the doc
    shows; `generate|chat|serve` stands for each of them."""
    found = []
    for block, line in _lines(path):
        line = line.removeprefix("$ ")
        if block:  # a shell line: lmforge anywhere (after a pipe, `-m`, a venv path); a trailing `# ...` is prose
            m = re.search(r"(?:^|[\s/|])lmforge ([a-z][a-z|]*)(.*)", line)
        else:  # prose: only a span that is a command ("`lmforge pretrain` on an existing --out ...")
            m = re.match(r"(?:\S*/)?(?:python3? -m |(?:srun )?torchrun .*-m )?lmforge ([a-z][a-z|]*)(.*)", line)
        if m is None:
            continue
        args = re.split(r"\s[|>]\s", re.split(r"\s#\s", m[2])[0] if block else m[2])[0]
        found += [(command, args, line, block) for command in m[1].split("|")]
    return found


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _complete(args: str) -> bool:
    """A command as typed, not a pattern: no `...`, `[optional]`, `A|B` choices or `RUN_DIR`-style names."""
    return args.strip() not in ("", "--help") and not re.search(r"\.\.\.|\[|\||\b[A-Z][A-Z_]{2,}\b|<|\$", args)


@pytest.mark.parametrize("path", DOCS + OTHER)
def test_every_lmforge_command_in_the_docs_exists_with_the_flags_shown(path):
    commands = lmforge_commands(path)
    subs = _subparsers()
    keys = {row[0] for row in help_lines()}
    wrong = []
    for command, args, line, _ in commands:
        if command not in subs:
            wrong.append(f"no command {command!r}: {line}")
            continue
        options = subs[command]._option_string_actions
        for flag in FLAG.findall(args):
            name = flag.split("=", 1)[0]
            if name not in options and not (command in DOTTED_COMMANDS and name[2:] in keys):
                wrong.append(f"lmforge {command} has no {name}: {line}")
    assert not wrong, "\n".join(wrong)
    if path in DOCS:  # (an extractor that finds nothing would pass every doc)
        assert len(commands) >= {"README.md": 70, "README.zh-CN.md": 15}[path], len(commands)


@pytest.mark.parametrize("path", DOCS + OTHER)
def test_every_complete_lmforge_command_in_the_docs_parses(path, monkeypatch, capsys):
    """The commands written out in full parse as typed: choices (`--split test`), numbers, and the settings'
    values, with the preset and `--config` file they name (relative to the repository, where they are run). A
    span in the prose that names a command and a flag without the rest (`lmforge generate --prompt`) is no
    command line; a code block's line is."""
    monkeypatch.chdir(REPO)
    subs = _subparsers()
    parsed = 0
    for command, args, line, block in lmforge_commands(path):
        if not _complete(args):
            continue
        argv = shlex.split(args)
        try:
            ns, extra = subs[command].parse_known_args(argv)
        except SystemExit:
            error = capsys.readouterr().err
            if not block and re.search(r"arguments are required|expected one argument", error):
                continue
            pytest.fail(f"argparse refused {line}: {error}")
        if command in ("pretrain", "estimate"):
            if ns.config is None or ns.config.endswith(".toml"):  # (`--config runs/mine` reads a run made earlier)
                load_config(preset=ns.preset, config_file=ns.config, overrides=parse_overrides(extra))
        elif command not in DOTTED_COMMANDS:
            assert not extra, f"not lmforge {command}'s: {extra}: {line}"
        parsed += 1
    if path in DOCS:
        assert parsed >= {"README.md": 30, "README.zh-CN.md": 8}[path], parsed


def _script_flags(path: str) -> set[str]:
    """The options a bench script's parser defines: its `add_argument("--x", ...)` calls, and bench_cli's."""
    flags = {"--help", "-h"}
    for name in {path, "bench/bench_cli.py"}:
        for node in ast.walk(ast.parse((REPO / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


@pytest.mark.parametrize("path", DOCS + OTHER)
def test_every_bench_command_in_the_docs_uses_the_scripts_flags(path):
    wrong = []
    for _, line in _lines(path):
        line = line.replace('"${GPT2[@]}"', "bench/train_speed.py")  # (gpu_check.sh's array of train_speed flags)
        for m in re.finditer(r"(bench/\w+\.py)((?:\s+[^\s`#|;]+)*)", line):
            script, args = m[1], m[2].split(" -- ")[0]  # (after `--`: flags passed on to lmforge pretrain)
            if not (REPO / script).is_file():
                wrong.append(f"no {script}: {line}")
            elif unknown := [f for f in FLAG.findall(args) if f.split("=")[0] not in _script_flags(script)]:
                wrong.append(f"{script} has no {', '.join(unknown)}: {line}")
    assert not wrong, "\n".join(wrong)


def test_the_readmes_name_the_columns_of_the_runs_table():
    """Both READMEs' `lmforge runs runs/` line listed six of the table's eight columns (no preset, no time)."""
    from lmforge.runs import format_runs

    columns = re.split(r"\s{2,}", format_runs([]).splitlines()[0])[1:]  # (after "run")
    english = re.search(r"lmforge runs runs/ +# table: (.*)", (REPO / "README.md").read_text(encoding="utf-8"))
    assert english and english[1].split(", ") == columns, (english, columns)
    chinese = re.search(r"lmforge runs runs/ +# 表格：(.*)", (REPO / "README.zh-CN.md").read_text(encoding="utf-8"))
    assert chinese and len(re.sub(r"（.*?）", "", chinese[1]).split("、")) == len(columns), (chinese, columns)


def test_the_chinese_readme_lists_the_tasks_and_adaptations_there_are():
    """README.zh-CN.md sums the tasks and --adapt modes up in two lines of its own; they are the parsers' choices."""
    subs = _subparsers()
    text = (REPO / "README.zh-CN.md").read_text(encoding="utf-8")
    tasks = re.search(r"- 任务：(.*?)；评估另有 (.*?)。", text, re.S)
    assert tasks, "the task line is gone"
    finetune = subs["finetune"]._option_string_actions["--task"].choices
    assert sorted(re.findall(r"`(\w+)`", tasks[1])) == sorted(finetune)  # (in an order of its own)
    assert re.findall(r"`(\w+)`", tasks[2]) == [
        t for t in subs["eval"]._option_string_actions["--task"].choices if t not in finetune
    ]
    adapt = re.search(r"- 适配方式：`--adapt (.*?)`", text)
    assert adapt and adapt[1].split(" | ") == list(subs["finetune"]._option_string_actions["--adapt"].choices)


def test_lmforge_help_lists_every_command_once():
    """`lmforge --help`'s command list (cli.TOUR) is written by hand beside the parsers it describes."""
    from lmforge.cli import TOUR

    assert sorted(re.findall(r"^  ([a-z]+) ", TOUR, re.M)) == sorted(_subparsers())


def test_the_readme_lists_every_preset():
    """README's "Presets: ..." sentence (Tour) names exactly the presets `--preset` takes."""
    from lmforge.presets import PRESETS

    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    listed = re.search(r"Presets: (.*?) \(\*Architectures", text)
    assert listed and sorted(re.findall(r"`([\w.-]+)`", listed[1])) == sorted(PRESETS), listed


def test_the_readme_gives_the_architecture_presets_parameters_as_pretrain_prints_them():
    """README said `bert-tiny` (0.46M): its total on a 68-character vocabulary, while `pretrain` printed 0.98M total /
    0.43M non-embedding on the 4,096-token one the docs use. Each architecture preset's "(N M / T M" is now the
    non-embedding / total count the pretrain line prints (`{:.2f}M`), total on 4,096 tokens or the preset's own."""
    import dataclasses

    import torch

    from lmforge.models import build_model

    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    shown = dict(
        (name, (non_embedding, total))
        for name, non_embedding, total in re.findall(r"`([\w-]+)` \((\d+\.\d\d)M / (\d+\.\d\d)M", text)
    )
    assert sorted(shown) == sorted(["llama-tiny", "llama-160m", "lstm-tiny", "gru-tiny", "bert-tiny", "electra-tiny",
                                    "bert-base"])  # fmt: skip
    for name, numbers in shown.items():
        model_cfg = load_config(preset=name).model
        if not model_cfg.vocab_size:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=4096)
        with torch.device("meta"):  # no memory for the 100M+ presets
            model = build_model(model_cfg)
        total = sum(p.numel() for p in model.parameters())
        assert numbers == (f"{model.num_params() / 1e6:.2f}", f"{total / 1e6:.2f}"), name


def test_both_readmes_open_with_the_same_two_commands():
    """The set-up + quickstart and set-up + tests commands are the first two code blocks of both READMEs, the same
    lines (one edited without the other would send Chinese readers to an older command)."""
    from lmforge.presets import preset_dict

    blocks = [FENCE.findall((REPO / path).read_text(encoding="utf-8"))[:2] for path in DOCS]
    assert blocks[0] == blocks[1] and "lmforge quickstart" in blocks[0][0] and "pytest" in blocks[0][1], blocks
    for path in DOCS:  # quickstart's time budget, as both say it
        text = (REPO / path).read_text(encoding="utf-8")
        budget = preset_dict("quickstart")["train"]["time_budget"]
        assert f"{budget:g} s" in text or f"{budget:g} 秒" in text, (path, budget)


def test_both_readmes_name_the_loss_units_runs_prints():
    """`lmforge runs` and `report` print each fine-tune's and encoder pretraining's "best val loss" with its unit;
    both READMEs say what each unit is (README.zh-CN.md was left without them). mlm+sop's is written as its
    NSP counterpart's ("SOP for mlm+sop") in README.md."""
    from lmforge.objective_config import ObjectiveConfig
    from lmforge.runs import OBJECTIVE_LOSS_UNITS, TASK_LOSS_UNITS

    rtd_weight = f"{ObjectiveConfig().rtd_weight:g}"
    objectives = [u.format(rtd_weight=rtd_weight) for name, u in OBJECTIVE_LOSS_UNITS.items() if name != "mlm+sop"]
    for path in DOCS:
        text = " ".join((REPO / path).read_text(encoding="utf-8").split())
        missing = [unit for unit in dict.fromkeys([*TASK_LOSS_UNITS.values(), *objectives]) if f"`{unit}`" not in text]
        assert not missing, (path, missing)


def test_both_readmes_quote_the_full_disk_line_the_cli_prints():
    """A write the disk refuses is one line naming the file; both READMEs show that line as the CLI words it."""
    import errno

    from lmforge.cli import _os_error

    line = _os_error(OSError(errno.ENOSPC, "No space left on device", "hf/model.safetensors"))
    for path in DOCS:
        text = " ".join((REPO / path).read_text(encoding="utf-8").split())
        assert f"`lmforge: error: {line}`" in text, (path, line)


def test_the_readme_names_every_option_of_every_command():
    """`chat --system`, `prepare --val-fraction`/`--test-fraction`, `eval --limit`, `generate --ignore-eos` and five
    more were in `--help` and nowhere in README.md, so a reader of the README never learnt of them. Every option of
    every command is now named there (a `--no-X` negation counts as named with its `--X`, and the other way round)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")

    def named(flag: str) -> bool:
        return re.search(re.escape(flag) + r"(?![\w-])", text) is not None

    missing = []
    for command, parser in _subparsers().items():
        for flag in parser._option_string_actions:
            if not flag.startswith("--") or flag == "--help":
                continue
            twin = "--" + flag[5:] if flag.startswith("--no-") else "--no-" + flag[2:]
            if not named(flag) and not (twin in parser._option_string_actions and named(twin)):
                missing.append(f"lmforge {command} {flag}")
    assert not missing, missing


def test_every_data_folder_a_readme_command_trains_on_is_one_a_shown_command_makes():
    """README's architecture examples trained on `--data data/tiny`, which no command in either README makes, so
    they failed as written ("data/tiny is not a prepared data directory"). A code block's `pretrain --data D` names
    a folder a `prepare ... --out D` of that README makes, or the one `lmforge quickstart` writes."""
    for path in DOCS:
        commands = [(command, shlex.split(args)) for command, args, _, block in lmforge_commands(path) if block]
        made = {"data/quickstart"} | {
            argv[argv.index("--out") + 1] for command, argv in commands if command == "prepare" and "--out" in argv
        }
        used = {
            argv[argv.index("--data") + 1] for command, argv in commands if command == "pretrain" and "--data" in argv
        }
        assert used and used <= made, (path, sorted(used - made), sorted(made))


def test_both_readmes_give_the_same_measured_numbers_for_the_two_commands():
    """The paragraph of measurements under the two commands (run times, the quickstart's loss and bpb, the test
    count and time of the second command) says the same numbers in Chinese as in English: one updated without the
    other would tell Chinese readers an older test count or CI time (it had been missing from README.zh-CN.md)."""
    number = re.compile(r"\d+(?:[.,]\d+)*")
    found = {}
    for path in DOCS:
        paragraphs = [p for p in (REPO / path).read_text(encoding="utf-8").split("\n\n") if "tests/cli_fork.py" in p]
        assert len(paragraphs) == 1, (path, "one paragraph of measurements naming tests/cli_fork.py")
        found[path] = set(number.findall(paragraphs[0]))
    english, chinese = (found[path] for path in DOCS)
    assert english == chinese, {"only in English": english - chinese, "only in Chinese": chinese - english}
