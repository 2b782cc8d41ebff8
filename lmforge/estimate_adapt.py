"""Compute planning for fine-tuning a frozen base (`lmforge finetune --adapt lora|head|prompt`): what trains, the
FLOPs and the memory of a step, and the settings `lmforge estimate` plans a fine-tune with.

`estimate.estimate(cfg, adapt=...)` plans pretraining and full fine-tuning itself (every weight trains) and asks this
module for the rest: `check_adapt` validates the mode's settings (finetune's defaults when not given), `adapted_plan`
gives the trainable parameters, FLOPs per token, memory per component and the assumption line. Every count reuses
the full-training terms of `lmforge.estimate_memory` (its docstring derives them) with the frozen base's changes: one
process, the base in fp32 as finetune loads it, gradients and optimizer state for the trained parameters only, and
the activations autograd really keeps when most weights need no gradient (checked tensor by tensor and against the
allocator's peak in tests/test_estimate.py). `plan_arguments` reads a fine-tuned run's finetune.json, so
`estimate --config FINETUNE_RUN` plans that fine-tune and not its base's pretraining.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lmforge.config import OptimConfig
from lmforge.errors import ConfigError
from lmforge.estimate_memory import (
    DTYPE_BYTES,
    StepShape,
    activation_bytes,
    attention_flops_per_token,
    largest_param,
    memory_bytes,
    param_counts,
    rope_buffer_bytes,
    rope_table_bytes,
    with_totals,
)
from lmforge.models.configs import GPTConfig

# `--adapt`: what trains. full: every weight (pretraining, full or distillation fine-tuning); the others are
# `lmforge finetune`'s modes on a frozen base (adapt/heads.py set_trainable), as the table names them
ADAPT_NAMES = {"full": "full", "lora": "LoRA", "head": "head only", "prompt": "prompt tuning"}
ADAPT_MODES = tuple(ADAPT_NAMES)

LORA_TARGETS = ("qkv", "attn.proj", "mlp.fc", "mlp.proj")  # the GPT Linears `--lora-targets` names


def frozen_base_memory(
    full: dict[str, int], optim: OptimConfig, *, trainable: int, activations: int, autocast_copies: int | None = None
) -> dict[str, int]:
    """`memory_bytes` of a step that trains `trainable` new parameters on a frozen base (`full`: the base's
    `memory_bytes`): the base's fp32 weights plus the trainable ones; gradients, optimizer state and the log step's
    update-ratio copy of the trainable ones only; `activations` (the mode's own count) and, by default, the
    autocast copies of full training (a frozen matmul weight's cast copy is kept for the input's gradient)."""
    state_floats = (
        trainable if optim.name == "sgd" and optim.momentum > 0 else 0 if optim.name == "sgd" else 2 * trainable
    )
    out = dict(full)
    out.update(
        weights=full["weights"] + 4 * trainable,
        gradients=4 * trainable,
        optimizer=4 * state_floats,
        activations=activations,
        activations_checkpointed=min(full["activations_checkpointed"], activations),
        update_copy=4 * trainable,
    )
    if autocast_copies is not None:
        out["autocast_copies"] = autocast_copies
    return with_totals(out)


def _norm_bytes(model: GPTConfig, *, trains: bool, input_grad: bool = True) -> int:
    """Bytes per token a norm keeps for backward, as `activation_bytes` counts one: LayerNorm (one ATen op) its fp32
    input, mean and rstd whatever needs a gradient; RMSNorm (composite) its input and rsqrt when its input needs a
    gradient, and its normalized input when its weight `trains`."""
    if model.norm == "layernorm":
        return 4 * model.d_model + 8
    return (4 * model.d_model + 4 if input_grad else 0) + (4 * model.d_model if trains else 0)


def _linear_shapes(model: GPTConfig) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each Linear `--lora-targets` names, in the order a block's forward runs them."""
    q, qkv_out = model.n_head * model.head_dim, (model.n_head + 2 * model.kv_heads) * model.head_dim
    fc_out = (2 if model.mlp == "swiglu" else 1) * model.ff_dim
    return {"qkv": (model.d_model, qkv_out), "attn.proj": (q, model.d_model),
            "mlp.fc": (model.d_model, fc_out), "mlp.proj": (model.ff_dim, model.d_model)}  # fmt: skip


def lora_param_count(model: GPTConfig, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter parameters: r x (d_in + d_out) for each targeted Linear of each block (A: r x d_in, B: d_out x r)."""
    shapes = _linear_shapes(model)
    return model.n_layer * sum(rank * sum(shapes[t]) for t in targets)


def _lora_no_input_grad(model: GPTConfig, rank: int, targets: tuple[str, ...]) -> int:
    """Weights (frozen and adapters' A) whose input needs no gradient in a LoRA step: the first block's Linears up to
    and including its first adapted one, and that adapter's A (their inputs come from the frozen embedding)."""
    shapes = _linear_shapes(model)
    first = min(list(shapes).index(t) for t in targets)
    return sum(i * o for i, o in list(shapes.values())[: first + 1]) + rank * list(shapes.values())[first][0]


def lora_dropout_bytes(model: GPTConfig, step: StepShape, *, targets: tuple[str, ...], dropout: float) -> int:
    """What `--lora-dropout` > 0 adds to a LoRA step's kept tensors (adapt/lora.py: `lora_dropout(x) @ A^T`), per
    adapted Linear of each block: the dropout's mask where its input needs a gradient (CPU: the noise, in the input's
    dtype; CUDA: 1 B), which is everywhere but in the first block's first adapter (its input comes from the frozen
    embedding); A keeps the dropout's output instead of x, the same size, so that adds nothing, except for attn.proj,
    whose input SDPA keeps too (where SDPA keeps anything: not in the first block when attn.proj is the first
    adapter). The inputs of qkv and mlp.fc are norm outputs (fp32 under autocast too), of attn.proj and mlp.proj
    the autocast dtype. Exact against saved-tensor hooks in tests/test_estimate.py (they were left out: -12% of
    the tensors a 3-layer step on every Linear keeps, fp32)."""
    if dropout <= 0:
        return 0
    e, cpu = DTYPE_BYTES[step.dtype], step.device == "cpu"
    q, ff = model.n_head * model.head_dim, model.ff_dim
    inputs = {"qkv": (model.d_model, 4), "attn.proj": (q, e), "mlp.fc": (model.d_model, 4), "mlp.proj": (ff, e)}
    order = list(_linear_shapes(model))
    first = min(order.index(t) for t in targets)
    per_token = 0
    for t in targets:
        width, x_bytes = inputs[t]
        kept = width * ((x_bytes if cpu else 1) + (e if t == "attn.proj" else 0))  # mask (+ the output's copy)
        per_token += (model.n_layer - (order.index(t) == first)) * kept
    return per_token * step.seq_len * step.micro_batch


def lora_flops_per_token(
    model: GPTConfig, rank: int, targets: tuple[str, ...], seq_len: int, labels: int = 0
) -> tuple[float, float]:
    """Training FLOPs per token of a LoRA step and their attention part: (flops, attention). With `labels` (finetune
    --task classify) a classification head on the last token's state replaces the vocabulary matmul: it runs once per
    sequence, forward, weight and input gradients (6 x d_model x labels).

    Forward: 2 N (every matmul, the output head's included) + 2 x the adapters (x @ A^T, then @ B^T). Backward, with
    no weight gradient of the frozen base: each adapter's two weight gradients and the gradient of its r-wide middle
    (4 x its parameters, less A's 2 r d_in: r d_out twice, r d_in once), and the input gradients (2 d_in d_out of each
    Linear, the output head's too, 2 r d_in of each adapter's A, attention's backward: 8 of PaLM's 12) wherever a
    gradient is needed upstream, which is everywhere after the first adapter: not in the first block up to and
    including its first adapted Linear (its input comes from the frozen embedding), nor in the first block's
    attention when qkv has no adapter. So 4 N + 6 x the adapters + attention, less those. The old count, 4 N + 6 x the
    adapters, was 2-16% over torch's FlopCounterMode (qkv, attn.proj: +3.5%; mlp.proj alone: +16%); this one equals
    it (tests/test_estimate.py), attention included under SDPA's math path.
    """
    attention = attention_flops_per_token(model, seq_len)
    if "qkv" not in targets:  # the first block's attention runs forward only (4 of its 12 d_model x seq_len)
        attention -= 8.0 * model.d_model * seq_len
    flops = 4.0 * param_counts(model)["matmul"] + 6.0 * lora_param_count(model, rank, targets)
    flops -= 2.0 * _lora_no_input_grad(model, rank, targets)
    if labels:
        flops += 6.0 * model.d_model * labels / seq_len - 4.0 * model.vocab_size * model.d_model
    return flops + attention, attention


def lora_activation_bytes(
    model: GPTConfig, step: StepShape, *, rank: int, targets: tuple[str, ...], labels: int = 0, dropout: float = 0.0
) -> dict[str, int]:
    """Activation memory of a LoRA fine-tuning step (`rank` adapters on `targets`; a classification head on the last
    token's state when `labels` > 0), by part.

    Autograd keeps no input of a frozen Linear (nothing needs its weight gradient), and nothing below the first
    adapter needs a gradient at all, so against full training (`activation_bytes`) a step keeps (kept), per token:
    in each block, without the input of every Linear without an adapter (qkv, mlp.fc: d_model; mlp.proj: d_ff; not
    attn.proj's, which SDPA keeps for its own backward) but with each adapter's r-wide x @ A^T; once, without the
    first block's first norm, the token ids and the head's input; under RMSNorm, without each other norm's
    normalized input (kept only for its weight's gradient); with rotary positions, the tables q and k are multiplied
    by (one fp32 pair, or each layer's cast copy). With `labels`, the pooled states and scores instead of the
    vocabulary log-probs; with `dropout` on the adapters' input, `lora_dropout_bytes`. When qkv has no adapter,
    the first block's attention is not kept either, which this leaves in: then it is an upper bound. Counted tensor
    by tensor with saved-tensor hooks in tests/test_estimate.py: exact for LayerNorm and RMSNorm, GELU and SwiGLU,
    learned and rotary positions, fp32 and bf16, every target set, with and without dropout.

    Full training's total adds every gradient to every activation, which covers backward's working set; here the
    gradients are tiny, so that set shows. Backward's peak (total) is the larger of everything kept + the loss's two
    logits-sized gradients (loss_backward, LM), and, once the loss and the final norm have freed theirs (tail), the
    last block's MLP (working): the residual's gradient and two (GELU: the activation's output and input) or three
    (SwiGLU) d_ff-sized gradients, as for prompt tuning. (Counting one or two d_ff-sized ones on top of the tail was
    -3.5% of the allocator's peak at 3 layers, 8 x 64 tokens, d_model 64, vocab 64, and -5.6% with a classification
    head.)
    """
    act = activation_bytes(model, step)
    seq_len, micro_batch = step.seq_len, step.micro_batch
    e, h, tokens = DTYPE_BYTES[step.dtype], model.d_model, seq_len * micro_batch
    widths = {"qkv": h, "attn.proj": 0, "mlp.fc": h, "mlp.proj": model.ff_dim}  # (SDPA keeps proj's input)
    per_layer = sum(e * w for t, w in widths.items() if t not in targets) - e * rank * len(targets)
    norm = _norm_bytes(model, trains=True)
    mask = (e if step.device == "cpu" else 1) if model.dropout > 0 else 0
    once = norm + 8 + e * h + mask * h  # first norm, token ids, head input, embedding dropout mask
    if model.norm == "rmsnorm":  # its normalized input is kept for the weight's gradient only (the other norms)
        once += 2 * model.n_layer * 4 * h
    kept = act["layers"] + act["head"] - tokens * (model.n_layer * per_layer + once)
    kept += lora_dropout_bytes(model, step, targets=targets, dropout=dropout)
    tail = tokens * (_norm_bytes(model, trains=False) + 4 * model.vocab_size + 8)  # final norm, log-probs, targets
    loss_backward = act["loss_backward"]
    if labels:  # a classification head on the last token: no vocabulary logits, their log-probs or gradients
        rows = micro_batch * (e * h + 4 * labels + 16) - tokens * (4 * model.vocab_size + 8)  # pooled, scores, labels
        kept, tail, loss_backward = kept + rows, tail + rows, 0
    working = tokens * (4 * h + e * (3 if model.mlp == "swiglu" else 2) * model.ff_dim)
    total = max(kept + loss_backward, kept - tail + working)
    return {"kept": kept, "tail": tail, "loss_backward": loss_backward, "working": working, "total": total}


def lora_memory_bytes(
    model: GPTConfig,
    optim: OptimConfig,
    step: StepShape,
    *,
    rank: int,
    targets: tuple[str, ...],
    labels: int = 0,
    dropout: float = 0.0,
) -> dict[str, int]:
    """`memory_bytes` of a LoRA fine-tuning step: the frozen base's fp32 weights (finetune loads the base in
    float32), gradients, optimizer state and the update-ratio copy for the adapters alone (and, with `labels`, the
    classification head finetune trains with them), and the activations of `lora_activation_bytes`. Under autocast a
    matmul's cast weight is kept for its input's gradient: every frozen one's and every adapter's but those whose
    input needs none (counting full training's, every frozen one, was 7 kB over the saved tensors' 1 MB)."""
    full = memory_bytes(model, optim, step)
    act = lora_activation_bytes(model, step, rank=rank, targets=targets, labels=labels, dropout=dropout)
    trainable = lora_param_count(model, rank, targets)
    e = DTYPE_BYTES[step.dtype]
    copies = (
        0 if e == 4 else e * (param_counts(model)["matmul"] + trainable - _lora_no_input_grad(model, rank, targets))
    )
    if labels:  # the classification head's cast weight instead of the output head's
        trainable += head_param_count(model, labels)
        copies += e * model.d_model * (labels - model.vocab_size) if copies else 0
    return frozen_base_memory(full, optim, trainable=trainable, activations=act["total"], autocast_copies=copies)


def full_classify_memory_bytes(model: GPTConfig, optim: OptimConfig, step: StepShape, *, labels: int) -> dict[str, int]:
    """`memory_bytes` of a full classification fine-tune (`finetune --task classify --adapt full`): every weight of
    the body trains and a new head (d_model x `labels`, no bias) reads the last token's state, so no vocabulary
    logits, log-probs or their gradients. An untied lm_head stays a parameter (it requires a gradient, so the log
    step copies it) but the forward never uses it: no gradient, no optimizer state; a tied one is the input table
    and trains. Activations (checked tensor by tensor with saved-tensor hooks in tests/test_estimate.py): full
    training's blocks, the final norm and token ids over every token, the rotary tables (as for LoRA), and per
    sequence the pooled state, scores and label. The log step holds, besides the gradients, a copy of every
    parameter that requires a gradient and one weight's update (p - copy) at a time: without that one, -4.6% of
    the allocator's peak (tiny Llama)."""
    full = memory_bytes(model, optim, step)
    act = activation_bytes(model, step)
    seq_len, micro_batch = step.seq_len, step.micro_batch
    counts, e, h = param_counts(model), DTYPE_BYTES[step.dtype], model.d_model
    unused = 0 if model.tie_embeddings else model.vocab_size * h  # the untied lm_head: no gradient ever
    head = head_param_count(model, labels)
    trained = counts["total"] - unused + head
    state_floats = trained if optim.name == "sgd" and optim.momentum > 0 else 0 if optim.name == "sgd" else 2 * trained
    tail = seq_len * micro_batch * (_norm_bytes(model, trains=True) + 8) + micro_batch * (e * h + 4 * labels + 16)
    # the log step's copy of every parameter that requires a gradient, and one weight's update (p - copy) at a time
    out = dict(full)
    out.update(
        weights=full["weights"] + 4 * head,
        gradients=4 * trained,
        optimizer=4 * state_floats,
        autocast_copies=0 if e == 4 else e * (counts["matmul"] - model.vocab_size * h + head),
        activations=act["layers"] + tail,
        activations_checkpointed=act["block_inputs"] + act["per_layer"] + tail,
        update_copy=4 * (counts["total"] + head + largest_param(model)),
    )
    return with_totals(out)


def head_param_count(model: GPTConfig, labels: int) -> int:
    """What `finetune --adapt head` trains (adapt/heads.py `set_trainable`): a new classification head (a Linear
    d_model -> labels without bias, as HF's `score`) when `labels` > 0; on an LM task the final norm and an untied
    output head (a tied one is the input table too, and stays frozen)."""
    if labels:
        return model.d_model * labels
    norm = model.d_model * (2 if model.norm == "layernorm" and model.bias else 1)
    return norm + (0 if model.tie_embeddings else model.vocab_size * model.d_model)


def head_activation_bytes(model: GPTConfig, step: StepShape, *, labels: int) -> dict[str, int]:
    """Activation memory of a head-only fine-tuning step (`finetune --adapt head`; see `head_param_count`), by part.

    Nothing before the head needs a gradient, so autograd records nothing in the body: its activations are freed
    as the forward goes, and what a step holds at once is the larger of
    - working: the forward's working set, in a block's MLP (measured with torch.profiler: the peak is at its
      activation function): the block's input, the attention output, the new residual and the norm's output (fp32
      residual-sized; the attention output in the autocast dtype), the fc output and the activation's (GELU:
      2 x d_ff values; SwiGLU: [gate; up], silu(gate) and the product, 4 x d_ff), and the rotary tables;
    - tail: what the loss keeps and needs at the start of backward: on an LM task the final norm's input and
      statistics, an untied head's input, the fp32 log-probs and targets, and the loss's two logits-sized
      gradients (as in full training); for classification the pooled last-token states and the label scores.
    """
    seq_len, micro_batch = step.seq_len, step.micro_batch
    e, r, h, tokens = DTYPE_BYTES[step.dtype], 4, model.d_model, seq_len * micro_batch
    working = tokens * (3 * r * h + e * h + e * (4 if model.mlp == "swiglu" else 2) * model.ff_dim)
    working += rope_table_bytes(model, seq_len)  # (alive through the forward)
    if labels:
        tail = micro_batch * (e * h + 4 * labels + 16)  # pooled states, scores, labels
    else:
        head_input = 0 if model.tie_embeddings else e * h  # (a frozen tied head keeps no input)
        # the final norm (it trains), the head's input, fp32 log-probs + int64 targets, the loss's two gradients
        norm = _norm_bytes(model, trains=True, input_grad=False)  # the final norm trains; the body needs no gradient
        tail = tokens * (norm + head_input + 12 * model.vocab_size + 8)
    return {"working": working, "tail": tail, "total": max(working, tail)}


def head_memory_bytes(model: GPTConfig, optim: OptimConfig, step: StepShape, *, labels: int) -> dict[str, int]:
    """`memory_bytes` of a head-only fine-tuning step: the activations of `head_activation_bytes`; under autocast
    the body's matmul weights are cast for each use and freed (no graph keeps them); only an LM task's output head
    keeps its cast copy (tied or not: the final norm's gradient needs it)."""
    full = memory_bytes(model, optim, step)
    act = head_activation_bytes(model, step, labels=labels)
    # (a classification head's input needs no gradient: its cast weight is not kept)
    e = DTYPE_BYTES[step.dtype]
    copies = 0 if e == 4 or labels else e * model.d_model * model.vocab_size
    trainable = head_param_count(model, labels)
    return frozen_base_memory(full, optim, trainable=trainable, activations=act["total"], autocast_copies=copies)


def prompt_activation_bytes(model: GPTConfig, step: StepShape, *, prompt_tokens: int, labels: int) -> dict[str, int]:
    """Activation memory of a prompt-tuning step (`finetune --adapt prompt`: `prompt_tokens` trainable vectors in
    front of each `seq_len`-token text, and a classification head when `labels` > 0), by part.

    The prompt is the body's first input, so backward runs through every block to it and autograd keeps what it
    needs for the inputs' gradients, over prompt + text positions:
    - layers: full training's (activation_bytes) without the input of every frozen Linear (qkv's, the MLP's fc and
      proj: nothing needs their weights' gradients) and RMSNorm's normalized inputs (kept for its weight's gradient
      only); the frozen table keeps no token ids;
    - tail: the final norm's input and statistics over all positions; on an LM task the fp32 log-probs and targets
      of the text positions (the frozen head keeps no input); for classification the pooled states and scores.
    Counted tensor by tensor with saved-tensor hooks in tests/test_estimate.py. Backward's peak (measured with
    torch.profiler) is the larger of the loss's two logits-sized gradients (loss_backward, LM) on top of all that,
    and, once the loss and the final norm have freed theirs, the last block's MLP (working): the residual's gradient
    and two (GELU: the activation's output and input) or three (SwiGLU) d_ff-sized gradients.
    """
    seq_len, micro_batch = step.seq_len, step.micro_batch
    positions = seq_len + prompt_tokens
    act = activation_bytes(model, dataclasses.replace(step, seq_len=positions))
    e, h, tokens, text = DTYPE_BYTES[step.dtype], model.d_model, positions * micro_batch, seq_len * micro_batch
    frozen_inputs = e * (2 * h + model.ff_dim) + (2 * 4 * h if model.norm == "rmsnorm" else 0)
    layers = act["layers"] - model.n_layer * tokens * frozen_inputs
    tail = tokens * _norm_bytes(model, trains=False)
    if labels:
        tail += micro_batch * (e * h + 4 * labels + 16)  # pooled states, scores, labels
        loss_backward = 0
    else:
        tail += text * (4 * model.vocab_size + 8)  # fp32 log-probs, int64 targets
        loss_backward = text * 8 * model.vocab_size
    working = tokens * (4 * h + e * (3 if model.mlp == "swiglu" else 2) * model.ff_dim)
    total = max(layers + tail + loss_backward, layers + working)
    return {"layers": layers, "tail": tail, "loss_backward": loss_backward, "working": working, "total": total}


def prompt_memory_bytes(
    model: GPTConfig, optim: OptimConfig, step: StepShape, *, prompt_tokens: int, labels: int
) -> dict[str, int]:
    """`memory_bytes` of a prompt-tuning step: the activations of `prompt_activation_bytes`, the soft prompt (and a
    classification head) trained; the frozen weights' autocast copies as in full training (each is kept for its
    input's gradient), but for the output head's when a classification head replaces it."""
    act = prompt_activation_bytes(model, step, prompt_tokens=prompt_tokens, labels=labels)
    full = memory_bytes(model, optim, dataclasses.replace(step, seq_len=step.seq_len + prompt_tokens))
    trainable = prompt_tokens * model.d_model + (head_param_count(model, labels) if labels else 0)
    copies = full["autocast_copies"]
    if labels and copies:
        copies += DTYPE_BYTES[step.dtype] * model.d_model * (labels - model.vocab_size)
    return frozen_base_memory(full, optim, trainable=trainable, activations=act["total"], autocast_copies=copies)


# the flags of `lmforge estimate` that `plan_arguments` takes
ADAPT_FLAGS = ("adapt", "lora_rank", "lora_targets", "lora_dropout", "prompt_tokens", "labels", "teacher")
ESTIMATE_TRAIN_KEYS = ("batch_size", "micro_batch_size", "device", "dtype", "activation_checkpointing")


# The logits-sized fp32 tensors a distillation step holds at its loss beyond plain next-token training's (whose
# log-probs and two logits gradients `activation_bytes` counts): the teacher's logits, their copy at the predicted
# rows, its tempered log-softmax and the softmax (exp) kept for backward, the student's tempered log-probs (kept for
# backward) and the tempered logits they come from (compress/distill.distill_loss). Measured: 5.3-5.8 of them over
# the plain plan (tests/test_estimate.py).
SOFT_TARGET_COPIES = 6


def read_teacher(teacher: str | Path, *, flag: bool = False) -> GPTConfig:
    """The model config of a distillation teacher as finetune.json records it, or as `estimate --teacher` (`flag`)
    names it: a run or checkpoint folder, an HF directory, hf:ORG/NAME from the hub cache, or (the flag only) a
    preset name, whose vocabulary, when it has none, is the student's (a teacher shares its tokenizer); a one-line
    ConfigError when it cannot be read or is not a GPT/Llama-style model (the formulas here are the decoder
    Transformer's)."""
    from lmforge.presets import PRESETS

    if flag and str(teacher) in PRESETS and not Path(teacher).exists():
        from lmforge.config import load_config

        model = load_config(preset=str(teacher)).model
        if not isinstance(model, GPTConfig) or model.family != "gpt":
            raise ConfigError(
                f"--teacher {teacher} is a {model.family} preset; estimate plans GPT/Llama-style teachers only"
            )
        return model
    from lmforge.adapt.load import is_hf_dir
    from lmforge.checkpoint import read_json, resolve_checkpoint
    from lmforge.config import config_from_json
    from lmforge.errors import LmforgeError
    from lmforge.export.hub import is_hub_spec, local_model_dir

    try:
        path = local_model_dir(teacher) if is_hub_spec(teacher) else Path(teacher)
        if is_hf_dir(path):
            from lmforge.export.hf_families import FAMILIES

            hf = read_json(path / "config.json", "pass --config a run to plan instead")
            if not isinstance(hf, dict) or hf.get("model_type") not in FAMILIES:
                raise ConfigError(f"model_type {hf.get('model_type') if isinstance(hf, dict) else None!r}")
            return FAMILIES[hf["model_type"]].config_from_hf(hf, path / "config.json")
        ckpt = resolve_checkpoint(path)
        model = config_from_json(read_json(ckpt / "state.json", "")["config"], where=str(ckpt)).model
    except (LmforgeError, KeyError, TypeError) as e:
        raise ConfigError(
            f"cannot read the distillation teacher {teacher} ({e}); "
            + (
                "pass --teacher a run or checkpoint folder, an HF model directory, hf:ORG/NAME or a preset name"
                if flag
                else "planning this run needs the teacher its finetune.json names: put it back there"
            )
        ) from None
    if not isinstance(model, GPTConfig) or model.family != "gpt":
        raise ConfigError(f"the distillation teacher {teacher} is not a GPT/Llama-style model; estimate cannot plan it")
    return model


def check_teacher_run_tokenizer(teacher: str | Path, config_file: str | Path | None) -> None:
    """`estimate --teacher TEACHER --config STUDENT_RUN` (its folder or config.json): refused in one line when their
    tokenizers differ, as `finetune --adapt distill` refuses it (`adapt.load.check_teacher_tokenizer`); a plan of a
    319-id teacher for a 2,948-id student was printed. The teacher is an lmforge run or checkpoint, or an HF
    directory (or hf:ORG/NAME in the hub cache), whose tokenizer is read from its files as finetune's import reads
    it (`hf_import.read_hf_tokenizer`, without importing the weights). Not checked: a preset's vocabulary is the
    student's, and a TOML student has no tokenizer."""
    from lmforge.adapt.load import check_teacher_tokenizer, is_hf_dir
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.errors import LmforgeError
    from lmforge.export.hub import local_model_dir
    from lmforge.tokenizer.tokenizer import Tokenizer
    from lmforge.trained import tokenizer_file

    path = Path(config_file).expanduser() if config_file else None
    student = None if path is None else path if path.is_dir() else path.parent if path.name == "config.json" else None
    if student is None:
        return
    own = student / "tokenizer.json"  # a run's (pretrained, fine-tuned), else a checkpoint folder's or its run's
    student_file = own if own.is_file() else tokenizer_file(student) if (student / "state.json").is_file() else None
    if student_file is None or not student_file.is_file():
        return
    try:  # (read_teacher has read it: a run, a checkpoint folder, or an HF directory, which has no state.json)
        where = local_model_dir(teacher)  # (an hf: name: read_teacher found its snapshot in the cache)
        if is_hf_dir(where):
            from lmforge.export.hf_import import read_hf_tokenizer

            teacher_tokenizer = read_hf_tokenizer(where)[0]
        else:
            teacher_file = tokenizer_file(resolve_checkpoint(where))
            if not teacher_file.is_file():
                return
            teacher_tokenizer = Tokenizer.load(teacher_file)
    except LmforgeError:  # (no tokenizer files: finetune's import says so)
        return
    check_teacher_tokenizer(teacher, teacher_tokenizer, Tokenizer.load(student_file))


def teacher_plan(teacher: GPTConfig, student: GPTConfig, step: StepShape) -> dict[str, Any]:
    """What a frozen distillation teacher adds to a full fine-tune's step (compress/distill.py): its forward, 2 N of
    its matmul weights + its attention's forward per token (no backward: it runs under no_grad), its weights (fp32, as
    finetune loads it, with its rotary buffers) and the soft targets' logits-sized tensors (`SOFT_TARGET_COPIES`).
    The teacher runs inside the student's autocast (train/loop.py), so its logits are in `step.dtype` (the other
    copies are fp32: distill_loss casts them), and its cast weights are freed after each use (no graph keeps them).
    Planned all in fp32, a bf16 distillation step was over the allocator's peak by 9-13% on three tiny CPU steps.
    Returns flops_per_token, attention (its attention-score part), memory (teacher_weights, soft_targets), params
    and the assumption line."""
    counts = param_counts(teacher)
    seq_len, micro_batch = step.seq_len, step.micro_batch
    attention = attention_flops_per_token(teacher, seq_len) / 3  # (its forward: 4 of 12)
    vocab = max(teacher.vocab_size, student.vocab_size)
    e = DTYPE_BYTES[step.dtype]  # the teacher's logits: the autocast dtype; the other copies fp32
    soft = ((SOFT_TARGET_COPIES - 1) * 4 + e) * vocab * seq_len * micro_batch
    return {
        "flops_per_token": 2.0 * counts["matmul"] + attention,
        "attention": attention,
        "memory": {"teacher_weights": 4 * counts["total"] + rope_buffer_bytes(teacher), "soft_targets": soft},
        "params": counts["total"],
        "assumption": (
            f"distillation: a frozen teacher ({counts['total']:,} parameters, {teacher.n_layer} layers, d_model "
            f"{teacher.d_model}) with fp32 weights as finetune loads it, no gradients or optimizer state, running in "
            f"the student's {step.dtype}; its forward adds 2N + attention per token; the soft targets hold "
            f"{SOFT_TARGET_COPIES} logits-sized tensors (the teacher's logits in {step.dtype}; fp32: their copy, "
            "log-softmax and softmax, the student's tempered logits and log-probs) at the loss"
        ),
    }


def finetune_defaults() -> Any:
    """`lmforge finetune`'s own defaults (FinetuneConfig), which the adapt modes' flags take (imported here, not at
    the top: the fine-tuning module imports the training code, which imports this one)."""
    from lmforge.finetune_config import FinetuneConfig

    return FinetuneConfig()


def _trained_with(train: dict[str, Any], optim: dict[str, Any]) -> dict[str, Any]:
    """The settings a fine-tune's train and optim sections give the estimate: what it reads (the schedule's keys would
    be refused as unused by another schedule)."""
    return {
        "train": {k: train[k] for k in ESTIMATE_TRAIN_KEYS if k in train},
        "optim": {k: optim[k] for k in ("name", "momentum") if k in optim and (k == "name" or optim["name"] == "sgd")},
    }


def plan_arguments(config_file: str | Path | None, flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What `lmforge estimate` plans for `--config` and the adapt flags written: (settings that go under the dotted
    `--section.key` overrides, keyword arguments of `estimate`).

    Args:
        config_file: `--config`; a fine-tuned run (its folder or config.json, beside a finetune.json) plans that
            fine-tune. A fine-tune's config.json is its base's (the architecture, and the base's pretraining batch
            and optimizer: planned from it alone, a LoRA run was estimated as full pretraining); what it trained
            with is in finetune.json: its train and optim sections, tokens per example (max_len), the adapt mode
            and the LoRA rank and targets.
        flags: the adapt flags written on the command line (`ADAPT_FLAGS`; lora_targets: finetune's repeated
            `--lora-targets qkv --lora-targets mlp.fc` or commas); they win over the run's settings, and what
            neither gives is finetune's default (`finetune_defaults`), so the two commands cannot drift apart. A
            prompt-tuning run's soft-prompt length is planned with --adapt prompt only, and a classification run's
            labels in every mode (a full plan too: the classification head replaces the LM head). Without a
            fine-tune's folder, --adapt lora, head or prompt (or --labels) take finetune's batch, optimizer and
            train.device/dtype (its `finetune_sections` defaults), not the preset's or config's, which are
            pretraining's; `--train.*` and `--optim.*` overrides still win.
    """
    defaults = finetune_defaults()
    settings: dict[str, Any] = {}
    kwargs: dict[str, Any] = {
        "adapt": "full",
        "lora_rank": defaults.lora_rank,
        "lora_targets": tuple(defaults.lora_targets),
    }
    run = None
    if config_file:
        path = Path(config_file).expanduser()
        run = path if path.is_dir() else path.parent
    if run is not None and (run / "finetune.json").is_file():
        from lmforge.checkpoint import read_json

        info = read_json(run / "finetune.json", "pass the fine-tune's settings as flags instead")
        adapt = {"distill": "full"}.get(info.get("adapt", ""), info.get("adapt", ""))
        if adapt not in ADAPT_MODES:
            raise ConfigError(
                f"{run} is a --adapt {info.get('adapt')} fine-tune, which estimate does not plan: pass --adapt "
                f"({', '.join(ADAPT_MODES)})"
            )
        settings = _trained_with(info.get("train") or {}, info.get("optim") or {})
        if info.get("max_len"):
            settings["data"] = {"seq_len": int(info["max_len"])}
        lora = info.get("lora") or {}
        kwargs["adapt"] = adapt
        if info.get("adapt") == "distill" and flags.get("adapt", adapt) == "full":  # (the teacher runs in full only)
            kwargs["teacher"] = read_teacher(info.get("teacher") or "")
        kwargs["lora_rank"] = lora.get("rank", defaults.lora_rank)
        kwargs["lora_targets"] = tuple(lora.get("targets") or defaults.lora_targets)
        if flags.get("adapt", adapt) == adapt == "lora":  # (--adapt head on a LoRA run's folder would refuse it)
            kwargs["lora_dropout"] = float(lora.get("dropout") or 0.0)
        planned = flags.get("adapt", adapt)  # (--adapt on the command line wins; it takes what it uses)
        if planned == adapt == "prompt":
            kwargs["prompt_tokens"] = int(info.get("prompt_tokens") or defaults.prompt_tokens)
        if info.get("task") == "classify":  # the task's head, in every mode (full: instead of the LM head)
            kwargs["labels"] = len(info.get("labels") or [])
    elif flags.get("adapt", "full") != "full" or flags.get("labels") or flags.get("teacher"):
        # (--labels: a full fine-tune is finetune's; --teacher: a distillation fine-tune is too)
        # finetune never reads a preset's or a base run's train and optim sections (their batch is pretraining's:
        # --preset small planned LoRA at 64 sequences a step, finetune trains 16): its own defaults, under the flags
        from lmforge.finetune_config import finetune_sections

        mode = (
            "distill" if flags.get("teacher") and flags.get("adapt", "full") == "full" else flags.get("adapt", "full")
        )
        train, optim = finetune_sections(mode, None)[:2]
        settings = _trained_with(dataclasses.asdict(train), dataclasses.asdict(optim))
    for key, value in flags.items():
        if key == "teacher":  # (finetune's --teacher: it wins over the one a distillation run's finetune.json names)
            teacher = value
            value = read_teacher(teacher, flag=True)
            check_teacher_run_tokenizer(teacher, config_file)
        if key == "lora_targets":  # (only the last flag counted, when estimate took commas alone)
            value = tuple(t.strip() for v in value for t in v.split(",") if t.strip())
        kwargs[key] = value
    return settings, kwargs


def check_adapt(
    adapt: str,
    *,
    world_size: int,
    lora_rank: int | None,
    lora_targets: tuple[str, ...] | None,
    prompt_tokens: int | None,
    labels: int,
    lora_dropout: float | None = None,
) -> tuple[int | None, tuple[str, ...] | None, int | None, float]:
    """Refuse a setting `adapt` does not use or cannot take (one-line `ConfigError`s); returns lora_rank, lora_targets,
    prompt_tokens and lora_dropout with finetune's defaults (`finetune_defaults`) where the plan uses them and none
    was given."""
    if adapt not in ADAPT_MODES:
        raise ConfigError(f"unknown adapt mode {adapt!r}; use one of: {', '.join(ADAPT_MODES)}")
    if prompt_tokens is not None and adapt != "prompt":  # (a setting the plan would not use is refused, as finetune)
        raise ConfigError(f"--prompt-tokens is for --adapt prompt; drop it (this plan: --adapt {adapt})")
    if lora_dropout is not None and adapt != "lora":
        raise ConfigError(f"--lora-dropout is for --adapt lora; drop it (this plan: --adapt {adapt})")
    if not (isinstance(labels, int) and labels >= 0) or labels == 1:
        raise ConfigError(f"--labels must be 0 (an LM task) or the number of classes (2 or more), got {labels!r}")
    if labels and world_size > 1:  # (a full classification fine-tune is finetune's too: one process)
        raise ConfigError("lmforge finetune runs in one process; drop --world-size for --labels")
    if adapt == "prompt":
        prompt_tokens = finetune_defaults().prompt_tokens if prompt_tokens is None else prompt_tokens
        if not (isinstance(prompt_tokens, int) and prompt_tokens >= 1):
            raise ConfigError(f"--prompt-tokens must be >= 1, got {prompt_tokens!r}")
    if adapt != "full" and world_size > 1:  # (finetune.py: require_one_process)
        raise ConfigError(f"lmforge finetune runs in one process; drop --world-size for --adapt {adapt}")
    if adapt == "lora":
        defaults = finetune_defaults()  # (finetune's: the two cannot drift apart)
        lora_rank = defaults.lora_rank if lora_rank is None else lora_rank
        lora_targets = tuple(defaults.lora_targets) if lora_targets is None else lora_targets
        bad = [t for t in lora_targets if t not in LORA_TARGETS]
        if bad or not lora_targets or lora_rank < 1:
            raise ConfigError(
                f"LoRA needs --lora-rank >= 1 and --lora-targets from {', '.join(LORA_TARGETS)}; got rank {lora_rank}, "
                f"targets {', '.join(lora_targets) or 'none'}"
            )
        lora_dropout = defaults.lora_dropout if lora_dropout is None else lora_dropout
        if not (isinstance(lora_dropout, (int, float)) and 0 <= lora_dropout < 1):  # (finetune's own check)
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {lora_dropout!r}")
    return lora_rank, lora_targets, prompt_tokens, float(lora_dropout or 0.0)


def adapted_plan(
    model: GPTConfig,
    optim: OptimConfig,
    step: StepShape,
    *,
    adapt: str,
    lora_rank: int,
    lora_targets: tuple[str, ...],
    prompt_tokens: int,
    labels: int,
    lora_dropout: float = 0.0,
) -> dict[str, Any]:
    """A fine-tuning step on a frozen base (`adapt`: lora, head or prompt), or a full classification one (full with
    `labels`; settings as `check_adapt` returns them):
    trainable (parameters), flops_per_token and attention (its attention-score part, per token of text),
    memory (`memory_bytes`' components) and assumption (the line `format_estimate` prints)."""
    counts, seq_len = param_counts(model), step.seq_len
    attention = attention_flops_per_token(model, seq_len)  # (per token of text, as per_token)
    vocab_matmul = model.vocab_size * model.d_model  # the output head's (tied or not)
    head_matmul = model.d_model * labels / seq_len  # a classification head's, per token: it runs once per sequence
    if adapt == "full":  # classification (labels > 0): every weight, the new head instead of the vocabulary matmul
        trainable = counts["total"] + head_param_count(model, labels)
        per_token = 6.0 * (counts["matmul"] - vocab_matmul) + attention + 6.0 * head_matmul
    elif adapt == "lora":
        trainable = lora_param_count(model, lora_rank, tuple(lora_targets)) + (
            head_param_count(model, labels) if labels else 0
        )
        per_token, attention = lora_flops_per_token(model, lora_rank, tuple(lora_targets), seq_len, labels)
    elif adapt == "head":  # forward only through the body; backward from the loss to the head alone
        trainable = head_param_count(model, labels)
        attention /= 3  # (its forward: 4 of 12)
        if labels:  # the last token's state goes to the new head: no vocabulary matmul at all
            per_token = 2.0 * (counts["matmul"] - vocab_matmul) + attention + 4.0 * head_matmul  # (no input grad)
        else:  # the head's input gradient (for the final norm) and, untied, its weight gradient
            per_token = 2.0 * counts["matmul"] + attention + (2 if model.tie_embeddings else 4) * vocab_matmul
    else:  # prompt: forward + the inputs' gradients over prompt + text positions, per text token
        trainable = prompt_tokens * model.d_model + (head_param_count(model, labels) if labels else 0)
        positions = seq_len + prompt_tokens
        attention = attention_flops_per_token(model, positions) * positions / seq_len
        per_token = 4.0 * (counts["matmul"] - vocab_matmul) * positions / seq_len + attention
        per_token += 6.0 * head_matmul if labels else 4.0 * vocab_matmul
    if adapt == "full":
        memory = full_classify_memory_bytes(model, optim, step, labels=labels)
        assumption = (
            f"full classification fine-tune: every weight trains and a classification head for {labels} labels on "
            f"the last token replaces the LM head ({trainable:,} parameters); no vocabulary matmul or logits; "
            "FLOPs 6N + attention with the head's 6 x d_model x labels per sequence"
        )
    elif adapt == "lora":
        memory = lora_memory_bytes(
            model, optim, step, rank=lora_rank, targets=tuple(lora_targets), labels=labels, dropout=lora_dropout
        )
        assumption = (
            f"LoRA rank {lora_rank} on {', '.join(lora_targets)}"
            + (f", dropout {lora_dropout:g} on their input (its mask kept)" if lora_dropout else "")
            + (f" and a classification head for {labels} labels on the last token" if labels else "")
            + f": {trainable:,} trainable parameters; the frozen base "
            "in fp32 (as finetune loads it) with no gradients or optimizer state; no input of a frozen Linear kept; "
            "FLOPs 4N + 6 x adapters + attention (no weight gradients for the base), less the input gradients nothing "
            "before the first adapter needs"
        )
    elif adapt == "head":
        memory = head_memory_bytes(model, optim, step, labels=labels)
        trained = (
            f"a classification head for {labels} labels on the last token"
            if labels
            else "the final norm" + ("" if model.tie_embeddings else " and the untied output head")
        )
        assumption = (
            f"head only: {trained} ({trainable:,} parameters) on a frozen fp32 base; nothing before the head needs a "
            "gradient, so the body keeps no activations (memory: its forward working set or the loss's tail); "
            "FLOPs: the body's forward, 2N, + the head's backward"
        )
    else:
        memory = prompt_memory_bytes(model, optim, step, prompt_tokens=prompt_tokens, labels=labels)
        assumption = (
            f"prompt tuning: {prompt_tokens} soft-prompt vectors"
            + (f" and a classification head for {labels} labels" if labels else "")
            + f" ({trainable:,} parameters) on a frozen fp32 base; backward runs through every block to the prompt, "
            f"over {seq_len} + {prompt_tokens} positions, with no input of a frozen Linear kept; FLOPs 4N + attention "
            "per position (no weight gradients for the base)"
        )
    return {
        "trainable": trainable,
        "flops_per_token": per_token,
        "attention": attention,
        "memory": memory,
        "assumption": assumption,
    }
