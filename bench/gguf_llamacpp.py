"""Run lmforge's GGUF export in llama.cpp itself (through llama-cpp-python) and compare it with lmforge.

For each run and each export type (f16, q8_0) it exports the run, loads the file in llama.cpp and checks,
against lmforge's own tokenizer and float32 model:
- tokens: llama.cpp's ids (BOS as the file's metadata says, special-token text parsed as text) for a few
  strings (English, Chinese, whitespace runs, newlines, `<|endoftext|>` typed as text) equal lmforge's
  `prompt_prefix + encode`;
- max |logit diff| over every position of the first prompt (llama.cpp with logits_all=True);
- greedy: 30 argmax tokens after the prompt, with no stop token, equal on both sides.

llama-cpp-python is best installed in its own venv (it builds llama.cpp from source); point --llama-cpp at
that venv's site-packages (appended to sys.path, so this venv's numpy and torch still win):

    python3 -m venv /tmp/llenv && /tmp/llenv/bin/pip install numpy llama-cpp-python
    PYTHONPATH=. python bench/gguf_llamacpp.py runs/llama runs/llama-zh \\
        --llama-cpp /tmp/llenv/lib/python3.11/site-packages
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import bench_cli  # bench/ is on sys.path when run as a script
import numpy as np
import torch

from lmforge.export.gguf import export_gguf
from lmforge.export.peft import load_exportable
from lmforge.generate import generate

TEXTS = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "贾宝玉和林黛玉在大观园里读《西厢记》。",
    "two  spaces,   three, \ttab and trailing  ",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "text <|endoftext|> with the end token typed in it",
    "it's 2024: 12345 + 6.7 = ?! Ünïcödé café 🙂",
]


def tokenizer_kind(spec: str) -> str:
    """'bpe', 'char', 'wordpiece' or 'unigram', as `lmforge prepare` trains them (from tokenizer.json)."""
    import json

    data = json.loads(spec)
    model = data["model"]["type"]
    if model == "BPE":
        return "bpe" if "ByteLevel" in json.dumps(data.get("pre_tokenizer")) else "char"
    return model.lower()


def compare(run: Path, dtype: str, prompt: str, n_new: int, llama_cpp) -> dict:
    """One row of the table: export `run` as `dtype`, load it in llama.cpp, compare with lmforge."""
    trained = load_exportable(run)
    model, tok = trained.model.float().eval(), trained.tokenizer
    row = {"run": run.name, "tokenizer": tokenizer_kind(tok.to_str()), "type": dtype}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        try:
            export_gguf(run, path, dtype=dtype)
        except Exception as e:  # a refused tokenizer or model: say why, under the table
            return row | {"result": f"export refused: {e}"}
        ctx = model.cfg.max_seq_len
        try:
            # use_mmap=False: the weights are read in before the temporary file goes
            llm = llama_cpp.Llama(
                str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=2, use_mmap=False, verbose=False
            )
        except Exception as e:
            return row | {"result": f"llama.cpp load failed: {e}"}

    same = 0
    for text in TEXTS:
        ours = tok.prompt_prefix + tok.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        same += ours == theirs
    row["tokens equal"] = f"{same}/{len(TEXTS)}"

    ids = tok.prompt_prefix + tok.encode(prompt)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].float().numpy()  # (T, V)
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    row["max |logit diff|"] = f"{np.abs(got - ref[:, : got.shape[1]]).max():.2e}"

    n_new = min(n_new, ctx - len(ids))
    ours_new = generate(model, ids, max_new_tokens=n_new, temperature=0)  # `lmforge generate --temperature 0`
    theirs_new = []
    for _ in range(n_new):
        theirs_new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs_new[-1]])
    row["greedy equal"] = "yes"
    if ours_new != theirs_new:  # where they part, how close lmforge's own scores of the two choices were
        k = next(i for i, (a, b) in enumerate(zip(ours_new, theirs_new, strict=True)) if a != b)
        with torch.no_grad():
            last = model(torch.tensor([ids + ours_new[:k]]))[0, -1]
        gap = float(last[ours_new[k]] - last[theirs_new[k]])
        row["greedy equal"] = f"no (token {k}: lmforge's logit gap {gap:.1e})"
    return row


def main() -> None:
    parser = bench_cli.parser(__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="Llama-style run directories (or checkpoints)")
    parser.add_argument("--llama-cpp", help="site-packages folder holding llama_cpp (appended to sys.path)")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--new-tokens", type=bench_cli.count(1), default=30)
    parser.add_argument("--prompt", default=TEXTS[0], help="text for the logits and the greedy continuation")
    args = parser.parse_args()
    if args.llama_cpp:
        sys.path.append(args.llama_cpp)
    try:
        import llama_cpp
    except ImportError:
        parser.error("llama_cpp is not importable: pip install llama-cpp-python, or pass --llama-cpp SITE")
    torch.set_num_threads(2)
    print(f"llama-cpp-python {llama_cpp.__version__}\n")
    cols = ["run", "tokenizer", "type", "tokens equal", "max |logit diff|", "greedy equal"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    notes = []
    for run in args.runs:
        for dtype in args.types:
            row = compare(run, dtype, args.prompt, args.new_tokens, llama_cpp)
            if "result" in row:  # refused or not loaded: the reason goes under the table, once per run
                notes += [f"{row['run']}: {row['result']}"] if dtype == args.types[0] else []
                row |= {c: "-" for c in cols[3:]} | {"tokens equal": row["result"].split(":")[0]}
            print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print("\n".join(["", *notes]) if notes else "")


if __name__ == "__main__":
    bench_cli.run(main)
