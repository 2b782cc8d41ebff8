"""`estimate`'s arguments, checked and resolved without torch: `lmforge estimate` runs `check_estimate` before it
imports the planner (lmforge/estimate.py, which loads torch at its top: ~1.5 s), so a bad flag answers at once;
`estimate.estimate(cfg, ...)` is `estimate.plan(check_estimate(cfg, ...))`. The strategies, datasheet peaks and
interconnect presets the checks accept live here (`lmforge.estimate` re-exports them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lmforge.config import RunConfig
from lmforge.errors import ConfigError
from lmforge.estimate_adapt import check_adapt
from lmforge.models.configs import GPTConfig

DEFAULT_VOCAB = 50257  # GPT-2's BPE vocabulary, assumed when model.vocab_size is 0 and no data.dir is given
STRATEGIES = ("ddp", "fsdp", "diloco")

# Dense peak FLOP/s per GPU from NVIDIA's datasheets (sparsity doubles the tensor-core numbers; we
# never use it). A100 (SXM and PCIe alike): 312 TFLOP/s bf16/fp16 tensor core, 19.5 TFLOP/s plain
# fp32 (our loop does not enable TF32, whose tensor-core peak is 156). H100 SXM5: 989 TFLOP/s
# bf16/fp16 tensor core, 67 TFLOP/s fp32 (PCIe cards are lower: 756 / 51).
PEAK_FLOPS = {
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
}
# Link speeds per device, each way, in Gbit/s (signalling rate after line encoding), for `--interconnect`: pass
# the slowest link a device's traffic crosses (across nodes: the network, per GPU). Sources: NVIDIA H100 and
# A100 datasheets (NVLink 900 / 600 GB/s, both ways together), the PCI-SIG 4.0 spec (16 GT/s per lane,
# 128b/130b), NVIDIA ConnectX-7 / DGX H100 (one 400 Gbit/s NDR port per GPU).
INTERCONNECTS = {
    "nvlink": (3600.0, "NVLink 4 (H100 SXM): 450 GB/s each way"),
    "nvlink-a100": (2400.0, "NVLink 3 (A100 SXM): 300 GB/s each way"),
    "pcie": (252.0, "PCIe 4.0 x16: 31.5 GB/s each way"),
    "ib": (400.0, "InfiniBand NDR, one 400 Gbit/s port per GPU"),
    "ethernet": (10.0, "10 Gigabit Ethernet"),
}


@dataclasses.dataclass(frozen=True)
class EstimateArgs:
    """`estimate`'s arguments once checked (see its docstring), with what they resolve to: `model` with its
    vocabulary, the example length `seq_len`, the strategy, the interconnect `link`, the adapt mode's settings with
    finetune's defaults, and the assumptions made so far."""

    cfg: RunConfig
    model: GPTConfig
    tokens: int
    seq_len: int
    hardware: str | float
    mfu: float
    world_size: int
    strategy: str
    price_per_hour: float | None
    link: dict[str, Any] | None
    adapt: str
    lora_rank: int | None
    lora_targets: tuple[str, ...] | None
    lora_dropout: float
    prompt_tokens: int | None
    labels: int
    teacher: GPTConfig | None
    assumptions: list[str]


def check_estimate(
    cfg: RunConfig,
    *,
    tokens: int,
    hardware: str | float = "cpu",
    mfu: float = 0.0,
    world_size: int = 1,
    strategy: str | None = None,
    price_per_hour: float | None = None,
    interconnect: str | float | None = None,
    adapt: str = "full",
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] | None = None,
    lora_dropout: float | None = None,
    prompt_tokens: int | None = None,
    labels: int = 0,
    teacher: GPTConfig | None = None,
) -> EstimateArgs:
    """`estimate`'s arguments (see `estimate.estimate`) checked, one-line `ConfigError`s, and resolved; torch-free."""
    if not (isinstance(tokens, (int, float)) and math.isfinite(tokens)):  # (inf: "must be >= 1" misled)
        raise ConfigError(
            f"tokens must be a finite number, got {tokens!r}; pass the number of training tokens (e.g. --tokens 1e9)"
        )
    if tokens < 1:  # 0.5 would become 0
        raise ConfigError(
            f"tokens must be >= 1, got {tokens!r}; pass the number of training tokens (e.g. --tokens 1e9)"
        )
    strategy = cfg.dist.strategy if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; use one of: {', '.join(STRATEGIES)}")
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ConfigError(
            f"world_size must be an integer >= 1, got {world_size!r}; pass the devices that train together "
            "(--world-size 8)"
        )
    if not (0.0 <= mfu <= 1.0):
        raise ConfigError(f"mfu must be in (0, 1] (a fraction, e.g. 0.4), got {mfu}; 0 = the default")
    if price_per_hour is not None and not (math.isfinite(price_per_hour) and price_per_hour >= 0):  # inf: "$inf"
        raise ConfigError(f"price_per_hour must be >= 0 and finite (USD per device-hour), got {price_per_hour}")
    link = None if interconnect is None else resolve_interconnect(interconnect)

    lora_rank, lora_targets, prompt_tokens, lora_dropout = check_adapt(
        adapt, world_size=world_size, lora_rank=lora_rank, lora_targets=lora_targets, prompt_tokens=prompt_tokens,
        labels=labels, lora_dropout=lora_dropout,
    )  # fmt: skip

    if teacher is not None and (adapt != "full" or labels or world_size > 1):
        raise ConfigError(
            "a distillation fine-tune trains every weight of the student, on an LM task, in one process: drop "
            "--adapt, --labels and --world-size to plan it"
        )
    assumptions = []
    model = cfg.model
    if model.family != "gpt":  # the formulas below are the decoder Transformer's (models/gpt.py)
        raise ConfigError(
            f"estimate covers GPT/Llama-style models only; model.family is {model.family!r} "
            "(a short 'lmforge pretrain' run reports its parameters and tokens/s)"
        )
    if model.vocab_size == 0 and cfg.data.dir:  # as pretrain sets it (train/run.py resolve_run_config)
        from lmforge.data.datadir import load_data_dir

        vocab = load_data_dir(cfg.data.dir).load_tokenizer().vocab_size
        model = dataclasses.replace(model, vocab_size=vocab)
        assumptions.append(f"model.vocab_size {vocab} from the tokenizer of {cfg.data.dir} (as pretrain sets it)")
    elif model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=DEFAULT_VOCAB)
        assumptions.append(
            f"model.vocab_size is 0 (training takes it from the tokenizer); assumed {DEFAULT_VOCAB} (GPT-2); "
            "pass --data.dir DATA_DIR or set --model.vocab_size for your tokenizer"
        )
    # a soft prompt takes the first positions of the context; the text gets the rest (finetune.py: max_len)
    context = model.max_seq_len - (prompt_tokens if adapt == "prompt" else 0)
    if context < 8:  # (finetune refuses it the same way)
        raise ConfigError(
            f"--prompt-tokens {prompt_tokens} leaves {context} of the model's {model.max_seq_len} context tokens for "
            f"the text (8 at least); use --prompt-tokens {model.max_seq_len - 8} or fewer"
        )
    seq_len = cfg.data.seq_len or context
    if seq_len > context:
        raise ConfigError(
            f"data.seq_len {seq_len} exceeds model.max_seq_len {model.max_seq_len}"
            + (f" less the {prompt_tokens} soft-prompt tokens" if adapt == "prompt" else "")
            + "; lower it"
        )
    device, _ = hardware_device(hardware, cfg.train.device)
    if device != "measure":  # (its device and dtype are checked as it measures: `estimate.resolve_hardware`)
        resolve_dtype(cfg.train.dtype, device)
    if teacher is not None:
        if teacher.vocab_size == 0:  # (a preset's: the student's tokenizer, which a teacher must share)
            teacher = dataclasses.replace(teacher, vocab_size=model.vocab_size)
        if teacher.max_seq_len < seq_len:  # (finetune refuses it: adapt/load.load_teacher)
            raise ConfigError(
                f"the teacher's context of {teacher.max_seq_len} tokens is shorter than the {seq_len}-token examples; "
                f"use a teacher with a context of at least {seq_len}, or pass --data.seq_len {teacher.max_seq_len}"
            )
    return EstimateArgs(
        cfg=cfg, model=model, tokens=int(tokens), seq_len=seq_len, hardware=hardware, mfu=mfu, world_size=world_size,
        strategy=strategy, price_per_hour=price_per_hour, link=link, adapt=adapt, lora_rank=lora_rank,
        lora_targets=lora_targets, lora_dropout=lora_dropout, prompt_tokens=prompt_tokens, labels=labels,
        teacher=teacher, assumptions=assumptions,
    )  # fmt: skip


def hardware_device(hardware: str | float, train_device: str) -> tuple[str, float | None]:
    """(the device `hardware` plans on: "cpu", "cuda", or "measure" (torch picks it from `train_device`), and a
    peak given in GFLOP/s, None for a name); an unknown name or a peak that is not a positive number is refused."""
    key = hardware.strip().lower() if isinstance(hardware, str) else hardware
    if key in ("cpu", "measure"):
        return key, None
    if key in PEAK_FLOPS:
        return "cuda", None
    try:
        gflops = float(key)
    except (TypeError, ValueError):
        raise ConfigError(
            f"unknown hardware {hardware!r}; use cpu, measure, a100, h100 or a peak in GFLOP/s (e.g. 150)"
        ) from None
    if not math.isfinite(gflops) or gflops <= 0:
        raise ConfigError(f"hardware peak must be a positive number of GFLOP/s, got {hardware!r}")
    # a bare number says nothing of the device, and the device sets the dtype and the default MFU (0.4 on a
    # GPU, 0.45 or less on a CPU): train.device decides, and the name says which it was taken for
    return ("cpu" if train_device == "cpu" else "cuda"), gflops


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":  # as `train.precision.pick_precision`: bf16 on (capable) GPUs, fp32 on CPU
        return "bfloat16" if device == "cuda" else "float32"
    if name == "float16" and device == "cpu":
        raise ConfigError(
            "float16 autocast is not supported for training on CPU; use --train.dtype bfloat16 or float32"
        )
    return name


def resolve_interconnect(interconnect: str | float) -> dict[str, Any]:
    """`--interconnect`: a name in `INTERCONNECTS` or a link speed in Gbit/s -> name, gbps (each way), source."""
    key = interconnect.strip().lower() if isinstance(interconnect, str) else interconnect
    if key in INTERCONNECTS:
        gbps, source = INTERCONNECTS[key]
        return {"name": key, "gbps": gbps, "source": source}
    try:
        gbps = float(key)
    except (TypeError, ValueError):
        raise ConfigError(
            f"unknown interconnect {interconnect!r}; use {', '.join(INTERCONNECTS)} or a link speed in Gbit/s "
            "each way per device (e.g. 100)"
        ) from None
    if not math.isfinite(gbps) or gbps <= 0:
        raise ConfigError(
            f"interconnect speed must be a positive number of Gbit/s, got {interconnect!r}; pass e.g. --interconnect "
            f"100, or one of {', '.join(INTERCONNECTS)}"
        )
    return {"name": f"{gbps:g} Gbit/s", "gbps": gbps, "source": "given by the user"}
