"""The `lmforge` command line: parse arguments, call one library function, map errors.

No logic lives here. Each subcommand calls one function that is also the Python API. A user error
(`LmforgeError`) prints one line on stderr and exits with 2; an interrupted training run (which
saved a checkpoint) exits with 130; anything else is a bug and keeps its traceback.

The parser (every command's flags and help text, `build_parser`) is in `cli_parsers.py`, the adaptation
commands' flags and dispatch in `cli_adapt.py`; this file keeps `_run`, which maps each command to its one
library call, and `main`, which maps errors and signals to one line and an exit code.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from typing import Any

from lmforge.cli_parsers import TOUR, Parser, build_parser  # noqa: F401 (TOUR, Parser: re-exported)
from lmforge.errors import (
    CommFailure,
    ConfigError,
    Interrupted,
    LmforgeError,
    final_line,
    held_note,
    hold_interrupt,
    interrupt_seen,
    note_interrupt,
    say_held_note_soon,
)

# arguments that are text for the model or a column name, not paths: bytes that are not UTF-8 (a GBK terminal
# or script) reach Python as lone surrogates, which the tokenizer cannot encode (a TypeError traceback)
_TEXT_ARGS = {"prompt": "--prompt", "system": "--system", "text_field": "--text-field", "field": "--field"}


def _check_text_args(args: argparse.Namespace) -> None:
    for dest, flag in _TEXT_ARGS.items():
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and any("\ud800" <= ch <= "\udfff" for ch in v):
                raise ConfigError(
                    f"{flag} is not valid UTF-8 (e.g. GBK bytes from the terminal or a script); set the terminal "
                    "to UTF-8 and type it again, or convert the script with iconv -f GB18030 -t UTF-8"
                )


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.command not in ("pretrain", "quickstart", "estimate", "finetune") and extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}; see 'lmforge {args.command} --help'")
    _check_text_args(args)
    if args.command not in ("pretrain", "finetune"):  # (finetune checks itself, for library callers too)
        from lmforge.dist_config import require_one_process

        require_one_process(args.command)

    if args.command == "quickstart":
        from lmforge.quickstart import quickstart

        quickstart(out=args.out, data_out=args.data_out, overrides=extra, overwrite=args.overwrite)
    elif args.command == "prepare":
        from lmforge.data.card import notes, summary_line
        from lmforge.data.prepare import PrepareConfig, prepare
        from lmforge.fields import dataclass_from_namespace

        cfg = dataclass_from_namespace(PrepareConfig, args)
        cfg.check_written(getattr(args, "given", set()))
        manifest = prepare(cfg, progress=not args.quiet)
        for note in notes(manifest):
            print(note, file=sys.stderr)
        print(summary_line(manifest, cfg.out))
    elif args.command == "pretrain":
        from lmforge.config import load_config, merge, parse_overrides

        flags: dict[str, Any] = {}
        if args.data:
            flags["data"] = {"dir": args.data}
        if args.out:
            flags["out"] = args.out
        if args.objective:
            flags["objective"] = {"name": args.objective}
        dotted = parse_overrides(extra)
        for short, section, key in (("--data", "data", "dir"), ("--objective", "objective", "name")):
            if section in flags and key in (dotted.get(section) or {}):  # (the shortcut used to win silently)
                raise ConfigError(f"{short} and --{section}.{key} name the same setting; give one of them")
        base = None
        if args.init_from:  # RUN's model and objective, under the flags (a model flag that differs is refused)
            from lmforge.train.init_from import init_settings

            flags["init_from"] = args.init_from
            base = init_settings(args.init_from, out=args.out or "", overwrite=bool(args.overwrite))
        cfg = load_config(preset=args.preset, config_file=args.config, overrides=merge(dotted, flags), base=base)
        from lmforge.train.run import pretrain  # (after the config: its errors need no torch)

        pretrain(cfg, overwrite=args.overwrite, progress=not args.quiet)
    elif args.command == "eval" and args.task:
        from lmforge.cli_adapt import check_eval_flags, run_eval_task

        check_eval_flags(args)
        run_eval_task(args)
    elif args.command == "eval":
        from lmforge.cli_adapt import check_eval_flags
        from lmforge.eval.lm import evaluate_checkpoint

        check_eval_flags(args)

        m = evaluate_checkpoint(
            args.run,
            data_dir=args.data,
            split=args.split,
            batch_size=args.batch_size,
            max_batches=args.max_batches,
            device=args.device,
            seq_len=args.seq_len,
        )
        if args.json:
            from lmforge.log import json_text

            print(json_text(m))
        elif "bpb" not in m:  # encoder objectives
            keys = ("loss", "mlm_accuracy", "mlm_ppl", "nsp_accuracy", "rtd_accuracy", "rtd_auc")
            print(f"{m['split']}: " + " | ".join(f"{k} {m[k]:.4f}" for k in keys if k in m) + f" | {m['checkpoint']}")
        else:
            print(
                f"{m['split']}: loss {m['loss']:.4f} | ppl {m['ppl']:.2f} | bpb {m['bpb']:.4f} "
                f"({m['tokens']} tokens, {m['bytes']} bytes) | {m['checkpoint']}"
            )
    elif args.command == "generate":
        from lmforge.cli_adapt import penalties_of
        from lmforge.generate import generate_from_checkpoint

        text = generate_from_checkpoint(
            args.run,
            prompt=args.prompt,
            prompt_file=args.prompt_file,
            num_samples=args.num_samples,
            out=args.out,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            seed=args.seed,
            use_cache=not args.no_cache,
            compile=args.compile,
            stop_at_eos=not args.ignore_eos,
            stop=args.stop,
            device=args.device,
            stream=sys.stdout if args.out is None else None,
            penalties=penalties_of(args),
            progress=not args.quiet,
        )
        if args.prompt_file is None and args.num_samples == 1:
            print()  # (after the streamed text)
        elif args.out is not None:
            n = text.count("\n")  # one per line (splitlines also splits at a U+2028 or U+0085 in a completion)
            print(f"wrote {args.out} ({n} completion{'s' if n != 1 else ''})")
    elif args.command in ("finetune", "chat", "serve"):
        from lmforge.cli_adapt import run as run_adapt

        run_adapt(args, extra)
    elif args.command == "export" and args.to == "gguf":
        from lmforge.export.gguf import export_gguf

        if args.verify or args.peft:
            flag = "--verify" if args.verify else "--peft"
            raise ConfigError(f"{flag} is for --to hf exports; drop it with --to gguf (llama.cpp loads the file)")
        dtype = args.dtype or "auto"
        print(f"wrote {export_gguf(args.run, args.out, dtype=dtype, overwrite=args.overwrite)}")
    elif args.command == "export":
        from lmforge.export.hf import export_hf, verify_hf
        from lmforge.export.peft import export_peft

        export = export_peft if args.peft else export_hf
        out = export(args.run, args.out, overwrite=args.overwrite, dtype=args.dtype or "auto")
        print(f"wrote {out}")
        if args.verify:
            diff = verify_hf(args.run, out, peft=args.peft)
            print(f"transformers{' + peft' if args.peft else ''} loads it; max |logit difference| = {diff:.3g}")
    elif args.command == "quantize":
        from lmforge.compress.quantize import format_quantize, quantize_run

        if args.bits == 8 and args.group_size is not None:  # it was ignored, and recorded in quantize.json
            raise ConfigError("--group-size is for --bits 4 (int8 has one scale per output row); drop it")
        if args.no_compare and "max_batches" in args.given:  # (it was ignored without a word)
            raise ConfigError("--max-batches sets the before/after comparison, which --no-compare skips; drop one")
        r = quantize_run(
            args.run,
            args.out,
            bits=args.bits,
            group_size=64 if args.group_size is None else args.group_size,
            overwrite=args.overwrite,
            compare=not args.no_compare,
            max_batches=args.max_batches,
            val_file=args.val,
        )
        from lmforge.log import json_text

        print(json_text(r) if args.json else format_quantize(r))
    elif args.command == "import":
        from lmforge.export.hf_import import import_hf

        print(f"wrote {import_hf(args.hf_dir, args.out, overwrite=args.overwrite, generator=args.generator)}")
    elif args.command == "estimate":
        from lmforge.config import load_config, parse_overrides
        from lmforge.estimate_adapt import ADAPT_FLAGS, plan_arguments

        overrides = parse_overrides(extra)
        if args.strategy is not None:  # the plan's strategy: the settings it does not read are refused for it
            written = (overrides.get("dist") or {}).get("strategy", args.strategy)
            if written != args.strategy:  # (--strategy won without a word)
                raise ConfigError(
                    f"--strategy {args.strategy} and --dist.strategy {written} name the same setting; give one of them"
                )
            overrides.setdefault("dist", {})["strategy"] = args.strategy
        # a fine-tune's folder: its own batch, optimizer, example length and adapters (finetune.json), under the flags
        flags = {k: getattr(args, k) for k in ADAPT_FLAGS if k in args.given}
        settings, adapt = plan_arguments(args.config, flags)
        if settings:
            from lmforge.config import merge

            overrides = merge(settings, overrides)
        cfg = load_config(preset=args.preset, config_file=args.config, overrides=overrides)
        from lmforge.estimate_args import check_estimate

        hardware: str | float = args.hardware
        try:
            hardware = float(args.hardware)
        except ValueError:
            pass
        checked = check_estimate(  # (torch-free: a bad flag answers before the planner loads torch)
            cfg,
            tokens=args.tokens,
            hardware=hardware,
            mfu=args.mfu,
            world_size=args.world_size,
            strategy=args.strategy,
            price_per_hour=args.price_per_hour,
            interconnect=args.interconnect,
            **adapt,
        )
        from lmforge.estimate import plan
        from lmforge.estimate_table import format_estimate

        result = plan(checked)
        from lmforge.log import json_text

        print(json_text(result) if args.json else format_estimate(result))
    elif args.command == "report":
        from lmforge.report import render_report, watch

        if "every" in args.given and not args.watch:  # (it was ignored: one render, at once)
            raise ConfigError("--every is the seconds between renders with --watch; add --watch or drop it")
        out = args.out or ("report.md" if args.format == "md" else "report.html")
        if args.watch:
            watch(args.runs, out, fmt=args.format, every_s=args.every, overwrite=args.overwrite)
        else:
            print(f"wrote {render_report(args.runs, out, fmt=args.format, overwrite=args.overwrite)}")
    elif args.command == "runs":
        from lmforge.runs import format_runs, list_runs

        runs = list_runs(args.dir)
        if args.json:
            from lmforge.log import json_text

            print(json_text([r.to_dict() for r in runs]))
        else:
            print(format_runs(runs) if runs else f"no lmforge runs under {args.dir}")
    return 0


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def given_flags(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> set[str]:
    """The dests of the options written on `command`'s command line, also those given their default
    value (which a comparison with the default cannot tell from an absent flag)."""
    options = _subparser(parser, command)._option_string_actions
    given = set()
    for token in argv:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        action = options.get(name)  # (the parsers take no abbreviations)
        if action is not None:
            given.add(action.dest)
    return given


def _parse_and_run(argv: list[str] | None) -> int:
    global _starting
    parser = build_parser()  # (imports torch, through the config's dataclasses: a Ctrl-C is held until it is done)
    _starting = False
    if interrupt_seen():
        raise KeyboardInterrupt
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.given = given_flags(parser, args.command, sys.argv[1:] if argv is None else argv)
    _check_flag_typos(parser, args.command, extra)
    return _run(args, extra)


def _check_flag_typos(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> None:
    """A left-over `--name` (no dot: not a --section.key setting) close to one of `command`'s own flags is a
    typo of it (`--temprature`, `--ovewrite`): say which, where argparse said only 'unrecognized arguments'."""
    import difflib

    flags = [f for f in _subparser(parser, command)._option_string_actions if f.startswith("--")]
    for token in extra:
        name = token.split("=", 1)[0]
        if name.startswith("--") and "." not in name:
            match = difflib.get_close_matches(name.replace("_", "-"), flags, n=1, cutoff=0.8)  # (not --resume)
            if match:
                raise ConfigError(f"unknown option {name}; did you mean {match[0]}? (see 'lmforge {command} --help')")


_starting = True


def _on_sigint(signum: int, frame: Any) -> None:
    """Python's own Ctrl-C (raise KeyboardInterrupt), remembered, and held while torch imports: raised there,
    inside a Python callback that torch's C++ start-up makes, it aborted the process (C++ `terminate`, exit
    -6, no message) or left a module half made. After start-up a module imported later (numpy, lazily) can
    still be left half made, so that its next use fails with some other error; with a Ctrl-C seen, that
    error is the interrupt too. One held (`errors.hold_interrupts`) interrupts nothing: it is only noted there."""
    if not _starting and hold_interrupt():
        note = held_note()
        if note and os.environ.get("RANK", "0") == "0":
            say_held_note_soon(note)
        return
    note_interrupt()
    if not _starting:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (not where Ctrl-C is ignored: nohup, &)
    if ours:
        signal.signal(signal.SIGINT, _on_sigint)
    # SIGTERM (kill, docker stop, a scheduler's time limit) as Ctrl-C: the command stops as it does on Ctrl-C,
    # removing its half-built output folder (prepare, export, ...) instead of dying with it in place; the
    # training loop takes both signals over while it runs (finish the step, save, exit 130)
    term = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if term:
        signal.signal(signal.SIGTERM, _on_sigint)
    # A terminal that is not UTF-8 (a zh_CN.GBK or Latin-1 locale) cannot hold every character a model writes
    # (U+FFFD from a stray byte token, an emoji): generate and chat died with a UnicodeEncodeError on the first.
    # Such characters are written as backslash escapes, as Python writes stderr.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        _main(argv)
    finally:
        if ours:  # the exit code is decided: a Ctrl-C now would only interrupt Python's shutdown (torch's finalizers)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if term:  # (outputs are published by now: a kill during shutdown loses nothing)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _comm_failure_under(interrupt: BaseException) -> CommFailure | None:
    """The failed collective a Ctrl-C or SIGTERM arrived on top of (raised while its error was on its way out).

    torchrun SIGTERMs every rank as soon as one fails: a rank whose collective had just failed because a peer
    was killed got that signal while closing its log (plotting loss.png), and printed 'lmforge: interrupted'
    instead of its one line (which rank failed, and that re-running the command resumes)."""
    seen: BaseException | None = interrupt.__context__
    while seen is not None and not isinstance(seen, CommFailure):
        seen = seen.__context__
    return seen


def _quiet_rank(error: BaseException) -> bool:
    """Whether this process is a rank other than 0 whose final line rank 0 prints too, so that a torchrun run ends
    with one line, not one per rank: an error every rank raises alike (`LmforgeError.every_rank`: a refusal of the
    settings they share, a stop or divergence they decided together), a Ctrl-C (torchrun passes it to every rank),
    and, under torchrun before the ranks join (`dist.init`), any error, which the node's local rank 0, running the
    same command, raises too. A rank's own failure (its device, a peer lost, a file) still prints."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
        return False
    if getattr(error, "every_rank", False) or isinstance(error, KeyboardInterrupt):
        return os.environ.get("RANK", "0") != "0"
    dist = sys.modules.get("lmforge.dist")
    before_join = dist is None or not dist.joined
    return before_join and "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_RANK", "0") != "0"


def _before_joining() -> str:
    """What an interrupt of a torchrun rank before the ranks joined (`dist.init`) may have been: torchrun SIGTERMs
    every rank once one dies, and a rank still starting (importing torch) has no group yet that could show it the
    dead peer; it said only "interrupted" (the last one of 20 kills of rank 1 that did). "" otherwise."""
    dist = sys.modules.get("lmforge.dist")
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1") or (dist is not None and dist.joined):
        return ""
    return (
        " before the ranks joined (by Ctrl-C, or by torchrun stopping every rank after one failed: its report names it)"
    )


def _exit(line: str, code: int, error: BaseException) -> None:
    """Print `line` and exit with `code`. A quiet rank (`_quiet_rank`) prints nothing and, but on a Ctrl-C, exits 0:
    the launcher stops every rank as soon as one fails, and rank 0 (plotting loss.png, say) was stopped before it
    printed; rank 0's status is the run's."""
    final_line()
    if not _quiet_rank(error):
        print(line, file=sys.stderr)
    elif not isinstance(error, KeyboardInterrupt):  # (a Ctrl-C stops every rank anyway)
        code = 0
    sys.exit(code)


def _main(argv: list[str] | None) -> None:
    try:
        code = _parse_and_run(argv)
    except LmforgeError as e:
        _exit(f"lmforge: error: {e}", 2, e)
    except Interrupted as e:
        _exit(f"lmforge: {e}", 130, e)
    except KeyboardInterrupt as e:
        failed = _comm_failure_under(e)
        if failed is not None:  # the run was already failing: its line, not the launcher's signal, says what to do
            final_line()
            print(f"lmforge: error: {failed}", file=sys.stderr)
            sys.exit(2)
        _exit("lmforge: interrupted" + _before_joining(), 130, e)
    except BrokenPipeError:  # `lmforge ... | head`: the reader left; nothing is wrong, and nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's flush at exit would fail)
        sys.exit(141)  # 128 + SIGPIPE, as a shell tool killed by it
    except OSError as e:  # disk full, permission denied, ...: the user's environment, not a bug
        if interrupt_seen():
            print("lmforge: interrupted", file=sys.stderr)
            sys.exit(130)
        print(f"lmforge: error: {_os_error(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if interrupt_seen():  # a module an earlier Ctrl-C left half imported
            print("lmforge: interrupted", file=sys.stderr)
            sys.exit(130)
        loop = _symlink_loop(e)
        if loop is not None:
            print(f"lmforge: error: {loop}", file=sys.stderr)
            sys.exit(2)
        oom = _out_of_memory(e)
        if oom is None:
            raise
        print(
            f"lmforge: error: out of memory ({oom}); use a smaller model (--model.*), batch (--train.batch_size, "
            "--train.micro_batch_size) or input ('lmforge estimate' shows what a config needs)",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(code)


# A write the file system refused, by errno: what failed, and what to do
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device; free space or choose another --out",
    errno.EDQUOT: "disk quota exceeded; free space or choose another --out",
    errno.EFBIG: "file too large for the file system or the file-size limit (ulimit -f); choose another --out",
    errno.EROFS: "read-only file system; choose another --out",
}


def _os_error(e: OSError) -> str:
    """The line for a failed file operation. A full disk (or quota, file-size limit, read-only file system) is
    "cannot write FILE: no space left on device; free space or choose another --out", FILE as the user knows it
    (not the hidden folder an output is built in: `atomic.public_path`); it was "[Errno 28] No space left on
    device" with a hidden build folder's file, or no file at all."""
    from lmforge.atomic import public_path

    if e.errno == errno.ELOOP and e.filename is not None:
        return _LOOP.format(public_path(e.filename))
    if e.errno in _WRITE_ERRORS and e.filename is not None:
        return f"cannot write {public_path(e.filename)}: {_WRITE_ERRORS[e.errno]}"
    if (blocker := _file_in_the_way(e)) is not None:
        target = public_path(e.filename) if e.errno == errno.ENOTDIR else f"the folder {blocker}"
        return f"cannot create {target}: {blocker} is a file, not a folder; choose another --out"
    return f"{public_path(str(e))}; check the path, free space and permissions"


_LOOP = "{} is a symbolic link loop (its links lead back to themselves); fix or remove the link"


def _symlink_loop(e: Exception) -> str | None:
    """The line for a path that is a symbolic-link loop (`ln -s loop loop`), or None when `e` is not about one.
    Python 3.10-3.12's `Path.resolve()` raises RuntimeError("Symlink loop from '/x/loop'") where 3.13 raises an
    OSError (ELOOP, `_os_error`): `prepare loop --out x` (or `--out loop`) was a traceback."""
    import ast

    prefix = "Symlink loop from "
    text = str(e)
    if not (isinstance(e, RuntimeError) and text.startswith(prefix)):
        return None
    try:
        path = ast.literal_eval(text[len(prefix) :])
    except (ValueError, SyntaxError):
        path = text[len(prefix) :]
    return _LOOP.format(path)


def _file_in_the_way(e: OSError) -> str | None:
    """The regular file where a folder of the path being created has to be, or None. `--out notes.txt/x` failed as
    "[Errno 17] File exists: 'notes.txt'" (os.makedirs on the file, EEXIST) or "[Errno 20] Not a directory:
    'notes.txt/x'" (a file under it, ENOTDIR)."""
    from pathlib import Path

    if e.errno not in (errno.EEXIST, errno.ENOTDIR) or not isinstance(e.filename, str):
        return None
    path = Path(e.filename)
    for folder in [*reversed(path.parents), path] if e.errno == errno.ENOTDIR else [path]:
        if folder.exists() and not folder.is_dir():
            return str(folder)
    return None


# numpy's ValueError for an array whose size overflows its index type (`--train.batch_size 1e30`: the loader's
# np.arange of the batch), where a merely too large one is a MemoryError
_NUMPY_TOO_BIG = ("Maximum allowed size exceeded", "array is too big; ")


def _out_of_memory(e: Exception) -> str | None:
    """What an allocation that failed asked for, or None when `e` is not one. A model or batch too big for the
    machine (--model.d_model 262144, --train.batch_size 1e11) was a traceback: numpy raises MemoryError, torch's
    CPU allocator a RuntimeError "can't allocate memory: you tried to allocate N bytes", CUDA
    torch.OutOfMemoryError (a RuntimeError) "CUDA out of memory. Tried to allocate 20.00 MiB"; one past any address
    space (--train.batch_size 1e30) is numpy's ValueError "Maximum allowed size exceeded"."""
    text = str(e)
    failed = isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)
    if isinstance(e, ValueError) and text.startswith(_NUMPY_TOO_BIG):  # past what any address space holds
        return "an array larger than any machine's memory was asked for"
    if not (isinstance(e, MemoryError) or failed):
        return None
    import re

    size = re.search(r"allocate (?:memory: you tried to allocate )?(\d[\d.]*) ?(bytes|[KMGTP]iB)", text)
    if size is None:
        return "a memory allocation failed"
    amount, unit = size.groups()
    if unit == "bytes":
        amount, unit = f"{int(amount) / 2**30:.1f}", "GiB"
    return f"tried to allocate {amount.rstrip('.')} {unit}"
