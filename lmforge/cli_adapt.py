"""Argument definitions and dispatch for the adaptation commands: `finetune`, `chat`, `serve`, and the
task flags of `eval` (`--task`, `--field`, `--k-shot`, ...).

Kept out of `cli.py` so that file stays a short table of commands while several people extend it at
once; like `cli.py`, nothing here has logic: each command calls one library function.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

ADAPT_COMMANDS = ("finetune", "chat", "serve")


def _finetune_epilog() -> str:
    """The --train/--optim/--eval/--checkpoint/--log settings with fine-tuning's own defaults (not pretrain's)."""
    import dataclasses

    from lmforge.finetune_config import ADAPT_LR, FINETUNE_SECTIONS, PRETRAIN_ONLY, finetune_sections

    lines = ["settings (--section.key VALUE; fine-tuning defaults, which differ from pretrain's):"]
    for name, section in zip(FINETUNE_SECTIONS, finetune_sections("full", None), strict=True):
        for f in dataclasses.fields(section):
            key, default = f"{name}.{f.name}", repr(getattr(section, f.name))
            if key in PRETRAIN_ONLY:  # (refused by finetune)
                continue
            if key == "train.lr":
                default = ", ".join(f"{adapt} {lr:g}" for adapt, lr in ADAPT_LR.items()) + " (by --adapt)"
            lines.append(f"  --{key:<28} {f.metadata.get('help', '')} (default: {default})")
    return "\n".join(lines)


def add_min_p_arg(p: argparse.ArgumentParser) -> None:
    """`generate` and `chat`: --min-p (serve takes "min_p" per request)."""
    p.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        metavar="P",
        help="min-p sampling: keep the tokens at least P x as likely as the most likely one; 0 = off, 0.05-0.1 typical",
    )


def add_penalty_args(p: argparse.ArgumentParser) -> None:
    """`generate` and `chat`: `sampling.Penalties` as flags (serve takes them per request)."""
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide the scores of tokens already in the prompt or output (CTRL, as transformers); 1 = off, 1.1-1.3 "
        "curbs loops",
    )
    p.add_argument(
        "--presence-penalty", type=float, default=0.0, help="subtract from tokens generated before (-2..2, OpenAI's)"
    )
    p.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="subtract per earlier use of a token (-2..2, OpenAI's)"
    )


def penalties_of(args: argparse.Namespace) -> Any:
    from lmforge.sampling import Penalties

    return Penalties(args.presence_penalty, args.frequency_penalty, args.repetition_penalty)


def add_parsers(sub: Any) -> None:
    from lmforge.fields import ONE_OUT, Once, add_dataclass_args
    from lmforge.finetune_config import FinetuneConfig

    p = sub.add_parser(
        "finetune",
        help="adapt a pretrained run or local HF model to a task",
        description="Fine-tune BASE (an lmforge run or checkpoint, a fine-tuned run, or a local Hugging Face "
        "GPT-2/Llama/Qwen2/BERT/ELECTRA directory or hf:ORG/NAME on the Hub; BERT/ELECTRA bases: --task classify "
        "with --adapt "
        "full/head/lora) on a JSONL/JSON/CSV/TSV/Parquet/TXT "
        "task file. Re-running the same command on an existing --out resumes it from its latest checkpoint. "
        "Fields default to text/label (classify), "
        "instruction/input/output or messages (sft), source/target (translate), question/answer/context (qa; "
        "answer may be a list or SQuAD's answers, and a SQuAD JSON file is read as it is), "
        "prompt/chosen/rejected (dpo), text (clm); rename with --field NAME=COLUMN. Training settings: "
        "--train.*, --optim.*, --eval.*, --checkpoint.*, --log.* (trackers; only those sections; see below).",
        epilog=_finetune_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", metavar="BASE")
    join = "join the files into one (a JSONL/CSV file's rows one after another)"
    p.add_argument(
        "--train", dest="train_file", required=True, action=Once, hint=join, metavar="FILE", help="training data"
    )
    p.add_argument(
        "--val", dest="val_file", action=Once, hint=join, metavar="FILE", help="validation data (metrics at the end)"
    )
    p.add_argument(
        "--out",
        required=True,
        action=Once,
        hint=ONE_OUT,
        help="run directory (an existing one of the same command is resumed)",
    )
    p.add_argument("--overwrite", action="store_true", help="start an existing --out over instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    add_dataclass_args(
        p,
        FinetuneConfig,
        once={
            "teacher": "distillation learns from one teacher; pick one",
            "replay": join.replace("the files", "the replay files"),
            "old_val": join.replace("the files", "the old-domain files"),
        },
    )

    p = sub.add_parser(
        "chat",
        help="interactive chat with a run in the terminal",
        description="Chat with a run using its chat template. The history is kept within the context "
        "window (oldest turns dropped first; a message that does not fit beside the system message and the reply "
        "is not sent, and a notice says by how much to shorten it); replies stream as they are generated. "
        "/reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply. In a terminal, lines are "
        "edited with readline (a pasted block of lines is one message); it reads from stdin, so it also works in a "
        "pipe (one message per line).",
    )
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--system", default="", help="system message kept at the top of the history")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=200,
        help="reply length limit (default: 200; at most half the model's context: the other half holds the history)",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    p.add_argument(
        "--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 or -1 = off (default: 50)"
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off, 0 = only the most likely token"
    )
    add_min_p_arg(p)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for reproducible sessions: reply i (from 0) samples with seed + i, so the same messages get the "
        "same replies, and a message sent again gets a new one",
    )
    add_penalty_args(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device (default: auto)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step: the first reply waits ~5-22 s more on CPU (needs a C++ compiler), "
        "then each token is ~5-15%% faster",
    )

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP API for a run (completions, chat, streaming)",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (with stream=true as "
        "Server-Sent Events; n, logprobs, echo, penalties, logit_bias) and vLLM's /tokenize, /detokenize and "
        "/tokenizer_info (lm-evaluation-harness's local-completions model scores a run through them) using only the "
        "Python standard library. Binds 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0: every IPv4 address; an IPv6 address "
        "such as ::1, or :: for every one, binds IPv6)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (default: 1000000)")
    p.add_argument(
        "--max-tokens", type=int, default=512, help="most tokens one request may generate per prompt (default: 512)"
    )
    p.add_argument(
        "--max-prompts", type=int, default=64, help="most prompts in one completion request's list (default: 64)"
    )
    p.add_argument(
        "--idle-timeout", type=float, default=60.0, help="seconds a kept-alive connection may idle (default: 60)"
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let scripts of the web page at ORIGIN (e.g. http://localhost:3000; '*' = any page) call the API from "
        "a browser; repeatable (default: none)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        metavar="NAME",
        help="the model's name(s) in the API, as vLLM's: replies carry the first, and a request for any other "
        "'model' gets a 404 (default: named after the run directory, and any name is answered)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device (default: auto)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step, before the server starts listening (~5-22 s on CPU, needs a C++ "
        "compiler); then each token is ~5-15%% faster",
    )


# eval's two modes take different flags: these only apply with --task, the split ones only without it
# (doc_stride: data/qa.py's DOC_STRIDE, written here so that building the parser imports no torch; a test checks)
_TASK_FLAGS = {"field": None, "k_shot": 0, "shots": None, "max_new_tokens": 0, "limit": 0, "doc_stride": 128}
_SPLIT_FLAGS = {"split": "val", "batch_size": 0, "max_batches": 0, "seq_len": 0}


def add_eval_task_args(p: Any) -> None:
    """Task-evaluation flags of `lmforge eval` (with --task, --data is a task FILE)."""
    from lmforge.fields import Once

    p.add_argument(
        "--task",
        choices=["classify", "sft", "translate", "qa", "dpo", "clm", "choice"],
        help="task metrics on --data FILE (accuracy/macro_f1, em/f1, bleu/chrf, reward accuracy, loss; choice: "
        "multiple choice by log-likelihood, accuracy/accuracy_norm)",
    )
    p.add_argument(
        "--field",
        action="append",
        metavar="NAME=COLUMN",
        help="rename a task field (repeatable; a dotted COLUMN reaches into nested JSON)",
    )
    p.add_argument(
        "--k-shot", type=int, default=0, help="classify/choice in-context with k examples from --shots (no head)"
    )
    p.add_argument(
        "--shots",
        action=Once,
        hint="join the example files into one",
        metavar="FILE",
        help="labelled examples (solved questions) for --k-shot",
    )
    default = _TASK_FLAGS["max_new_tokens"]
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=default,
        help="sft/qa/translate: answer length (default: 48, or half the model's context where 48 does not fit)",
    )
    p.add_argument("--limit", type=int, default=0, help="score only the first N rows (default: all)")
    p.add_argument(
        "--doc-stride",
        type=int,
        default=_TASK_FLAGS["doc_stride"],
        help="qa: a context too long for the model is read in overlapping windows sharing this many tokens (at "
        f"most half a window; default: {_TASK_FLAGS['doc_stride']})",
    )


def check_eval_flags(args: argparse.Namespace) -> None:
    """A flag of the other `eval` mode, or of another task, would be ignored: it is an error instead."""
    from lmforge.errors import ConfigError

    written = getattr(args, "given", set())  # flags on the command line, also at their default value

    def given(flags: dict[str, Any]) -> list[str]:
        return [
            "--" + k.replace("_", "-") for k, default in flags.items() if getattr(args, k) != default or k in written
        ]

    if not args.task:
        if given(_TASK_FLAGS):
            raise ConfigError(f"{given(_TASK_FLAGS)[0]} is for task metrics: add --task TASK --data FILE, or drop it")
        return
    if given(_SPLIT_FLAGS):
        raise ConfigError(f"{given(_SPLIT_FLAGS)[0]} is for evaluating a prepared split (eval without --task); drop it")
    if args.task not in ("classify", "choice") and (args.k_shot or args.shots or written & {"k_shot", "shots"}):
        raise ConfigError("--k-shot and --shots are for --task classify or choice (in-context examples); drop them")
    if args.shots and not args.k_shot:
        raise ConfigError("--shots needs --k-shot K, the number of examples put before each row")
    if args.task not in ("sft", "qa", "translate") and given({"max_new_tokens": _TASK_FLAGS["max_new_tokens"]}):
        raise ConfigError("--max-new-tokens is for --task sft, qa or translate (generated answers); drop it")
    if args.task != "qa" and given({"doc_stride": _TASK_FLAGS["doc_stride"]}):
        raise ConfigError("--doc-stride is for --task qa (windows of a context too long for the model); drop it")


def run_eval_task(args: argparse.Namespace) -> None:
    from lmforge.eval.tasks import evaluate_task, format_metrics

    if not args.data:
        from lmforge.errors import ConfigError

        raise ConfigError("--task needs --data FILE (a JSONL/JSON/CSV/TSV/Parquet/TXT task file)")
    m = evaluate_task(
        args.run,
        task=args.task,
        data=args.data,
        field_renames=args.field,
        k_shot=args.k_shot,
        shots=args.shots,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        doc_stride=args.doc_stride,
        device=args.device,
    )
    from lmforge.log import json_text

    print(json_text(m) if args.json else format_metrics(m))


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.command == "finetune":
        from lmforge.config import parse_overrides
        from lmforge.fields import dataclass_from_namespace
        from lmforge.finetune_config import FinetuneConfig, check_applies

        cfg = dataclass_from_namespace(FinetuneConfig, args)
        check_applies(cfg, getattr(args, "given", set()))  # a flag written at its default value, too
        from lmforge.finetune import finetune  # (after the flags' checks: their errors need no torch)

        finetune(
            args.base,
            train_file=args.train_file,
            val_file=args.val_file,
            out=args.out,
            cfg=cfg,
            overrides=parse_overrides(extra),
            overwrite=args.overwrite,
            progress=not args.quiet,
            summary=True,  # "wrote OUT (N steps, T s)", or a finished run's "nothing to do" alone
        )
    elif args.command == "chat":
        from lmforge.chat import chat

        penalties = penalties_of(args)  # (checked before the model loads)
        chat(
            args.run,
            stdin=sys.stdin,
            stdout=sys.stdout,
            system=args.system,
            max_new_tokens=args.max_new_tokens if "max_new_tokens" in args.given else None,  # (a default: no note)
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            seed=args.seed,
            device=args.device,
            compile=args.compile,
            penalties=penalties,
        )
    elif args.command == "serve":
        from lmforge.serve import ServeLimits, make_server, serve

        limits = ServeLimits(
            max_body_bytes=args.max_body_bytes,
            max_tokens=args.max_tokens,
            max_prompts=args.max_prompts,
            idle_timeout_s=args.idle_timeout,
        )
        serve(
            make_server(
                args.run,
                host=args.host,
                port=args.port,
                limits=limits,
                device=args.device,
                compile=args.compile,
                cors_origins=tuple(args.cors_origin),
                served_model_names=tuple(args.served_model_name),
            )
        )
    return 0
