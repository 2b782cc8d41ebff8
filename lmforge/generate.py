"""Text generation: the decode loops with a KV cache, and the `lmforge generate` command.

- The sampling rules (`sample_next`: greedy, temperature, top-k, top-p, min-p; `Penalties` on repeats) live
  in `sampling.py`; the loops here apply them to each step's logits.
- `generate(model, prompt_ids, ...)`: autoregressive decoding of one sequence. The prompt is run once
  (prefill) into a KV cache, then one token per step. Randomness comes only from a local generator
  seeded by `seed`, so a seeded call is reproducible and never disturbs the global RNG (or a training
  run that samples between steps). The loop runs under `inference_mode`, feeds the chosen token back
  as a tensor and checks the sampling arguments once: batch-1 decode of a small model is per-call
  overhead, not arithmetic (bench/generate_speed.py).
- `compile=True` (`--compile` on `generate`, `chat`, `serve`): the one-token decode steps run through
  `torch.compile` (inductor, dynamic shapes, so the growing cache needs no recompile), made once per
  model and kept for later calls; prefill stays eager. The first call compiles (~5-22 s on CPU), then
  each token is ~5-15% faster (bench/generate_speed.py): worth it for chat and serve sessions or long
  outputs, not for one short sample. Same ids up to float rounding in the fused kernels. If compiling
  fails (on CPU inductor needs a C++ compiler), decoding goes on eagerly after a one-line warning. An lstm/gru
  run refuses it (`load_generator`): Dynamo cannot trace nn.LSTM/nn.GRU, so it only made decoding slower.
- `generate_batch(model, prompts, ...)`: prompts of different lengths decoded together (left-padded,
  per-row positions and a padding mask), each row's greedy result equal to `generate` on it alone;
  evaluation (`eval/tasks.py`) answers 16 prompts per batch with it.
- Context overflow: once the sequence is longer than the model's `max_seq_len`, each further step
  re-runs the model on the last `max_seq_len` tokens without a cache (a sliding window); with `prefix`
  (the tokenizer's BOS, which `lmforge generate` passes) the window is that prefix and then the last tokens. A cache
  cannot slide: its keys were computed at absolute positions, and with learned positions the
  window's first token must sit at position 0 again. Those steps cost a full forward pass each.
- Stop ids: besides `eos_id`, `generate`/`generate_batch` stop at any id of `stop_ids`. A run keeps its
  extra ones in `generation.json` (`{"stop_ids": [...]}`): `lmforge import` writes it when the HF
  directory's end-of-sequence ids (generation_config.json, config.json, tokenizer_config.json) name
  more than the tokenizer's own end-of-text token, e.g. Llama-3-Instruct's `<|eot_id|>`, with the HF
  config.json's own `eos_token_id` (`hf_eos_of`: Qwen2.5-Instruct's `<|im_end|>`, which the HF export writes
  back). `stop_ids_of(run_dir)` reads it (a fine-tune without one uses its base's), for `generate`, `chat`,
  `serve` and the HF export.
- No eos: an imported tokenizer may have no end-of-text token lmforge knows (`Tokenizer.eos_id_or_none`
  is None; its end token, if any, is then in `generation.json`). Its runs generate all the same, up to
  the token limit or a stop id; only an empty prompt, which would start after an end-of-text token,
  is refused with what to do instead.
- `generate_from_checkpoint(...)`: the `lmforge generate` command (load, encode, stream, decode); with
  `--num-samples` or `--prompt-file` it hands the prompts to `generate_many.py`, which decodes them in batches.
- Token ids become the text shown in `detokenize.py`: `StreamDecoder` (whole characters as they come),
  `StopStrings` (`--stop`, matched on that text) and `continuation_decoder`.

Length (~670 lines): the sampling rules (sampling.py) and the text side of decoding (detokenize.py) live in
their own modules, and the command's many-prompt half in generate_many.py.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from lmforge.detokenize import StopStrings, StreamDecoder, continuation_decoder
from lmforge.errors import CheckpointError, LmforgeError, first_line
from lmforge.models.gpt import GPT
from lmforge.sampling import (
    Penalties,
    check_max_new_tokens,
    check_sampling,
    check_seed,
    sample_unchecked,
    sampling_generator,
    sampling_probs,
)
from lmforge.train.precision import cpp_compiler_problem

STOP_IDS_FILE = "generation.json"  # in a run directory: {"stop_ids": [...]}, ids that end a generation


def write_stop_ids(run_dir: Path, stop_ids: list[int], *, hf_eos: int | list[int] | None = None) -> None:
    """Record `stop_ids` (token ids that end a generation, beside the tokenizer's eos) in `run_dir`, and
    `hf_eos`, the `eos_token_id` of the HF config.json an imported model came with, for its HF export."""
    from lmforge.atomic import write_json

    extra = {} if hf_eos is None else {"hf_eos_token_id": hf_eos}
    write_json(Path(run_dir) / STOP_IDS_FILE, {"stop_ids": list(stop_ids), **extra})


def _generation_file(run_dir: str | Path) -> tuple[Path, Any] | None:
    """(path, content) of the run's `STOP_IDS_FILE`, or of its fine-tune base's; None when neither has one."""
    from lmforge.checkpoint import read_json

    run_dir = Path(run_dir)
    for _ in range(8):  # a fine-tune of a fine-tune of ...; the bound only guards against a loop
        path = run_dir / STOP_IDS_FILE
        if path.is_file():
            return path, read_json(path, "delete it or re-import the model")
        info_path = run_dir / "finetune.json"
        if not info_path.is_file():
            return None
        info = read_json(info_path, "re-run lmforge finetune")
        base = info.get("base") if isinstance(info, dict) else None
        if not isinstance(base, str) or not Path(base).exists():
            return None  # (loading the run names a missing base, where that matters)
        from lmforge.adapt.load import run_dir_of

        base_dir = Path(base).resolve()  # a checkpoint folder (as finetune records it) or a run directory
        run_dir = base_dir if (base_dir / "checkpoints").is_dir() else run_dir_of(base_dir)
    return None


def stop_ids_of(run_dir: str | Path) -> list[int]:
    """The token ids that end a generation of this run besides its tokenizer's eos (`STOP_IDS_FILE`).

    A run without the file has none ([]), unless it is a fine-tune (finetune.json): then those of its
    base run, which is where an imported model's file lives.

    Raises:
        CheckpointError: the file is not {"stop_ids": [non-negative ints]}.
    """
    found = _generation_file(run_dir)
    if found is None:
        return []
    path, data = found
    ids = data.get("stop_ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
        raise CheckpointError(f'{path} must be {{"stop_ids": [token ids]}}; delete it or re-import the model')
    return ids


def hf_eos_of(run_dir: str | Path) -> int | list[int] | None:
    """The `eos_token_id` of the HF config.json this run (or its fine-tune base) was imported from, when it
    named another token than the tokenizer's eos (Qwen2.5-Instruct: `<|im_end|>`), else None."""
    found = _generation_file(run_dir)
    value = found[1].get("hf_eos_token_id") if found and isinstance(found[1], dict) else None
    ids = value if isinstance(value, list) else [value]
    return value if ids and all(type(i) is int and i >= 0 for i in ids) else None


def run_stops(loaded: Any) -> frozenset[int]:
    """The ids a generation with a loaded run (`adapt.load.Finetuned`) stops after: its tokenizer's eos
    (if it has one) and the run's `stop_ids_of`."""
    return _stop_set(loaded.tokenizer.eos_id_or_none, stop_ids_of(loaded.run_dir))


def context_length(model: Any) -> int:
    """The longest sequence `generate` runs `model` on: its `max_seq_len`, or a recurrent model's `max_context`
    (no limit: its `max_seq_len` is only the training window)."""
    return getattr(model, "max_context", model.cfg.max_seq_len)


def prompt_too_long(
    what: str, tokens: int, context: int, *, max_new_tokens: int = 0, flag: str = "", it: str = "it"
) -> str:
    """The one wording of the rule generate, chat and serve share: a prompt the model cannot see whole beside the
    new tokens is refused, never cut. `what` is the prompt's subject and verb ("the prompt is"), `tokens` long;
    `max_new_tokens` the tokens to generate beside it (0: generate, whose window slides on past the context),
    `flag` the command's name for them ("--max-new-tokens", "'max_tokens'"; "": not asked for), `it` the
    prompt's pronoun. Says the lengths and what to do: shorten the prompt, or ask for fewer new tokens."""
    room = context - max_new_tokens  # the longest prompt that fits
    text = f"{what} {tokens:,} tokens and the model's context is {context:,}"
    if room < 1:  # the new tokens alone fill the context (serve's 'max_tokens' 512 with a 128-token model)
        # said before as "holds -384 beside 512 new tokens; shorten it to at most -384 tokens (390 fewer)"
        text += f", which holds no prompt beside {max_new_tokens:,} new tokens" + (f" ({flag})" if flag else "")
        if tokens < context:
            return text + f"; lower {flag or 'them'} to at most {context - tokens:,}"
        return text + f"; shorten {it} to at most {context - 1:,} tokens and lower {flag or 'them'} to fit beside {it}"
    if max_new_tokens:
        new = f"{max_new_tokens:,} new token{'s' if max_new_tokens != 1 else ''}"
        text += f", which holds {room:,} beside {new}" + (f" ({flag})" if flag else "")
    text += f"; shorten {it} to at most {room:,} tokens ({tokens - room:,} fewer)"
    if flag and tokens < context:
        text += f" or lower {flag} to at most {context - tokens:,}"
    return text


def _check_prompt(prompt_ids: list[int], max_len: int, eos_id: int | None) -> list[int]:
    if not prompt_ids:
        if eos_id is None:
            raise LmforgeError("the prompt is empty; give at least one token (or an eos_id to start from)")
        return [eos_id]  # a new document starts after an end-of-text token
    if len(prompt_ids) > max_len:
        raise LmforgeError(prompt_too_long("the prompt is", len(prompt_ids), max_len))
    return list(prompt_ids)


def _decode_step(model: torch.nn.Module, x: Tensor, cache: object) -> Tensor:
    return model(x, cache)


# torch.compile(_decode_step) per device type, made on first use. On CPU the graph's kernel calls are
# generated as C++ (inductor's cpp_wrapper) rather than Python: 1.60 -> 1.48 ms per token of the 10.8M
# model (bench/generate_speed.py), as a decode step is ~100 tiny kernels
_compiled_steps: dict[str, Callable[..., Tensor]] = {}
_compile_failed: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # these models decode eagerly


def compiled_decode_step(model: torch.nn.Module, x: Tensor, cache: object) -> Tensor:
    """`model(x, cache)` through `torch.compile`, or eagerly for a model whose compiled call failed.

    One compiled function per device type takes the model as an argument (its parameters are graph
    inputs), so it holds no model alive and models of one shape share the compiled code. `dynamic=True`:
    the keys/values the cache returns grow by one position per token, which would otherwise recompile
    at every new length. Any exception from the compiled call (no C++ compiler, an unsupported op)
    switches that model to eager for good, with one warning on stderr, and the step re-runs eagerly
    (the cache had not advanced: its write repeats in place).
    """
    if model not in _compile_failed:
        try:
            step = _compiled_steps.get(x.device.type)
            if step is None:
                cpu = x.device.type == "cpu"
                problem = cpp_compiler_problem() if cpu else None
                if problem:
                    raise RuntimeError(problem)
                options = {"cpp_wrapper": True} if cpu else None
                step = _compiled_steps[x.device.type] = torch.compile(_decode_step, dynamic=True, options=options)
            return step(model, x, cache)
        except Exception as e:  # noqa: BLE001 - any compile failure: decode eagerly instead
            _compile_failed.add(model)
            print(
                f"warning: --compile failed ({first_line(e)[:200]}); decoding without it", file=sys.stderr, flush=True
            )
    return model(x, cache)


@torch.inference_mode()
def generate(
    model: GPT,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    stop_ids: Collection[int] = (),
    on_token: Callable[[int], bool | None] | None = None,
    compile: bool = False,  # noqa: A002 - the CLI flag's name
    penalties: Penalties | None = None,
    vocab_size: int | None = None,
    on_logits: Callable[[Tensor], None] | None = None,
    prefix: Sequence[int] = (),
) -> list[int]:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens and return only the new ones.

    Args:
        model: a decoder with `cfg.max_seq_len`, `forward(idx, cache)` and `new_cache(batch_size)`.
            It runs in eval mode (its previous mode is restored afterwards) on its own device and dtype.
        prompt_ids: the prompt's token ids. Empty is allowed only with `eos_id`, which then starts it.
        max_new_tokens: upper bound on generated tokens.
        temperature, top_k, top_p, min_p: see `sample_next`.
        seed: seeds a local generator on the model's device; None = a fresh random seed.
        use_cache: prefill once and decode with a KV cache (False recomputes the full context
            every step; the result is the same, only slower).
        eos_id: stop after this token is generated; it is included as the last returned token
            (and passed to `on_token`), so the caller can tell "stopped" from "ran out of tokens".
        stop_ids: more ids that stop it as `eos_id` does (a run's `stop_ids_of`), included like it.
        on_token: called with each new token id as soon as it is chosen (for streaming); returning True ends
            the generation after that token (a `StopStrings` match).
        compile: run the one-token decode steps through `torch.compile` (module docstring).
        penalties: presence / frequency / repetition penalties (`Penalties`); None = none.
        vocab_size: only ids below it are chosen (the tokenizer's size): a model whose embedding is padded
            past its tokenizer (`--model.vocab_size 50304`, Qwen2's 151936 rows for 151665 ids) has ids that
            were never trained and that no tokenizer decodes; None = every id of the model.
        on_logits: called at each step, before the token is chosen, with the (1, V) logits it is chosen from
            (below `vocab_size`), before penalties and temperature: `serve` streams their log-probabilities.
        prefix: ids kept first when the window slides past the context (`data.formats.keep_end`): the
            tokenizer's `prompt_prefix` (an imported Llama's BOS), which every prompt and training example
            starts with; a plain `ids[-max_len:]` window dropped it. Only when the prompt starts with it.

    Returns:
        The generated token ids (not including the prompt).

    Raises:
        LmforgeError: empty prompt without eos_id, prompt longer than the model's context, or
            invalid sampling settings.
    """
    from lmforge.data.formats import keep_end

    check_sampling(temperature, top_k, top_p, min_p)
    if max_new_tokens < 0:
        raise LmforgeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    max_len = context_length(model)
    ids = _check_prompt(prompt_ids, max_len, eos_id)
    stops = _stop_set(eos_id, stop_ids)
    device = next(model.parameters()).device
    generator = sampling_generator(device, seed)

    was_training = model.training
    model.eval()
    decode = functools.partial(compiled_decode_step, model) if compile else model
    penalise = penalties is not None and not penalties.off
    counts = seen = None  # (V,) made at the first step, when the logits give V
    try:
        new: list[int] = []
        cache = model.new_cache(batch_size=1) if use_cache else None
        x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T): the prompt, prefilled on the first step
        for step in range(max_new_tokens):
            if cache is not None and len(ids) <= max_len:
                # the prefill runs eagerly (a compiled one-token prefill at position 0 would be specialised
                # to it and compiled a second time for the decode steps)
                logits = (model if step == 0 else decode)(x, cache)[:, -1]  # (1, V)
            else:
                cache = None  # past the context: sliding window, full recompute (module docstring)
                window = keep_end(ids, max_len, prefix)  # the prefix (BOS) first, then the last tokens
                x = torch.tensor([window], dtype=torch.long, device=device)  # (1, <= max_seq_len)
                logits = model(x)[:, -1]
            logits = logits[:, :vocab_size]  # (1, V): the tokenizer's ids only
            if on_logits is not None:
                on_logits(logits)
            if penalise:
                if counts is None:
                    counts = torch.zeros(logits.shape[-1], device=device)
                    seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
                    seen[torch.tensor(ids, device=device)] = True
                logits = penalties.apply(logits, counts, seen)  # type: ignore[union-attr]
            chosen = sample_unchecked(logits, temperature, top_k, top_p, min_p, generator)  # (1,)
            x = chosen.view(1, 1)  # the next step's input stays a tensor (no list -> tensor per token)
            token = int(chosen)
            if penalise:
                counts[token] += 1  # type: ignore[index]
                seen[token] = True  # type: ignore[index]
            ids.append(token)
            new.append(token)
            if on_token is not None and on_token(token):
                break
            if token in stops:
                break
        return new
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate_batch(
    model: GPT,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    stop_ids: Collection[int] = (),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    vocab_size: int | None = None,
    penalties: Penalties | None = None,
    on_token: Callable[[int, int], bool | None] | None = None,
) -> list[list[int]]:
    """Continue several prompts of different lengths together, with one KV cache; return each one's new ids.

    The prompts are left-padded to the longest; `GPT.forward(..., pad=)` gives every row the positions
    its unpadded run would use and hides padding keys, so row b's greedy result is `generate()` on
    prompts[b] alone (up to float summation order in batched matmuls, ~1e-7 on the logits). A row that
    produced `eos_id` (or one of `stop_ids`) keeps being decoded (the batch stays rectangular) but its
    output ends at that token, which is included, as in `generate`; decoding stops when every row has
    ended or after `max_new_tokens`. Sampling (temperature > 0) draws all rows from one generator seeded by `seed`:
    reproducible for the same prompts and seed, but not the draws `generate` makes per prompt. With `seeds` instead
    (one per row), each row draws from its own generator seeded `seeds[b]`: row b's tokens are then those of
    `generate(prompts[b], seed=seeds[b])` (up to float rounding), whatever else is in the batch, which is what lets
    `lmforge generate --prompt-file` batch and resume rows in any `--batch-size`.
    Models without `pad` support (recurrent ones) fall back to one `generate` call per prompt (prompt b seeded
    with seeds[b], or seed + b, so the rows' draws differ there too). `vocab_size`,
    `penalties` (each row's own prompt and output): as in `generate`. `on_token(row, token)` is called with
    each token a row gets (until it ends); returning True ends that row there, as a stop id does.

    Raises:
        LmforgeError: an empty prompt without eos_id, invalid sampling settings, or a longest prompt
            that does not leave room for max_new_tokens in the model's context (no sliding window here).
    """
    check_sampling(temperature, top_k, top_p, min_p)
    if max_new_tokens < 0:
        raise LmforgeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if seeds is not None and (seed is not None or len(seeds) != len(prompts)):
        raise ValueError("generate_batch: give seed, or seeds with one seed per prompt; not both")
    row_seeds = (
        seeds if seeds is not None else [None if seed is None else (seed + b) % 2**63 for b in range(len(prompts))]
    )
    if not isinstance(model, GPT):
        return [
            generate(
                model,
                p,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                seed=row_seeds[b],  # (seed + b: one seed for all made equal prompts draw alike)
                eos_id=eos_id,
                stop_ids=stop_ids,
                vocab_size=vocab_size,
                penalties=penalties,
                on_token=None if on_token is None else functools.partial(on_token, b),
            )
            for b, p in enumerate(prompts)
        ]
    max_len = model.cfg.max_seq_len
    rows = [_check_prompt(p, max_len, eos_id) for p in prompts]
    stops = _stop_set(eos_id, stop_ids)
    if not rows or max_new_tokens == 0:
        return [[] for _ in rows]
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > max_len:  # (the rule and wording of serve, chat and eval: `prompt_too_long`)
        what = "the longest prompt is"
        raise LmforgeError(
            prompt_too_long(what, longest, max_len, max_new_tokens=max_new_tokens, flag="max_new_tokens")
        )
    device = next(model.parameters()).device
    # one generator for the batch, or one per row (`seeds`): a row's draws then do not depend on the other rows
    generator = sampling_generator(device, seed) if seeds is None else None
    generators = [] if seeds is None else [sampling_generator(device, s) for s in seeds]

    B = len(rows)
    pad_counts = [longest - len(r) for r in rows]
    pad = torch.tensor(pad_counts, dtype=torch.long, device=device) if any(pad_counts) else None  # (B,)
    # the padding id is irrelevant (masked); the row's first token keeps it in the vocabulary
    x = torch.tensor([[r[0]] * n + r for r, n in zip(rows, pad_counts, strict=True)], device=device)  # (B, longest)
    penalise = penalties is not None and not penalties.off
    counts = seen = None  # (B, V) made at the first step, when the logits give V
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(batch_size=B, max_len=longest + max_new_tokens - 1)
        out: list[list[int]] = [[] for _ in rows]
        done = [False] * B
        for _ in range(max_new_tokens):
            logits = model(x, cache, pad)[:, -1, :vocab_size]  # (B, V); the first step prefills the padded prompts
            if penalise:
                if counts is None:  # (a padding id is the row's first token: in its prompt all the same)
                    counts = torch.zeros_like(logits, dtype=torch.float32)
                    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, x, True)
                logits = penalties.apply(logits, counts, seen)  # type: ignore[union-attr]
            if seeds is None or temperature == 0:
                chosen = sample_unchecked(logits, temperature, top_k, top_p, min_p, generator)  # (B,)
            else:  # each row drawn as `generate` draws it alone, from its own generator; the filtering is per row
                # anyway (row b's probabilities equal a (1, V) call's), so it runs once for the batch
                probs = sampling_probs(logits, temperature, top_k, top_p, min_p)  # (B, V)
                chosen = torch.cat([torch.multinomial(probs[b : b + 1], 1, generator=g)
                                    for b, g in enumerate(generators)]).squeeze(-1)  # fmt: skip
            if penalise:
                counts[torch.arange(B), chosen] += 1  # type: ignore[index]
                seen[torch.arange(B), chosen] = True  # type: ignore[index]
            x = chosen.view(B, 1)
            for b, token in enumerate(chosen.tolist()):
                if not done[b]:
                    out[b].append(token)
                    # on_token first: it sees a row's stop id too, as `generate`'s on_token does
                    ended = on_token is not None and bool(on_token(b, token))
                    done[b] = token in stops or ended
            if all(done):
                break
        return out
    finally:
        model.train(was_training)


def _stop_set(eos_id: int | None, stop_ids: Collection[int]) -> frozenset[int]:
    """The ids a decode loop stops after: `eos_id` (unless None) and `stop_ids`."""
    return frozenset(stop_ids) | (frozenset() if eos_id is None else {eos_id})


def require_text_generator(path: str | Path, loaded: Any) -> None:
    """`generate`, `chat` and `serve` need a language model: not a classifier, not an encoder (BERT/ELECTRA).

    Raises:
        LmforgeError: what the run is, and what to do with it instead.
    """
    model = loaded.model
    if getattr(model, "head", None) is not None:
        raise LmforgeError(
            f"{path} is a classifier; it labels text instead: use 'lmforge eval {path} --task classify --data FILE'"
        )
    if not hasattr(getattr(model, "body", model), "new_cache"):
        raise LmforgeError(
            f"{path} holds an encoder (model.family {loaded.config.model.family!r}), which does not generate text; "
            "use 'lmforge eval' on it, or train a gpt/lstm/gru model to sample from"
        )


def prompt_text_ids(loaded: Any, text: str) -> list[int]:
    """Ids of a prompt's text for a loaded run (`adapt.load.Finetuned`), read as the run's `export --to hf`
    tokenizer and vLLM read it: special-token strings (<|endoftext|>, an imported model's <|im_start|>) become
    their ids, while lmforge's chat role markers (<|user|>, ...) stay text, as its chat template trained on them
    even where the tokenizer reserves them (--special-tokens all, unigram). No prefix (BOS) is added.

    `lmforge generate --prompt`, a `serve` completion's string prompt and its /tokenize all read text with it,
    so one prompt gives the same ids (and the same greedy text) through each."""
    return prompt_encoding(loaded, text).ids


def prompt_encoding(loaded: Any, text: str) -> Any:
    """`prompt_text_ids` as a `tokenizers.Encoding`: the ids and where each token is in `text` (`.offsets`)."""
    from lmforge.chat import JinjaChatTemplate

    if isinstance(loaded.template, JinjaChatTemplate):
        return loaded.tokenizer.encode_markup(text)
    return _markers_as_text(loaded.tokenizer).encode(text, add_special_tokens=False)


@functools.lru_cache(maxsize=4)
def _markers_as_text(tok: Any) -> Any:
    import tokenizers

    from lmforge.export.hf import without_chat_markers

    return tokenizers.Tokenizer.from_str(without_chat_markers(tok.to_str()))


def load_generator(path: str | Path, device: str = "auto", *, compile: bool = False) -> Any:  # noqa: A002
    """The run or checkpoint at `path`, loaded to generate text (`adapt.load.Finetuned`; any run: pretrained,
    LoRA adapters, soft prompt, ...), on `device` ("auto": the best there is); `compile`: the command's --compile.

    Raises:
        LmforgeError: a missing or broken checkpoint, a model that does not generate text, or --compile for a
            recurrent model: Dynamo cannot trace nn.LSTM/nn.GRU and runs them eagerly between its graphs, so
            compiling took ~20 s and each token then took ~25% longer (lstm, 2 x 256, 1 CPU thread: 2.3-2.4
            vs 1.7-1.9 ms)."""
    from lmforge.adapt.load import load_finetuned
    from lmforge.train.precision import pick_device

    loaded = load_finetuned(path, pick_device(device))
    require_text_generator(path, loaded)
    family = loaded.config.model.family
    if compile and family in ("lstm", "gru"):
        raise LmforgeError(
            f"--compile does not speed up a model.family {family} run (torch.compile cannot trace nn.{family.upper()}: "
            "it compiles for ~20 s, then each token is slower); drop --compile"
        )
    return loaded


def command_prompt_ids(loaded: Any, prompt: str, where: str) -> list[int]:
    """The ids `lmforge generate` continues for `prompt` (`prompt_text_ids`, after the tokenizer's prefix: an
    imported Llama's BOS, as transformers puts it first); an empty prompt starts a new document after an
    end-of-text token. `where` names the prompt in errors (the run's path, a prompt file's line).

    Raises:
        LmforgeError: an empty prompt with a tokenizer that has no end-of-text token, or a prompt longer
            than the model's context."""
    tokenizer = loaded.tokenizer
    eos_id = tokenizer.eos_id_or_none  # None: an imported tokenizer without one (module docstring)
    ids = tokenizer.prompt_prefix + prompt_text_ids(loaded, prompt)
    if not ids and eos_id is None:
        raise LmforgeError(
            f"{where}: the prompt is empty, and the run's tokenizer has no end-of-text token to start a new "
            "document after; give some text to continue (--prompt TEXT, or a non-empty prompt in --prompt-file)"
        )
    try:
        return _check_prompt(ids, context_length(loaded.model), eos_id)
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None


def completion_decoder(tokenizer: Any, prompt_ids: list[int]) -> Callable[[list[int]], str]:
    """`decode` for what `lmforge generate` shows of a continuation of `prompt_ids`: special tokens dropped,
    and (--ignore-eos) the documents after each end-of-text separated by a blank line."""
    eos_id = tokenizer.eos_id_or_none
    plain = functools.partial(tokenizer.decode, skip_special_tokens=True)
    after_prompt = continuation_decoder(plain, prompt_ids)

    def decode(ids: list[int]) -> str:
        docs, current = [], []
        for i in ids:
            if i == eos_id:
                docs.append(current)
                current = []
            else:
                current.append(i)
        first, *rest = [*docs, current]
        return "\n\n".join([after_prompt(first), *(plain(d) for d in rest)])

    return decode


def check_command(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float, seed: int | None
) -> None:
    """`lmforge generate`'s settings, checked before anything is printed (`generate` checks them again)."""
    check_sampling(temperature, top_k, top_p, min_p)
    check_max_new_tokens(max_new_tokens)
    check_seed(seed)


def generate_from_checkpoint(
    path: str | Path,
    *,
    prompt: str | None = None,
    prompt_file: str | Path | None = None,
    num_samples: int = 1,
    out: str | Path | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    use_cache: bool = True,
    compile: bool = False,  # noqa: A002 - the CLI flag's name
    stop_at_eos: bool = True,
    stop: Collection[str] = (),
    device: str = "auto",
    stream: TextIO | None = None,
    penalties: Penalties | None = None,
    progress: bool = False,
) -> str:
    """`lmforge generate`: continue `prompt` with the model of a run directory or checkpoint folder.

    The prompt is encoded as `serve` reads a completion's prompt (`prompt_text_ids`: an `<|endoftext|>` in
    it is the end-of-text id, not its characters); an empty prompt starts a new document after an
    end-of-text token, so it needs a tokenizer that has one. Generation stops at end-of-text
    (or one of the run's `stop_ids_of`) unless `stop_at_eos` is False, in which case it runs on into
    new documents, shown separated by a blank line. It also stops when the text contains one of the `stop`
    strings (`StopStrings`: matched on the decoded text, across tokens; the text ends before it). With
    `stream`, the prompt and then each completed piece of the continuation are written to it as they come
    (no trailing newline).

    `num_samples` > 1, a `prompt_file` ("-": stdin) or an `out` file: many completions, decoded `batch_size` (None:
    16) at a time and written when done (`generate_many`: the N samples of `prompt` as text, or a prompt file's
    completions as JSONL; with `out`, those finished are kept in `OUT.partial` meanwhile, which the same call
    continues after an interrupt or a kill), with a progress bar on stderr when `progress` (on a terminal only).

    Returns:
        The continuation text (special tokens skipped), exactly as streamed: a final end-of-text (or stop
        id) shows nothing, and a character cut off by `max_new_tokens` is dropped rather than shown as U+FFFD.
        With many completions: the text written (`generate_many`).

    Raises:
        LmforgeError: missing/broken checkpoint, prompt longer than the context, an empty prompt with
            a tokenizer that has no end-of-text token, bad settings, a bad prompt file.
    """
    many = prompt_file is not None or num_samples != 1 or out is not None
    if many:
        from lmforge.generate_many import generate_many, many_prompts

        prompts = many_prompts(path, prompt, prompt_file, num_samples, out, compile, batch_size)  # (before the load)
    elif batch_size is not None:
        raise LmforgeError("--batch-size is for --prompt-file and --num-samples (decoded in batches); drop it")
    check_command(max_new_tokens, temperature, top_k, top_p, min_p, seed)  # here too: before the prompt is echoed
    greedy = "--temperature 0" if temperature == 0 else "--top-k 1" if top_k == 1 else "--top-p 0" if top_p == 0 else ""
    if num_samples > 1 and greedy:  # N copies of one text, decoded N times over: surely not what was meant
        raise LmforgeError(
            f"--num-samples {num_samples} with {greedy} decodes the same text {num_samples} times (it keeps only the "
            "likeliest token); sample with --temperature > 0 (and no --top-k 1, --top-p 0), or drop --num-samples"
        )
    StopStrings.check(stop)  # (before the model loads)
    checkpoint = ""
    if out is not None:  # (read before the load: a run that trains on saves newer ones)
        from lmforge.generate_many import checkpoint_identity

        checkpoint = checkpoint_identity(path)
    loaded = load_generator(path, device, compile=compile)
    tokenizer = loaded.tokenizer
    stops = run_stops(loaded) if stop_at_eos else frozenset()
    # a model prepared with --normalize NFKC writes NFKC text: its stop strings are looked for in that form
    stop = [tokenizer.in_unicode_form(s) for s in stop]
    settings = dict(  # `generate`'s and `generate_batch`'s
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        eos_id=tokenizer.eos_id_or_none if stop_at_eos else None,
        stop_ids=stops,
        penalties=penalties,
        vocab_size=tokenizer.vocab_size,
    )
    use_cache = use_cache and loaded.use_cache  # a soft prompt decodes without a KV cache
    if many:
        return generate_many(loaded, prompts, num_samples, settings, stop=stop, seed=seed, use_cache=use_cache, out=out,
                             jsonl=prompt_file is not None, stream=stream, batch_size=batch_size,
                             progress=progress, checkpoint=checkpoint)  # fmt: skip
    prompt_ids = command_prompt_ids(loaded, prompt or "", str(path))
    cut = StopStrings(stop)
    decoder = StreamDecoder(completion_decoder(tokenizer, prompt_ids), tokenizer, prompt_ids)
    shown: list[str] = []  # the text as streamed: what is returned, too

    def show(text: str) -> None:
        shown.append(text)
        if stream is not None:
            stream.write(text)
            stream.flush()

    def on_token(token: int) -> bool:
        if token not in stops:  # the end, not a blank line before another document
            show(cut.feed(decoder.feed(token)))
        return cut.stopped

    if stream is not None:
        stream.write(prompt or "")
        stream.flush()
    try:  # its tokens arrive through on_token
        generate(loaded.model, prompt_ids, **settings, seed=seed, use_cache=use_cache, on_token=on_token,
                 compile=compile, prefix=tokenizer.prompt_prefix)  # fmt: skip
    except KeyboardInterrupt:
        if stream is not None:  # the text so far ends its line: "lmforge: interrupted" was glued to it
            stream.write("\n")
            stream.flush()
        raise
    cut.feed(decoder.flush())  # (a character cut by max_new_tokens is dropped, in the stream and the result)
    show(cut.flush())
    return "".join(shown)
