"""The `lmforge` argument parser: the command tour, every command's flags and help text, and `Parser` (argparse
with one-line errors). `cli.py` parses with `build_parser()` and dispatches; the adaptation commands' flags
(finetune, chat, serve, eval's task flags) are `cli_adapt.add_parsers` / `add_eval_task_args`.

Length (~510 lines): `build_parser` is one block per command, kept together so `--help` reads as one document.
Building it imports no torch (`lmforge --help` answers in well under a second; tests/test_cli.py checks it).
"""

from __future__ import annotations

import argparse
from typing import Any

from lmforge import __version__
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
_ONE_PRESET = "a config starts from one preset: keep one, and give the other's settings as --section.key flags"


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
    p.add_argument("--preset", action=Once, hint=_ONE_PRESET, help="named preset (see the list below)")
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
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 or -1 = off")
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
    p.add_argument(
        "--out",
        action=Once,
        hint=ONE_OUT,
        help="run directory to create (default: beside the run, its name + -int8 or -int4; a checkpoint's also "
        "names its step: runs/x -> runs/x-int8)",
    )
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
    p.add_argument("--preset", action=Once, hint=_ONE_PRESET, help="named preset (see the list below)")
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
    from lmforge.estimate_adapt import ADAPT_MODES
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
