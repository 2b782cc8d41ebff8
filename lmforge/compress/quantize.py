"""Weight-only quantization of a run's Linear layers: `lmforge quantize RUN --bits 8|4 --out RUN_Q`.

    RUN ─► quantize every nn.Linear weight ─► RUN_Q/
        config.json, tokenizer.json          copied (same architecture, same data directory)
        generation.json                      the run's stop ids (an imported instruct model's end of turn)
        checkpoints/step-N/model.safetensors {name}.qweight + {name}.scales for each quantized weight,
                                             every other tensor (embeddings, norms, biases) as it was
        checkpoints/step-N/state.json        the run's state + "quantization": {bits, group_size, layers}
        quantize.json                        the before/after comparison
    RUN_Q is built in a hidden folder and renamed into place only when all of it (comparison included)
    is done, so a failure leaves no half RUN_Q; the comparison's data directory is checked first.

Schemes (symmetric, no zero point, round to nearest; the baselines of LLM.int8/GPTQ/AWQ papers):
- int8, per output channel: scale_o = max_i |W[o, i]| / 127, q = round(W / scale) in [-127, 127],
  stored as int8 (1 byte per weight + one fp16 scale per row).
- int4, group-wise: each row is cut into groups of `group_size` input columns (the whole row when
  group_size does not divide it); scale_g = max |W[group]| / 7, q = round(W / scale) in [-8, 7],
  stored as q + 8 in 4 bits, two per byte (low nibble = even column), plus one fp16 scale per group.
- Embeddings (and a tied output head, which *is* the embedding) stay float32: a lookup table is not
  a matmul, and the tied head is shared with it. Norms and biases stay float32 (tiny).

Loading (`trained.load_trained`, so `eval`, `generate`, `chat`, `serve`, `export` all work): the
weights are dequantized once into an ordinary float32 model ("dequantize on load"). `QuantLinear`,
which keeps the integers and dequantizes on the fly in every forward, is here too; bench/quantize.py
measures both, and on CPU dequantize-on-load generates faster (see the README table), because
PyTorch has no int4/int8-weight CPU matmul that beats its fp32 GEMM at these sizes and the on-the-fly
dequantization adds work per token. What quantization buys here is disk size and download size.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import CheckpointError, DataError, LmforgeError

BITS = (8, 4)


# ---------------------------------------------------------------------------------------------
# the numerics


def quantize_weight(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """W (out, in) float -> (qweight, scales fp16).

    int8: qweight int8 (out, in), scales (out, 1). int4: qweight uint8 (out, in/2) packed nibbles,
    scales (out, in/group) with group = group_size if it divides `in`, else `in`.
    """
    w = w.detach().float()
    out_f, in_f = w.shape
    if bits == 8:
        scales = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12).half()  # (out, 1)
        q = torch.round(w / scales.float()).clamp(-127, 127).to(torch.int8)
        return q, scales
    if bits != 4:
        raise LmforgeError(f"--bits {bits} is not supported; use 8 or 4")
    if in_f % 2:
        raise LmforgeError(
            f"--bits 4 packs two weights per byte, and this model has a Linear with an odd number of inputs "
            f"({in_f}); quantize it with --bits 8, or train a model whose model.d_model and model.d_ff are even"
        )
    group = group_size if in_f % group_size == 0 else in_f
    wg = w.view(out_f, in_f // group, group)  # (out, n_groups, group)
    scales = (wg.abs().amax(dim=2, keepdim=True) / 7).clamp(min=1e-12).half()  # (out, n_groups, 1)
    q = torch.round(wg / scales.float()).clamp(-8, 7).to(torch.int16).view(out_f, in_f) + 8  # 0..15
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # (out, in/2)
    return packed, scales.squeeze(2)


def dequantize_weight(qweight: Tensor, scales: Tensor) -> Tensor:
    """Inverse of `quantize_weight`: float32 (out, in). The scheme is told by qweight's dtype."""
    if qweight.dtype == torch.int8:
        return qweight.float() * scales.float()
    if qweight.dtype != torch.uint8:
        raise CheckpointError(f"quantized weight of dtype {qweight.dtype}; expected int8 or uint8 (int4)")
    out_f = qweight.shape[0]
    q = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).view(out_f, -1).float() - 8  # (out, in)
    n_groups = scales.shape[1]
    return (q.view(out_f, n_groups, -1) * scales.float()[:, :, None]).view(out_f, -1)


class QuantLinear(nn.Module):
    """A Linear that keeps int8 / packed int4 weights and dequantizes them in every forward."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, dequantize_weight(self.qweight, self.scales).to(x.dtype), self.bias)


def quantized_linears(model: nn.Module) -> list[str]:
    """Names of the Linear modules that get quantized (all of them; embeddings are not Linears)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_state(model: nn.Module, bits: int, group_size: int) -> tuple[dict[str, Tensor], list[str]]:
    """The model's state dict with each Linear weight replaced by `.qweight` + `.scales` tensors."""
    layers = quantized_linears(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for name in layers:
        q, s = quantize_weight(state.pop(f"{name}.weight"), bits, group_size)
        state[f"{name}.qweight"], state[f"{name}.scales"] = q.contiguous(), s.contiguous()
    return state, layers


def dequantized_state(state: dict[str, Tensor], layers: list[str]) -> dict[str, Tensor]:
    """Replace `.qweight` + `.scales` pairs by float32 `.weight` tensors."""
    out = dict(state)
    for name in layers:
        try:
            q, s = out.pop(f"{name}.qweight"), out.pop(f"{name}.scales")
        except KeyError:
            raise CheckpointError(f"quantized checkpoint lacks {name}.qweight/.scales; it is damaged") from None
        out[f"{name}.weight"] = dequantize_weight(q, s)
    return out


def load_quantized(model: nn.Module, ckpt: Any) -> None:
    """Fill `model` (float32) from a quantized checkpoint: dequantize on load (see the module docstring)."""
    info = ckpt.meta["quantization"]
    state = dequantized_state(ckpt.model_state(), list(info["layers"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    from lmforge.train.state import shared_names

    missing = [k for k in missing if k not in shared_names(model)]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.weights_path} does not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); was it written by another lmforge model config?"
        )


def to_quant_linears(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """Swap every Linear of `model` (in place) for a QuantLinear holding its quantized weight."""
    for name in quantized_linears(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        q, s = quantize_weight(linear.weight, bits, group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        setattr(parent, child, QuantLinear(q, s, bias))
    return model


# ---------------------------------------------------------------------------------------------
# the command


def _model_bytes(ckpt_dir: Path) -> int:
    """Bytes of a checkpoint's weights (model.safetensors, or a sharded checkpoint's model-* files; one
    worker's of a DiLoCo checkpoint)."""
    from lmforge.checkpoint import model_files, read_json

    meta = read_json(ckpt_dir / "state.json", "the checkpoint is damaged")
    return sum((ckpt_dir / name).stat().st_size for name in model_files(meta))


@torch.no_grad()
def generation_speed(model: nn.Module, *, n_tokens: int = 64, prompt_len: int = 8, repeats: int = 2) -> float:
    """Greedy decoding speed with the KV cache, in new tokens per second (best of `repeats`, after a warm-up)."""
    from lmforge.generate import generate

    vocab, context = model.cfg.vocab_size, model.cfg.max_seq_len
    # a context shorter than the prompt (a toy model of context 1-8) failed the whole quantize with "prompt is 8
    # tokens but the model's context is 1; shorten the prompt", about a prompt the user never gave
    prompt_len = min(prompt_len, max(1, context // 2))
    n_tokens = max(1, min(n_tokens, context - prompt_len))
    prompt = [(7 * i + 3) % vocab for i in range(prompt_len)]
    generate(model, prompt, max_new_tokens=4, temperature=0)  # warm-up (allocations, kernels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        new = generate(model, prompt, max_new_tokens=n_tokens, temperature=0)
        best = min(best, time.perf_counter() - start)
    return len(new) / best


def default_out(path: str | Path, bits: int) -> Path:
    """`lmforge quantize RUN_DIR --bits 8|4` without --out (as the interop issue writes it): the copy goes beside
    the run, named after it, `runs/x` -> `runs/x-int8`; a checkpoint's copy also names its step,
    `runs/x/checkpoints/step-000100` -> `runs/x-step-000100-int8`. An existing one is refused (--overwrite)."""
    from lmforge.checkpoint import resolve_checkpoint

    source = resolve_checkpoint(path)  # (a path that is not a run: its one-line error)
    run_dir = source.parent.parent
    step = "" if source.resolve() != Path(path).resolve() else f"-{source.name}"
    return run_dir.parent / f"{run_dir.name}{step}-int{bits}"


def quantize_run(
    path: str | Path,
    out: str | Path | None = None,
    *,
    bits: int = 8,
    group_size: int = 64,
    overwrite: bool = False,
    compare: bool = True,
    max_batches: int = 20,
    gen_tokens: int = 64,
    val_file: str | Path | None = None,
) -> dict[str, Any]:
    """`lmforge quantize`: write a weight-quantized copy of a run, and compare it with the original.

    Args:
        path: run directory (its latest checkpoint) or a checkpoint folder; GPT models only.
        out: the run directory to create (eval/generate/chat/serve/export load it like any run); default
            (`default_out`): beside the run, its name + `-int8`/`-int4` (a checkpoint's: + its step too).
        bits: 8 (int8 per output channel) or 4 (int4 per group of `group_size` inputs).
        group_size: int4 group width (a row is one group when it does not divide the row).
        overwrite: replace an existing `out`.
        compare: also measure val bpb (the first `max_batches` forward batches of the split: of the run's
            eval.batch_size, or its training micro-batch, the most that fits one forward; not of its whole
            batch, which for gpt2-124m is 480 sequences), size on disk and CPU greedy generation speed
            (`gen_tokens` tokens, KV cache, 1 sequence) before and after. A pretrained run is compared on its
            prepared data's val split; a fine-tune on its own validation file (`val_file`, default: the --val
            it was fine-tuned with, which finetune.json records), as its evaluations were, and only on its
            base's prepared data when it had none (`compared_on` says which).
        val_file: a fine-tune's task file to compare on instead of the one it recorded.

    Returns:
        {"out", "bits", "group_size", "layers", "bytes_before", "bytes_after"} plus, with `compare`,
        {"compared_on", "tok_s_before", "tok_s_after"} and, with data to compare on, {"bpb_before", "bpb_after"}
        (a fine-tune's also {"loss_before", "loss_after"}: its val_loss).
    """
    from lmforge.atomic import building_dir, check_not_inside, check_out_dir, write_json
    from lmforge.checkpoint import read_json, resolve_checkpoint, save_checkpoint
    from lmforge.generate import hf_eos_of, stop_ids_of, write_stop_ids
    from lmforge.trained import load_trained

    if bits not in BITS:
        raise LmforgeError(f"--bits {bits} is not supported; use 8 or 4")
    if group_size <= 0 or group_size % 2:
        raise LmforgeError(f"--group-size must be a positive even number, got {group_size}")
    out = default_out(path, bits) if out is None else Path(out)
    check_not_inside(out, Path(path))  # not the run, a folder holding it, nor one inside it: --overwrite deletes out
    check_out_dir(out, overwrite=overwrite)
    source = resolve_checkpoint(path)
    check_not_inside(out, source)
    cpu = torch.device("cpu")
    run_dir = source.parent.parent
    info: dict[str, Any] = {}  # finetune.json of a fine-tune
    if (run_dir / "finetune.json").is_file():
        info = read_json(run_dir / "finetune.json", "re-run lmforge finetune")
        if info.get("saved") != "model" or info.get("task") == "classify" or info.get("adapt") == "prompt":
            raise LmforgeError(
                f"{path} holds adapters, a soft prompt or a task head, not a whole language model; quantize a "
                "full or distilled fine-tune, or one trained with --merge"
            )
    trained = load_trained(path, cpu)
    if trained.config.model.family != "gpt":
        raise LmforgeError(
            f"quantize supports GPT and Llama-style runs (model.family gpt); this run's model.family is "
            f"{trained.config.model.family!r}: keep its float weights, or train a gpt model to quantize"
        )
    if "quantization" in trained.checkpoint.meta:
        raise LmforgeError(f"{path} is already quantized; quantize the original run instead")
    # what the comparison scores: a fine-tune's own validation file, as its evaluations did; else prepared data
    if val_file is not None and not compare:
        raise LmforgeError("--val sets the before/after comparison, which --no-compare skips; drop one")
    if val_file is not None and not info:
        raise LmforgeError(
            f"--val is for fine-tuned runs (their task file); {path} is compared on the val split of its prepared "
            "data (data.dir)"
        )
    val_file = val_file or (info.get("val_file") if compare else None)
    if val_file and info.get("task") == "dpo":  # (its loss needs the reference model's log-probs)
        raise LmforgeError(
            f"{path} is a --task dpo fine-tune, whose val loss is not a language-model loss; pass --no-compare"
        )
    if val_file:  # checked before anything is written, as the data directory below
        from lmforge.data.tables import read_task_rows

        try:
            read_task_rows(val_file, info["task"], info["fields"], scored=True)
        except LmforgeError as e:
            raise DataError(
                f"the fine-tune's validation file cannot be read ({str(e).split(';')[0]}), and the before/after "
                "comparison evaluates on it; pass --val FILE, or --no-compare to quantize without the comparison"
            ) from None
    data_dir = trained.config.data.dir if compare and not val_file else None
    if data_dir:  # checked before anything is written: the comparison evaluates on it
        from lmforge.data.datadir import load_data_dir

        try:
            load_data_dir(data_dir)
        except LmforgeError as e:
            raise DataError(
                f"the run's data {data_dir} cannot be read ({str(e).split(';')[0]}), and the before/after "
                "comparison evaluates on it; pass --no-compare to quantize without the comparison"
            ) from None
    state, layers = quantize_state(trained.model, bits, group_size)
    # int4 layers whose input width `group_size` does not divide are quantized with one group per row
    whole_rows = [n for n in layers if trained.model.get_submodule(n).in_features % group_size]

    meta = trained.checkpoint.meta
    config = dataclasses.replace(trained.config, out=str(out))
    quant_info = {"bits": bits, "group_size": group_size, "layers": layers, "source": str(trained.checkpoint.path)}
    step = int(meta.get("step", 0))
    # built in a hidden folder and published only once complete (quantize.json included): a failed
    # comparison leaves no half --out, and an --overwrite keeps the old one until then
    with building_dir(out) as tmp:
        ckpt_dir = save_checkpoint(
            tmp,
            step=step,
            model=trained.model,
            optimizer=None,
            state={"train_state": meta.get("train_state", {}), "config": config.to_dict(), "quantization": quant_info},
            tokenizer_json=trained.tokenizer.to_str(),
            model_state=state,
        )
        write_json(tmp / "config.json", config.to_dict())
        trained.tokenizer.save(tmp / "tokenizer.json")
        if (run_dir / "tokenizer_config.json").is_file():  # a chat-tuned run keeps its chat template
            shutil.copyfile(run_dir / "tokenizer_config.json", tmp / "tokenizer_config.json")
        if (run_dir / "finetune.json").is_file():  # a fine-tune's task, base and settings (eval, export's card)
            shutil.copyfile(run_dir / "finetune.json", tmp / "finetune.json")
        stop_ids = stop_ids_of(run_dir)  # an imported instruct model's end of turn (or its fine-tune's base's)
        if stop_ids:
            write_stop_ids(tmp, stop_ids, hf_eos=hf_eos_of(run_dir))
        result: dict[str, Any] = {
            "out": str(out),
            "bits": bits,
            "group_size": group_size,
            "layers": len(layers),
            "whole_row_layers": len(whole_rows) if bits == 4 else 0,
            "bytes_before": _model_bytes(trained.checkpoint.path),
            "bytes_after": _model_bytes(ckpt_dir),
        }
        if compare:
            from lmforge.eval.lm import evaluate_checkpoint, run_forward_batch

            quantized = load_trained(tmp, cpu)
            if val_file:
                from lmforge.adapt.load import load_finetuned
                from lmforge.data.formats import notes_dropped
                from lmforge.finetune_eval import task_val_metrics

                before = task_val_metrics(load_finetuned(path, cpu), val_file, max_batches=max_batches)
                with notes_dropped():  # (the same examples again: their notes were printed once, above)
                    after = task_val_metrics(load_finetuned(tmp, cpu), val_file, max_batches=max_batches)
                result["compared_on"] = f"{val_file} (the fine-tune's --task {info['task']} validation data)"
                result.update(loss_before=before["loss"], loss_after=after["loss"])
                result.update(bpb_before=before["bpb"], bpb_after=after["bpb"])
            elif data_dir:
                result["compared_on"] = f"the val split of {data_dir}" + (
                    " (the base's prepared data: this fine-tune records no validation file; pass --val FILE to "
                    "compare on its task data)"
                    if info
                    else ""
                )
                config = trained.config
                forward = run_forward_batch(config.eval, config.train, trained.checkpoint.path)
                sample = dict(batch_size=forward, max_batches=max_batches)
                try:
                    result["bpb_before"] = evaluate_checkpoint(str(path), **sample, device="cpu")["bpb"]
                    result["bpb_after"] = evaluate_checkpoint(str(tmp), **sample, device="cpu")["bpb"]
                except LmforgeError as e:
                    raise type(e)(f"{e} (or pass --no-compare to quantize without the comparison)") from None
            else:
                result["compared_on"] = None
                result["no_bpb"] = "no val bpb: the run names no prepared data" + (
                    " and records no validation file; pass --val FILE (its task data)" if info else ""
                )
            result["tok_s_before"] = generation_speed(trained.model, n_tokens=gen_tokens)
            result["tok_s_after"] = generation_speed(quantized.model, n_tokens=gen_tokens)
        write_json(tmp / "quantize.json", result)
    return result


def format_quantize(r: dict[str, Any]) -> str:
    """The before/after table `lmforge quantize` prints."""
    groups = f", groups of {r['group_size']}" if r["bits"] == 4 else ""
    if r.get("whole_row_layers"):  # (group_size does not divide their input width)
        groups += f" (whole rows in {r['whole_row_layers']} layers, whose width {r['group_size']} does not divide)"
    lines = [f"wrote {r['out']} (int{r['bits']}{groups}, {r['layers']} Linear layers)",
             f"{'':>16} {'before':>10} {'after':>10}"]  # fmt: skip
    lines.append(f"{'size (MB)':>16} {r['bytes_before'] / 1e6:>10.3f} {r['bytes_after'] / 1e6:>10.3f}")
    if "loss_before" in r:
        lines.append(f"{'val loss':>16} {r['loss_before']:>10.4f} {r['loss_after']:>10.4f}")
    if "bpb_before" in r:
        lines.append(f"{'val bpb':>16} {r['bpb_before']:>10.4f} {r['bpb_after']:>10.4f}")
    if "tok_s_before" in r:
        lines.append(f"{'generate tok/s':>16} {r['tok_s_before']:>10.1f} {r['tok_s_after']:>10.1f}")
    if r.get("compared_on"):
        lines.append(f"val compared on {r['compared_on']}")
    elif r.get("no_bpb"):
        lines.append(r["no_bpb"])
    return "\n".join(lines)
