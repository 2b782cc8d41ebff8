"""The `lmforge` command line: parse arguments, call one library function, map errors.

No logic lives here. Each subcommand calls one function that is also the Python API. A user error
(`LmforgeError`) prints one line on stderr and exits with 2; an interrupted training run (which
saved a checkpoint) exits with 130; anything else is a bug and keeps its traceback.

Length (~1,040 lines, over the 800-line guide): about 450 are `build_parser`'s flags and help text, one block per
command, which stay together so `--help` reads as one document; `_run` maps each command to its one library
call. The next split would be the per-command parsers into a `cli_parsers.py` beside `cli_adapt.py`.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from typing import Any

from lmforge import __version__
from lmforge.errors import (
    CommFailure,
    ConfigError,
    Interrupted,
    LmforgeError,
    held_note,
    hold_interrupt,
    interrupt_seen,
    note_interrupt,
)
from lmforge.fields import ONE_OUT, Once

TOUR = """commands:
  quickstart   train a small GPT on the built-in Shakespeare corpus, evaluate it and sample from it
  prepare      raw text/JSONL/CSV/Parquet/HF datasets -> cleaned, filtered, deduplicated, tokenized shards + card
  pretrain     train a GPT/Llama/LSTM/GRU (clm) or BERT/ELECTRA (mlm, mlm+nsp, electra) model (resumes on re-run)
  eval         loss, perplexity and bits per byte of a run on a prepared split, or task metrics (--task) on a file
  generate     sample text from a run or checkpoint (greedy, temperature, top-k/p, min-p, stop strings, batches)
  export       write a run as a Hugging Face directory (GPT-2/Llama/Qwen2/BERT/ELECTRA, LoRA merged or --peft) or GGUF
  quantize     weight-only int8/int4 copy of a run; prints bpb, size and generation speed before/after
  import       turn a local Hugging Face GPT-2/Llama/Qwen2/BERT/ELECTRA directory into an lmforge run
  estimate     parameters, FLOPs, memory, time and cost of a run before you start it
  report       one HTML (or Markdown) page comparing runs: curves, config differences, evals, samples
  runs         table of the runs under a folder: status, steps, tokens, best val loss, last checkpoint
  finetune     adapt a run or HF model to a task: classify, sft, translate, qa, dpo, clm (full/head/lora/prompt/distill)
  chat         talk to a chat-tuned run in the terminal (streams; /reset, /exit)
  serve        OpenAI-compatible /v1/completions and /v1/chat/completions on 127.0.0.1

run 'lmforge COMMAND --help' for a command's options."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), in the house format, and no abbreviations."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # so --train.lr is never mistaken for a prefix of a flag
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        import difflib
        import re

        # a typo of a command or a choice (`lmforge pretrian`, `--task clasify`) gets the closest one, as keys do
        bad = re.match(r"argument .+: invalid choice: '?(.*?)'? \(choose from (.*)\)$", message)
        choices = [c.strip().strip("'") for c in bad[2].split(",")] if bad else []
        hint = difflib.get_close_matches(bad[1], choices, n=1) if bad else []
        see = f"did you mean '{hint[0]}'? (see '{self.prog} --help')" if hint else f"see '{self.prog} --help'"
        self.exit(2, f"{self.prog}: error: {message}; {see}\n")


_ONE_CONFIG = "merge the files into one, or give the other file's settings as --section.key flags"


def _config_epilog(presets: bool = True) -> str:
    from lmforge.config import help_lines
    from lmforge.presets import PRESETS, preset_dict

    order = "defaults < --preset < --config < flags" if presets else "defaults < the quickstart preset < flags"
    lines = [f"settings (any of these as --section.key VALUE; precedence: {order}):"]
    quickstart = {} if presets else preset_dict("quickstart")  # quickstart trains its preset: show its values
    for key, text, default in help_lines():
        if key in ("preset", "out", "data.dir", "init_from"):  # (their own flags; --init-from: pretrain's)
            continue
        section, _, name = key.partition(".")
        default = (quickstart.get(section) or {}).get(name, default) if name else quickstart.get(key, default)
        shown = "" if default is None else f" (default: {default!r})"  # (its text says what unset means)
        lines.append(f"  --{key:<28} {text}{shown}")
    if presets:
        lines.append(f"\npresets: {', '.join(PRESETS)}")
    return "\n".join(lines)


def build_parser() -> Parser:
    from lmforge.data.prepare import PrepareConfig
    from lmforge.fields import add_dataclass_args

    parser = Parser(
        prog="lmforge",
        description="Train language models end to end on the hardware you have.",
        epilog=TOUR,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser(
        "quickstart",
        help="train, evaluate and sample a small GPT on the built-in corpus (~5 min on 2 CPU cores)",
        description="Prepare the built-in Shakespeare corpus, train a small GPT, print validation "
        "perplexity and bits per byte, and sample from it. Extra --section.key VALUE settings are applied.",
        epilog=_config_epilog(presets=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", default="runs/quickstart", action=Once, hint=ONE_OUT, help="run directory (default: runs/quickstart)"
    )
    p.add_argument(
        "--data-out",
        default="data/quickstart",
        action=Once,
        hint=ONE_OUT,
        help="prepared data directory (default: data/quickstart)",
    )
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming an existing run")

    p = sub.add_parser(
        "prepare",
        help="clean, deduplicate, tokenize and split raw text into a data directory",
        description="Read .txt/.md/.jsonl/.json/.csv/.tsv (+ .gz/.zst), .parquet, folders (recursive), globs and "
        "Hugging Face datasets; clean, filter, deduplicate (exact or near), train or load a tokenizer, split "
        "train/val/test by document hash, write token shards, manifest.json and a data card.",
    )
    add_dataclass_args(
        p,
        PrepareConfig,
        positional=("inputs",),
        once={"tokenizer": "prepare with one tokenizer (a kind, or one tokenizer.json)", "out": ONE_OUT},
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "pretrain",
        help="train a GPT, Llama, LSTM/GRU, BERT or ELECTRA model on a prepared data directory",
        description="Pretrain a model with causal language modelling (GPT, Llama-style, LSTM, GRU), masked "
        "language modelling (+ NSP/SOP) or ELECTRA's replaced-token detection. Re-running the same "
        "command on an existing --out resumes from its latest checkpoint.",
        epilog=_config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        action=Once,
        hint="to train on several prepared folders, mix them: --data.mix 'DIR=0.7,DIR2=0.3'",
        help="prepared data directory (from 'lmforge prepare')",
    )
    p.add_argument("--out", action=Once, hint=ONE_OUT, help="run directory")
    p.add_argument("--preset", help="named preset (see the list below)")
    p.add_argument(
        "--config",
        action=Once,
        hint=_ONE_CONFIG,
        help="TOML config file with [model], [train], ... sections, or a run's config.json or run folder "
        "(its resolved settings)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out and start over")
    p.add_argument(
        "--init-from",
        action=Once,
        hint="a run starts from one model; pick the RUN to continue from",
        metavar="RUN",
        help="continued pretraining: start from RUN's model and weights (its latest checkpoint, or the checkpoint "
        "folder given; a pretrained, imported or quantized run, encoders too) with a fresh optimizer and schedule; "
        "data prepared with another tokenizer than RUN's keeps RUN's rows of the tokens both have (new ones start "
        "at their mean). Ignored (with a note) when --out already has checkpoints: those resume",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument(
        "--objective",
        choices=["clm", "mlm", "mlm+nsp", "mlm+sop", "electra"],
        help="pretraining objective (= --objective.name; the encoder presets set it): clm for gpt/lstm/gru, "
        "mlm/mlm+nsp/mlm+sop for bert, electra for electra",
    )

    p = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per byte on a prepared split, or task metrics (--task) on a file",
        description="Evaluate a run directory (its latest checkpoint) or a checkpoint folder. Encoder runs "
        "report their objective's metrics: mlm_accuracy, mlm_ppl, nsp_accuracy (BERT), rtd_accuracy, rtd_auc "
        "(ELECTRA).",
    )
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument(
        "--data",
        action=Once,
        hint="evaluate one data directory or task file per command (run it once for each)",
        help="prepared data directory (default: the one the run trained on); with --task a FILE",
    )
    p.add_argument("--split", default="val", choices=["val", "test", "train"], help="which split (default: val)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="sequences per batch, one forward pass each (default: the run's eval batch: its eval.batch_size, or "
        "its train.batch_size run in forward passes of its micro-batch)",
    )
    p.add_argument(
        "--max-batches",
        type=int,
        default=0,
        metavar="N",
        help="evaluate only the first N batches (N x --batch-size sequences) of the split, the ones the run's "
        "evaluations with --eval.max_batches N cover (default: all)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=0,
        metavar="N",
        help="tokens per scored sequence, at most the model's context (default: the run's data.seq_len, else its "
        "context; an imported model knows only its context)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device (default: auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    from lmforge.cli_adapt import add_eval_task_args, add_parsers

    add_eval_task_args(p)

    p = sub.add_parser(
        "generate",
        help="sample text from a run or checkpoint",
        description="Generate a continuation of --prompt, streamed to the terminal as it comes; or --num-samples "
        "of it; or completions of every prompt of a --prompt-file, decoded in batches, as JSONL.",
    )
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument(
        "--prompt",
        default=None,
        action=Once,
        hint="for several prompts write them to a file, one per line, and pass --prompt-file FILE",
        help="text to continue; special-token strings in it (<|endoftext|>) are read as their ids, as serve and "
        "the run's HF export read them (default: start of a new document)",
    )
    p.add_argument(
        "--prompt-file",
        default=None,
        action=Once,
        hint="join the prompt files into one (or run the command once per file)",
        metavar="FILE",
        help='complete many prompts, in batches: a .txt (one prompt per line) or a .jsonl (a "prompt" field per '
        'line; its other fields, such as "id", are copied to the line\'s output lines); - reads stdin (JSONL if '
        "its first non-blank line is a JSON object, else text); blank lines (empty, or only spaces and tabs) are "
        "skipped, and a note counts them; .gz and .zst are "
        "decompressed. Prints JSONL, one "
        '{"prompt", "completion", "finish_reason"} per line in input order (with --num-samples also "sample"); '
        "greedy, each equals --prompt's",
    )
    p.add_argument(
        "--out",
        default=None,
        action=Once,
        hint=ONE_OUT,
        metavar="FILE",
        help="write --prompt-file's JSONL to FILE (atomically, replacing it, once all are done) instead of "
        "printing it; finished completions are kept in FILE.partial meanwhile, so after Ctrl-C or a kill the same "
        "command continues where it stopped, with any --batch-size (same prompts, checkpoint, settings and --seed: "
        "the same FILE)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="--prompt-file / --num-samples: completions decoded together, in one KV cache (more rows: more "
        "memory) (default: 16)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=1,
        metavar="N",
        help="N completions of each prompt, decoded together (--prompt: printed one after another under "
        "'=== sample i/N ===' lines); reproducible with --seed (default: 1)",
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate, >= 1 (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off, 0 = only the most likely token"
    )
    from lmforge.cli_adapt import add_min_p_arg, add_penalty_args

    add_min_p_arg(p)
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STRING",
        help="end the completion where this text appears (matched on the decoded text, across tokens; the "
        "string itself not shown, as OpenAI's stop); taken as typed, no escapes (a blank line: bash's $'\\n\\n'); "
        "repeat for several",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    add_penalty_args(p)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each token (no KV cache)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step: compiling takes ~5-22 s on CPU (needs a C++ compiler), then each "
        "token is ~5-15%% faster; pays off for long outputs (gpt models; refused for lstm/gru, which it slows down)",
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep going past the end of a document (blank line between documents)"
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="--prompt-file / --num-samples: no progress bar (drawn on stderr, on a terminal only)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device (default: auto)")

    p = sub.add_parser(
        "export",
        help="write a run or checkpoint as a Hugging Face model directory (--to hf) or a GGUF file (--to gguf)",
        description="Write config.json, model.safetensors, generation_config.json, tokenizer files and a model "
        "card that transformers loads with AutoModelForCausalLM / AutoTokenizer (GPT-2, Llama, Qwen2 style; a Qwen2 "
        "export whose tokenizer is not split as Qwen2's notes that it loads with PreTrainedTokenizerFast) or "
        "AutoModelForMaskedLM (BERT; ELECTRA: its discriminator as ElectraForPreTraining). LoRA runs export merged, "
        "or with --peft as a PEFT adapter directory. "
        "--to gguf writes one .gguf file for llama.cpp instead (Llama style, byte-level BPE or char tokenizer; "
        "pip install 'lmforge[gguf]').",
    )
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--to", default="hf", choices=["hf", "gguf"], help="target format (default: hf)")
    p.add_argument("--out", required=True, action=Once, hint=ONE_OUT, help="output directory (hf) or .gguf file (gguf)")
    p.add_argument(
        "--dtype",
        help="hf: auto (default: the source dtype of an imported model, also after fine-tuning it, else the weights' "
        "dtype), float32, bfloat16 or float16; gguf: auto (default: bf16 for a model imported from bf16 or "
        "fine-tuned from one, else f16), f16, bf16 or q8_0",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--verify", action="store_true", help="load the export with transformers and compare logits")
    p.add_argument(
        "--peft",
        action="store_true",
        help="hf, LoRA runs: write a PEFT adapter directory (base model in OUT/base) instead of merged weights",
    )

    p = sub.add_parser(
        "import",
        help="turn a local Hugging Face GPT-2/Llama/Qwen2/BERT/ELECTRA directory into an lmforge run",
        description="Read config.json + model.safetensors (or pytorch_model.bin, weights only) + tokenizer.json "
        "(or GPT-2's vocab.json + merges.txt, BERT's vocab.txt) and write a run directory that eval/generate load. "
        "HF_DIR may be hf:ORG/NAME[@REVISION], a model on the Hugging Face Hub (downloaded into its cache).",
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="a local HF model directory, or hf:ORG/NAME from the Hub")
    p.add_argument("--out", required=True, action=Once, hint=ONE_OUT, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--generator",
        action=Once,
        hint="ELECTRA has one generator; pick the GEN_DIR trained with HF_DIR",
        metavar="GEN_DIR",
        help="ELECTRA: the generator (ElectraForMaskedLM) trained with the discriminator HF_DIR, imported too "
        "(default: a freshly initialised one)",
    )

    p = sub.add_parser(
        "quantize",
        help="weight-only int8/int4 quantization of a run's Linear layers",
        description="Write a copy of a GPT run whose Linear weights are int8 (per output channel) or int4 "
        "(per group of --group-size inputs, two per byte) with fp16 scales, in safetensors. eval/generate/chat/"
        "serve/export load it (dequantized on load). Prints val bpb, size on disk and CPU generation speed "
        "before and after.",
    )
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--bits", type=int, default=8, choices=[8, 4], help="weight bits (default: 8)")
    p.add_argument("--group-size", type=int, default=None, help="int4: inputs per scale (default: 64)")
    p.add_argument("--out", required=True, action=Once, hint=ONE_OUT, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--max-batches",
        type=int,
        default=20,
        help="bpb comparison on the first N forward batches of val sequences (the run's eval.batch_size, or its "
        "training micro-batch) (default: 20)",
    )
    p.add_argument(
        "--val",
        default=None,
        action=Once,
        hint="join the validation files into one (or run the command once per file)",
        metavar="FILE",
        help="a fine-tune: the task file to compare val loss/bpb on (default: the --val it was fine-tuned with; "
        "a pretrained run is compared on its prepared data's val split)",
    )
    p.add_argument("--no-compare", action="store_true", help="skip the before/after bpb and speed measurements")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "estimate",
        help="parameters, FLOPs, memory, time and cost of a run, from its config alone",
        description="Plan a run before starting it: parameters (total, non-embedding), training FLOPs "
        "(6ND + attention), memory per device (weights, gradients, optimizer, activations with and without "
        "activation checkpointing), the Chinchilla-optimal token count, and wall-clock time and cost at a "
        "stated MFU. Any --section.key setting of 'pretrain' is accepted (e.g. --model.n_layer 24; --data.dir "
        "DATA_DIR: its tokenizer's vocabulary, unless --model.vocab_size is set).",
        epilog=_config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", help="named preset (see the list below)")
    p.add_argument(
        "--config",
        action=Once,
        hint=_ONE_CONFIG,
        help="TOML config file with [model], [train], ... sections, or a run's config.json or run folder "
        "(its resolved settings)",
    )
    p.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 2.5e9")
    p.add_argument(
        "--hardware",
        default="cpu",
        help="cpu or measure (this machine's matmul peak, measured now), a100, h100, or a peak in GFLOP/s "
        "(default: cpu)",
    )
    p.add_argument("--mfu", type=float, default=0.0, help="model FLOPs utilization, e.g. 0.4 (default: per hardware)")
    p.add_argument("--world-size", type=int, default=1, help="devices training together (default: 1)")
    p.add_argument(
        "--strategy",
        choices=["ddp", "fsdp", "diloco"],
        help="data parallel strategy; diloco syncs every --dist.sync_every steps (default: --dist.strategy, ddp)",
    )
    p.add_argument("--price-per-hour", type=float, default=None, help="USD per device-hour (default: an assumed price)")
    p.add_argument(
        "--interconnect",
        default=None,
        help="the slowest link each device's traffic crosses, for the communication time: nvlink (H100, 450 GB/s "
        "each way), nvlink-a100 (300 GB/s), pcie (4.0 x16, 31.5 GB/s), ib (NDR, 400 Gbit/s per GPU), ethernet "
        "(10 Gbit/s), or Gbit/s each way per device (default: communication time not included)",
    )
    from lmforge.estimate import ADAPT_MODES
    from lmforge.finetune_config import finetune_sections

    finetune_batch = finetune_sections("lora", None)[0].batch_size  # (the same in every mode)
    p.add_argument(
        "--adapt",
        default="full",
        choices=list(ADAPT_MODES),
        help="full: every weight trains (pretraining, full fine-tuning); lora, head, prompt: finetune's modes, the "
        "base frozen: LoRA adapters, the head alone (no backward through the body), a soft prompt (backward through "
        f"every block to it); these take finetune's batch ({finetune_batch} sequences), optimizer and "
        "--train.device/dtype, not "
        "the preset's or --config's pretraining ones, unless --train.* / --optim.* says (default: full)",
    )
    from lmforge.finetune_config import FinetuneConfig  # (its defaults are the plan's: estimate_adapt.plan_arguments)

    finetune_cfg = FinetuneConfig()
    p.add_argument(
        "--lora-rank", type=int, help=f"--adapt lora: LoRA rank r (default: {finetune_cfg.lora_rank}, as finetune)"
    )
    p.add_argument(
        "--lora-targets",
        action="append",
        help="--adapt lora: layers with adapters, among qkv, attn.proj, mlp.fc, mlp.proj: repeat the flag as for "
        f"finetune, or separate them with commas (default: {','.join(finetune_cfg.lora_targets)}, as finetune)",
    )
    p.add_argument(
        "--lora-dropout",
        type=float,
        help=f"--adapt lora: dropout on the adapters' input, whose mask a step keeps (default: "
        f"{finetune_cfg.lora_dropout:g}, as finetune)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        help=f"--adapt prompt: soft-prompt length; the text gets the rest of the context (default: "
        f"{finetune_cfg.prompt_tokens}, as finetune)",
    )
    p.add_argument(
        "--teacher",
        metavar="RUN_OR_PRESET",
        help="plan finetune --adapt distill --teacher: a frozen teacher's forward, fp32 weights and soft targets on "
        "top of the full fine-tune (a run or checkpoint folder, an HF model directory, hf:ORG/NAME or a preset; it "
        "runs in the student's --train.dtype) (default: none; a distillation run's --config names its own)",
    )
    p.add_argument(
        "--labels",
        type=int,
        default=0,
        help="plan finetune --task classify with this many labels, in any --adapt mode (a head on the last "
        "token, no vocabulary logits) (default: 0, an LM task: sft, qa, translate, clm)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "report",
        help="one self-contained HTML (or Markdown) page comparing runs",
        description="Config differences, loss against steps/tokens/wall-clock, learning rate, gradient norm, "
        "throughput, MFU, update ratio, memory, evaluation metrics, data card and samples of one or more runs. "
        "The HTML page embeds its plots and opens from disk without network.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument(
        "--out",
        default="",
        action=Once,
        hint=ONE_OUT,
        help="output file (default: report.html, or report.md with --format md)",
    )
    p.add_argument("--format", default="auto", choices=["auto", "html", "md"], help="auto = by --out suffix")
    p.add_argument("--watch", action="store_true", help="re-render while a run is going (until it ends or Ctrl-C)")
    p.add_argument("--every", type=float, default=10.0, help="seconds between renders with --watch (default: 10)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not an earlier report")

    p = sub.add_parser(
        "runs",
        help="table of the runs under a folder",
        description="Name, kind (pretrain, imported, finetune TASK ADAPT, distill TASK; ', int8' or ', int4' after "
        "it for a quantized copy), preset, status (running, finished, interrupted, failed; stopped: before training "
        "began; unknown for an imported model), steps, tokens, best validation loss, training time and last "
        "checkpoint of every run directory under DIR.",
    )
    p.add_argument(
        "dir", nargs="?", default="runs", metavar="DIR", help="folder holding run directories (default: runs)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list, an object per run: name, path, preset, status, step, max_steps, tokens, "
        "best_val_loss, elapsed_s, last_checkpoint, error (why an unreadable run could not be read), failure (a "
        "failed run: the first line of its error, or 'killed' when its process died without a word), command and "
        "cwd (env.json's: the line to re-run, and where, to resume the run), kind (the table's), loss_unit (what "
        "best_val_loss is per: nats/token; a fine-tune's task loss: nats/answer token, nats/example, DPO loss/pair; an "
        "encoder's pretraining loss: nats/masked token, plus NSP/SOP nats/pair or rtd_weight x RTD nats/token)",
    )
    add_parsers(sub)
    return parser


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
        from lmforge.estimate import estimate
        from lmforge.estimate_adapt import ADAPT_FLAGS, plan_arguments
        from lmforge.estimate_table import format_estimate

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
        hardware: str | float = args.hardware
        try:
            hardware = float(args.hardware)
        except ValueError:
            pass
        result = estimate(
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
        if note and os.environ.get("RANK", "0") == "0":  # (os.write: a print this handler cut into would raise)
            os.write(2, (note + "\n").encode())
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
