"""The console table of `lmforge estimate`: `format_estimate` turns `lmforge.estimate.estimate`'s result into the
lines the command prints (`--json` prints the result itself). Moved out of estimate.py, which keeps the planning;
the numbers' formats (`format_count`, `format_bytes`) are `estimate_memory`'s."""

from __future__ import annotations

from typing import Any

from lmforge.estimate import CHINCHILLA_TOKENS_PER_PARAM
from lmforge.estimate_adapt import ADAPT_NAMES
from lmforge.estimate_memory import format_bytes, format_count


def format_estimate(result: dict[str, Any]) -> str:
    """A readable multi-line summary of `estimate()`'s result, for the console."""
    r, m, mem = result, result["model"], result["memory_bytes"]
    kv = f" ({m['n_kv_head']} kv)" if m["n_kv_head"] != m["n_head"] else ""
    diloco = f", every {r['sync_every']} steps" if r["strategy"] == "diloco" else ""
    multi = r["world_size"] > 1 or diloco
    devices = f"{r['world_size']} x {r['hardware']}" + (f", {r['strategy']}{diloco}" if multi else "")
    lines = [
        f"model        {m['n_layer']} layers, d_model {m['d_model']:,}, {m['n_head']} heads{kv}, d_ff {m['d_ff']:,}, "
        f"vocab {m['vocab_size']:,}, {m['pos_emb']}/{m['norm']}/{m['mlp']}"
        + (", tied" if m["tie_embeddings"] else ", untied"),
        f"parameters   {format_count(r['params'])} total, {format_count(r['non_embedding_params'])} non-embedding"
        + (
            f"; {ADAPT_NAMES[r['adapt']]}: {format_count(r['trainable_params'])} trainable"
            if r.get("adapt", "full") != "full"
            else ""
        ),
        f"batch        {r['batch_size']} x {r['seq_len']} tokens per step (micro-batch {r['micro_batch_size']}), "
        f"{_big(r['steps'], '{:,}')} steps, {r['dtype']}, {r['optimizer']}",
        f"tokens       {format_count(r['tokens'])} ({_big(r['tokens'] / r['params'], '{:.1f}')} per parameter; "
        f"Chinchilla-optimal {format_count(r['chinchilla_tokens'])} = {CHINCHILLA_TOKENS_PER_PARAM} x params)",
        f"compute      {r['train_flops']:.3g} FLOPs ({r['flops_per_token']:.3g} per token, "
        f"attention {100 * r['attention_flops_share']:.1f}%)",
        f"memory       per device ({devices}):",
    ]
    rows = [
        ("weights", mem["weights"]),
        ("gradients", mem["gradients"]),
        ("optimizer", mem["optimizer"]),
        ("autocast copies", mem["autocast_copies"]),
        ("comm buffers", mem["comm_buffers"]),
        ("outer state (diloco)", mem["outer_state"]),
        ("activations", mem["activations"]),
        ("activations, checkpointed", mem["activations_checkpointed"]),
        ("log-step weight copy", mem["update_copy"] if mem["update_copy"] > mem["activations_checkpointed"] else 0),
        ("teacher weights", mem.get("teacher_weights", 0)),
        ("soft targets (distill)", mem.get("soft_targets", 0)),
        ("total", mem["total"]),
        ("total, checkpointed", mem["total_checkpointed"]),
    ]
    lines += [f"  {name:<26}{format_bytes(value):>12}" for name, value in rows if value or name.startswith("total")]
    lines += [
        f"hardware     {r['hardware']}: peak {r['peak_flops'] / 1e12:.4g} TFLOP/s ({r['peak_source']}), "
        f"MFU {r['mfu']:.2f}",
    ]
    if r.get("comm_bytes"):  # (0 on one device)
        lines.append(f"communication {format_bytes(r['comm_bytes'])} sent and received per device over the run")
    c = r["communication"]
    if r["world_size"] > 1:
        per = "sync" if r["strategy"] == "diloco" else "step"
        lines.append(
            f"comm time    {format_bytes(c['bytes_per_sync'])} sent per device per {per}: {c['collectives']}; "
            + (
                "not included (pass --interconnect)"
                if c["sync_s"] is None
                else f"{_duration(c['sync_s'])} per {per} over {c['interconnect']}, {_duration(c['time_s'])} in all, "
                + (
                    f"{_duration(c['exposed_s'])} not hidden behind compute"
                    if c["exposed_s"]
                    else "all hidden by compute"
                )
            )
        )
    exposed = c["exposed_s"]
    lines += [
        f"time         {_duration(r['time_s'])} on {r['world_size']} device{'s' if r['world_size'] > 1 else ''}"
        + (f" ({_duration(r['compute_time_s'])} compute + {_duration(exposed)} communication)" if exposed else ""),
        "cost         "
        + (
            "unknown (pass a price per device-hour)"
            if r["cost_usd"] is None
            else f"${_big(r['cost_usd'], '{:,.2f}')} at ${r['price_per_hour']:g} per device-hour"
        ),
    ]
    lines += ["assumptions"] + [f"  - {a}" for a in r["assumptions"]]
    return "\n".join(lines)


def _big(n: float, fmt: str) -> str:
    """`fmt` for ordinary numbers; 3 significant digits in scientific notation from 1e15 on (--tokens 1e30 gave
    a 25-digit step count and cost)."""
    return fmt.format(n) if abs(n) < 1e15 else f"{n:.3g}"


def _duration(seconds: float) -> str:
    if 0 < seconds < 0.1:  # (a step's communication: "0.0 s" said nothing)
        return f"{seconds * 1000:.3g} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, hours, days = seconds / 60, seconds / 3600, seconds / 86400
    if minutes < 60:
        return f"{minutes:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    if days < 730:
        return f"{days:.1f} days"
    years = days / 365.25  # (--tokens 1e30 read "24998314796090327040.0 days")
    return f"{years:.1f} years" if years < 1e4 else f"{years:.3g} years"
