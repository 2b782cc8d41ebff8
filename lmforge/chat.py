"""Chat: the chat template (rendering with loss flags, the stored Jinja form) and `lmforge chat`.

Template (`lmforge-v1`), one turn after another, no separators beyond these:

    <|system|>\\n{content}\\n   <|user|>\\n{content}\\n   <|assistant|>\\n{content}<EOS>

Markers are ordinary text (no new vocabulary, so any base tokenizer works). Only assistant content
and its EOS are training targets. Each piece is tokenized on its own, so the ids at training time
and at chat time are the same and the loss mask lines up exactly with the assistant text. The same
template is written as Jinja to `tokenizer_config.json` (`chat_template`, the field Hugging Face
uses), so `apply_chat_template` in transformers renders identical text. A prompt to generate from
(`add_generation_prompt`) ends its past replies without the EOS when the tokenizer has none (an
imported one may not: `Tokenizer.eos_id_or_none`), so such a run still chats; training needs it.

An imported instruct model keeps its own Jinja template (`JinjaChatTemplate`, marked `hf-jinja` in
tokenizer_config.json by `export/hf_import.py`): rendered in jinja2's immutable sandbox as transformers'
`apply_chat_template` renders it (never code from a checkpoint), so prompts are the ids the model was
trained on; for sft its replies are located by rendering prefixes of the conversation.

`chat(...)` is the interactive loop: the history is re-rendered each turn and the oldest turns are
dropped until the prompt plus the reply budget fits the context (a message that does not fit beside the system message
and the reply alone is not sent: a notice says by how much to shorten it, as `generate` and `serve` refuse a prompt
longer than the context rather than cut it; a --system with no room for a message is refused at the start);
replies stream token by token;
`/reset` clears the history and `/exit` (or end of input) quits; another `/word` alone on a line (/quit, /help)
is answered with those two, not sent to the model; Ctrl-C during a reply stops that reply
(what was shown of it stays in the history) and the session goes on. In a terminal, lines are read with GNU
readline (`line_reader`: editing of wide characters, history, a pasted block as one message); it reads lines
from any text stream too, so tests drive it through stdin. With stdin not a terminal (`printf 'hi\n' | lmforge
chat RUN`, a script) there is no one to prompt: stdout holds the replies alone, each ending in a newline, and the
banner and notices go to stderr (piped output read `lmforge chat: RUN. ...\nyou> bot> hello\nyou> \n`).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

from lmforge.atomic import write_json
from lmforge.errors import ConfigError, DataError, first_line, interrupt_handled

TEMPLATE_NAME = "lmforge-v1"
HF_JINJA = "hf-jinja"  # `lmforge_chat_template` of a run that keeps an imported model's own Jinja template
ROLES = ("system", "user", "assistant")
# Each message is read as `openai_text_messages` reads it for chat, serve and sft files: a "developer" turn is the
# system turn and content sent as a list of text parts is their texts joined by newlines (`MESSAGE`). Without this,
# transformers' apply_chat_template on an export rendered a developer turn as "<|developer|>", a role never trained,
# and failed on text parts ("can only concatenate list (not "str") to list"), where serve renders both.
# (A namespace and a loop rather than filters: the constructs Llama 3's own template uses, which every Jinja subset
# that renders chat templates, llama.cpp's included, supports.)
MESSAGE = (
    "{% set role = 'system' if m['role'] == 'developer' else m['role'] %}"
    "{% set ns = namespace(content=m['content']) %}{% if m['content'] is not string %}{% set ns.content = '' %}"
    "{% for part in m['content'] %}{% set ns.content = ns.content + ('' if loop.first else '\\n') + part['text'] %}"
    "{% endfor %}{% endif %}{% set content = ns.content %}"
)
JINJA_TEMPLATE = (
    "{% for m in messages %}" + MESSAGE + "{{ '<|' + role + '|>\\n' }}"
    "{% if role == 'assistant' %}{{ content + eos_token }}{% else %}{{ content + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# The same for a tokenizer that puts a word-start mark ("▁") before every text it encodes (a Metaspace pre-tokenizer:
# lmforge's Unigram). `segments` encodes each piece on its own, so each starts with that mark; transformers encodes the
# rendered text whole, which marks only the first. Measured: 85 ids against the 92 trained on for a 4-message
# conversation ("<|user|>\nhi" instead of "<|user|>\n▁hi"). A space before each piece (unless it starts with one
# already, after the tokenizer's normalizer: SPACES, or is an empty reply, which encodes to nothing) is that mark.
SPACED_JINJA_TEMPLATE = (
    "{% for m in messages %}" + MESSAGE + "{{ ' <|' + role + '|>\\n' }}"
    "{% set piece = content if role == 'assistant' else content + '\\n' %}"
    "{% if piece and piece[:1] not in SPACES %}{{ ' ' }}{% endif %}{{ piece }}"
    "{% if role == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ ' <|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    name: str = TEMPLATE_NAME

    @property
    def jinja(self) -> str:
        """The template as Jinja, for `tokenizer_config.json` `chat_template` (exports)."""
        return JINJA_TEMPLATE

    def jinja_for(self, tok: Any) -> str:
        """`jinja` as written for `tok`: rendered and encoded whole (transformers' `apply_chat_template`), it gives
        the ids `segments` gives: `SPACED_JINJA_TEMPLATE` for a tokenizer that marks word starts, and a tokenizer
        that adds a BOS (an imported Llama-style one; `segments` puts it first) renders `{{ bos_token }}` first,
        as apply_chat_template adds no special tokens of its own. One place for the HF export, the run's
        tokenizer_config.json and serve's /tokenizer_info (the export alone had the BOS)."""
        if self.name != TEMPLATE_NAME:
            return self.jinja
        spaces = word_start_spaces(tok)
        text = SPACED_JINJA_TEMPLATE.replace("SPACES", json.dumps(spaces, ensure_ascii=False)) if spaces else self.jinja
        return "{{ bos_token }}" + text if len(tok.prompt_prefix) == 1 else text

    def segments(
        self, tok: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False, training: bool = True
    ) -> list:
        """[(ids, train)] pieces of a conversation; `train` is True for assistant content + EOS (not where the
        message has weight 0: `trains`). A conversation to
        train on (`training`, without a generation prompt) must hold an assistant turn; serve's /tokenize passes
        training=False to get any conversation's ids, as transformers' apply_chat_template gives them.

        Raises:
            DataError: a malformed conversation, or training pieces (no generation prompt) from a tokenizer
                without an end-of-text token.
        """
        check_messages(messages, allow_trailing_user=add_generation_prompt or not training)
        eos = tok.eos_id_or_none if add_generation_prompt else tok.eos_id  # (module docstring)
        # an imported Llama's BOS first, as `generate` puts it before a prompt (none for lmforge's tokenizers)
        out: list[tuple[list[int], bool]] = [(list(tok.prompt_prefix), False)] if tok.prompt_prefix else []
        for m in messages:
            out.append((tok.encode(f"<|{m['role']}|>\n"), False))
            if m["role"] == "assistant":
                out.append((tok.encode(m["content"]) + ([] if eos is None else [eos]), trains(m)))
            else:
                out.append((tok.encode(m["content"] + "\n"), False))
        if add_generation_prompt:
            out.append((tok.encode("<|assistant|>\n"), False))
        return out

    def prompt_length(self, tok: Any, messages: list[dict[str, str]]) -> int:
        """Tokens of `messages` rendered with the assistant prompt, before any turn is dropped or cut."""
        return sum(len(seg) for seg, _ in self.segments(tok, messages, add_generation_prompt=True))

    def system_fits(self, tok: Any, system: dict[str, str], budget: int, role: str = "user") -> bool:
        """Whether the system message and an empty `role` message with the assistant prompt fit in `budget`
        tokens: else `prompt_ids` keeps only the end of the ids, the system message's start cut."""
        return self.prompt_length(tok, [system, {"role": role, "content": ""}]) <= budget

    def prompt_ids(self, tok: Any, messages: list[dict[str, str]], *, budget: int) -> tuple[list[int], int]:
        """Ids of the conversation ending in an assistant prompt, oldest turns dropped to fit `budget`.

        A system message is kept: when it and the last message alone are over the budget, that message keeps
        its end (cut in characters, so its role marker stays and no token is split); the ids' start was cut,
        system message first. Returns (ids, number of messages dropped).
        """
        from lmforge.data.formats import keep_end
        from lmforge.data.qa import fit_context

        check_messages(messages, allow_trailing_user=True)  # before indexing into them
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(system) :]
        dropped = 0
        while True:
            segs = self.segments(tok, system + rest, add_generation_prompt=True)
            ids = [i for seg, _ in segs for i in seg]
            if len(ids) > budget and system and len(rest) == 1:
                last = rest[0]

                def n_tokens(content: str, role: str = last["role"]) -> int:
                    return self.prompt_length(tok, system + [{"role": role, "content": content}])

                if self.system_fits(tok, system[0], budget, last["role"]):  # (else its end is kept, below)
                    end = len(last["content"])
                    content = fit_context(last["content"], n_tokens, budget, (end, end))  # its last characters
                    segs = self.segments(tok, system + [{**last, "content": content}], add_generation_prompt=True)
                    return [i for seg, _ in segs for i in seg], dropped
            if len(ids) <= budget or len(rest) <= 1:
                return keep_end(ids, budget, tok.prompt_prefix), dropped  # a single overlong message keeps its end
            cut = 2 if len(rest) > 2 and rest[0]["role"] == "user" else 1  # a user/assistant pair at a time
            rest, dropped = rest[cut:], dropped + cut


@dataclass(frozen=True)
class JinjaChatTemplate(ChatTemplate):
    """An imported instruct model's own Jinja chat template (`HF_JINJA`), rendered as transformers'
    `apply_chat_template` renders it (`compile_jinja`) and encoded whole as transformers encodes it
    (`Tokenizer.encode_markup`: special-token strings become their ids, none are added: the template
    writes a BOS itself where the model wants one)."""

    name: str = HF_JINJA
    source: str = ""
    bos_token: str = ""
    eos_token: str = ""

    @property
    def jinja(self) -> str:
        return self.source

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`.

        Raises:
            DataError: the template refuses the conversation or fails on it.
        """
        try:
            return compile_jinja(self.source).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a template's own bug surfaces as any error (TypeError, UndefinedError...)
            raise DataError(
                f"the chat template fails on this conversation ({type(e).__name__}: {first_line(e)})"
            ) from None

    def segments(
        self, tok: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False, training: bool = True
    ) -> list:
        """[(ids, train)] pieces of a conversation, as `ChatTemplate.segments` (`training` too).

        With `add_generation_prompt` one piece, the whole prompt. Otherwise the conversation is encoded whole
        (the ids a prompt has) and each assistant reply is marked by rendering prefixes: what
        `render(messages[:i], add_generation_prompt=True)` holds is context, what `render(messages[:i + 1])`
        adds after it is the target (the reply and its end marker, e.g. `<|im_end|>`; whitespace the template
        writes after that marker is context, as the model stops at the marker). A token belongs where it starts.

        Raises:
            DataError: a malformed conversation, or a template whose renders are not prefixes of one another.
        """
        check_messages(messages, allow_trailing_user=add_generation_prompt or not training)
        if add_generation_prompt:
            return [(tok.encode_markup(self.render(messages, add_generation_prompt=True)).ids, False)]
        text = self.render(messages)
        spans = []  # (start, end) character ranges of the targets in `text`
        for i, m in enumerate(messages):
            if trains(m):
                context, upto = self.render(messages[:i], add_generation_prompt=True), self.render(messages[: i + 1])
                if not (text.startswith(upto) and upto.startswith(context)):
                    raise DataError(
                        "the chat template rewrites earlier turns as the conversation grows (a render is not a prefix "
                        "of the next), so the replies cannot be marked for training with this template"
                    )
                spans.append((len(context), max(len(context), len(upto.rstrip()))))
        enc = tok.encode_markup(text)
        out: list[tuple[list[int], bool]] = []
        for token_id, (start, _) in zip(enc.ids, enc.offsets, strict=True):
            train = any(a <= start < b for a, b in spans)
            if out and out[-1][1] == train:
                out[-1][0].append(token_id)
            else:
                out.append(([token_id], train))
        return out


def word_start_spaces(tok: Any) -> str:
    """The characters a text may start with that `tok` reads as its word-start mark, so that it puts no other one
    before it: "" when it marks none (byte-level BPE, char, WordPiece), else the space, the mark "▁" itself and the
    spaces its normalizer turns into one (NFKC's U+3000 ideographic space)."""
    config = json.loads(tok.to_str())

    def marks(node: Any) -> bool:  # a Metaspace pre-tokenizer (maybe in a Sequence) that prepends its mark
        if not isinstance(node, dict):
            return False
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never") != "never"
        return any(marks(child) for child in node.get("pretokenizers") or [])

    if not marks(config.get("pre_tokenizer")):
        return ""
    normalizer = tok.hf.normalizer
    candidates = " \u2581\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"
    return "".join(c for c in candidates if (normalizer.normalize_str(c) if normalizer else c) in (" ", "\u2581"))


def check_messages(messages: Any, *, allow_trailing_user: bool = False) -> None:
    """A conversation is a non-empty list of {role, content} with at least one assistant turn to learn."""
    if not isinstance(messages, list):  # (a string, or JSON null)
        kind = "null" if messages is None else type(messages).__name__
        raise DataError(f"'messages' must be a list of {{role, content}} objects, not {kind}")
    if not messages:
        raise DataError("empty conversation: 'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        # the message as JSON, as the file or request wrote it (it was Python's repr: None for null, single quotes)
        shown = json.dumps(m, ensure_ascii=False)
        shown = f"{i} {shown if len(shown) <= 60 else shown[:57] + '...'}"
        if not isinstance(m, dict):
            raise DataError(f"bad message {shown}: each message is an object with a 'role' and a 'content' string")
        if m.get("role") not in ROLES:
            raise DataError(
                f"bad message {shown}: its 'role' must be system, user or assistant (developer reads as system), not "
                f"{json.dumps(m.get('role'), ensure_ascii=False)}; tool turns are not supported"
            )
        if not isinstance(m.get("content"), str):
            got = json.dumps(m.get("content"), ensure_ascii=False)[:20] if "content" in m else "nothing"
            raise DataError(f"bad message {shown}: its 'content' must be a string (or a list of text parts), not {got}")
        if m.get("weight", 1) not in (0, 1) or isinstance(m.get("weight"), bool):
            raise DataError(
                f"bad message {shown}: 'weight' is 0 (not trained on) or 1, as in OpenAI's fine-tuning files"
            )
    if not allow_trailing_user and not any(m["role"] == "assistant" for m in messages):
        raise DataError("conversation has no assistant turn, so nothing to learn; add one or drop the row")
    if not allow_trailing_user and not any(map(trains, messages)):
        raise DataError("every assistant turn has weight 0, so nothing to learn; set a weight to 1 or drop the row")


# ShareGPT's speakers ({"from", "value"} turns: ShareGPT, Vicuna and LLaMA-Factory's "sharegpt" files) as roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def sharegpt_messages(messages: Any) -> Any:
    """ShareGPT's turns, `{"from": "human", "value": "..."}`, as the chat template's {role, content}: human is
    the user, gpt the assistant. A list of any other form is returned as it is (for `check_messages`). Before,
    a ShareGPT file was told to rename its column to 'messages' and was then refused turn by turn.

    Raises:
        DataError: a speaker that is not a chat role (a tool call, an observation), said with what to do.
    """
    if not (isinstance(messages, list) and messages):
        return messages
    if not all(isinstance(m, dict) and "from" in m and "value" in m and "role" not in m for m in messages):
        return messages
    out = []
    for m in messages:
        role = SHAREGPT_ROLES.get(str(m["from"]).strip().lower())
        if role is None:
            raise DataError(
                f"a ShareGPT turn from {str(m['from'])[:30]!r}: only {', '.join(SHAREGPT_ROLES)} turns are chat "
                "turns; drop the row or turn it into those"
            )
        out.append({"role": role, "content": m["value"]})
    return out


# a turn of an Anthropic HH-RLHF transcript: "\n\nHuman: ..." / "\n\nAssistant: ..."
_TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def transcript_messages(messages: Any) -> Any:
    """An HH-RLHF transcript (a string of "\n\nHuman: ..." and "\n\nAssistant: ..." turns, the form of its
    chosen/rejected columns) as user/assistant messages, so `--task sft --field messages=chosen` trains on its
    dialogues; anything else is returned as it is (for `check_messages`). Before, such a column was refused as
    "'messages' must be a list ..., not str"."""
    if not isinstance(messages, str) or not _TRANSCRIPT_TURN.match(messages.lstrip(" ")):
        return messages
    parts = _TRANSCRIPT_TURN.split(messages.lstrip(" "))  # ["", speaker, text, speaker, text, ...]
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": text.strip()} for who, text in zip(parts[1::2], parts[2::2], strict=True)]


def openai_text_messages(messages: Any) -> Any:
    """OpenAI's newer message forms as the chat template's {role, content} strings: a "developer" turn is
    the system prompt (OpenAI renamed it for its o-series models), and content sent as a list of text parts
    (what the current client types and many frameworks send, and OpenAI's fine-tuning files may hold) is their
    texts joined by newlines, as vLLM does. Anything else (tool turns, ...) is left for `check_messages` to refuse.

    Raises:
        DataError: a content part that is not text (an image, audio).
    """
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and (m.get("role") == "developer" or isinstance(m.get("content"), list)):
            m = {**m, "role": "system" if m.get("role") == "developer" else m.get("role")}
            if isinstance(m.get("content"), list):
                parts = m["content"]
                if not all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts
                ):
                    raise DataError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                m["content"] = "\n".join(p["text"] for p in parts)
        out.append(m)
    return out


def file_messages(messages: Any) -> Any:
    """A task file's conversation (sft's `messages`, DPO's lists) in the template's form: OpenAI's forms as
    `openai_text_messages` reads them; a key other than role and content that is null is absent (Parquet stores a
    list of messages as one struct type, so a key one message has, a `weight` or a `name`, is null in all the others:
    `"weight": null` was refused as neither 0 nor 1, and a DPO pair whose chosen side alone had a key was skipped as
    forked); a number or bool content is its JSON text (`formats.scalar_text`: 4, 3.5, true), as sft's `output`
    reads it. (`serve` keeps OpenAI's request rules.)"""
    from lmforge.data.formats import scalar_text

    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict):  # (a null role or content stays, for `check_messages` to refuse)
            m = {k: v for k, v in m.items() if v is not None or k in ("role", "content")}
            content = m.get("content")
            if isinstance(content, (int, float)) and math.isfinite(content):  # (NaN, inf: refused as no text)
                m["content"] = scalar_text(content)
        out.append(m)
    return openai_text_messages(out)


def trains(message: dict[str, Any]) -> bool:
    """Whether a message is a training target: an assistant reply, unless its `weight` is 0 (OpenAI's fine-tuning
    format marks a reply to keep as context, not to learn, so; training on it silently taught what was excluded)."""
    return message["role"] == "assistant" and message.get("weight", 1) == 1


def save_tokenizer_config(run_dir: Path, tok: Any, template: ChatTemplate | None = None) -> None:
    """Write `tokenizer_config.json` with the chat template (HF's field name) next to tokenizer.json: lmforge's,
    or a `JinjaChatTemplate` (a fine-tune of an imported instruct model keeps its base's)."""
    if isinstance(template, JinjaChatTemplate):
        write_json(
            Path(run_dir) / "tokenizer_config.json",
            hf_template_config(template.source, template.bos_token, template.eos_token),
        )
        return
    write_json(
        Path(run_dir) / "tokenizer_config.json",
        {
            "chat_template": ChatTemplate().jinja_for(tok),
            "lmforge_chat_template": TEMPLATE_NAME,
            "eos_token": tok.id_to_token(tok.eos_id),
            **({"bos_token": tok.id_to_token(tok.prompt_prefix[0])} if len(tok.prompt_prefix) == 1 else {}),
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )


def hf_template_config(source: str, bos_token: str, eos_token: str) -> dict[str, str]:
    """`tokenizer_config.json` of a run that keeps an HF model's Jinja chat template (import, its fine-tunes)."""
    return {
        "chat_template": source,
        "lmforge_chat_template": HF_JINJA,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


@lru_cache(maxsize=8)
def compile_jinja(source: str) -> Any:
    """A chat template compiled as transformers' `apply_chat_template` does: jinja2's immutable sandbox (a
    template from a checkpoint never runs code), trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`
    and a `tojson` that keeps non-ASCII text; `{% generation %}` blocks render their body.

    Raises:
        jinja2.TemplateError: the template does not parse.
    """
    from datetime import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # transformers' assistant-mask tag; here it only renders its body
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise DataError(
            f"the chat template refuses this conversation: {str(message).splitlines()[0] if message else ''}"
        )

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def load_template(run_dir: Path) -> ChatTemplate | None:
    """The run's chat template, or None when it was not chat-tuned."""
    path = Path(run_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    name = data.get("lmforge_chat_template")
    if name == HF_JINJA:
        source, bos, eos = (data.get(k) for k in ("chat_template", "bos_token", "eos_token"))
        if not isinstance(source, str) or not all(isinstance(t, str) for t in (bos, eos)):
            raise DataError(
                f"{path}: 'chat_template', 'bos_token' and 'eos_token' must be strings; import the model again"
            )
        return JinjaChatTemplate(source=source, bos_token=bos, eos_token=eos)
    if name != TEMPLATE_NAME:
        raise DataError(f"{path}: unknown chat template {name!r}; this lmforge reads {TEMPLATE_NAME}")
    return ChatTemplate()


def line_reader(stdin: TextIO, stdout: TextIO, prompt: str = "you> ") -> Any:
    """A function that prompts `prompt` and returns the next line with its newline ("" at the end of input).

    In a terminal it is `input()` with GNU readline: the terminal's own line editing erased one byte per
    backspace, so a Chinese character left two of its three bytes behind (the line was then refused as not
    UTF-8) and the cursor lost its place over wide characters; readline erases whole characters, moves with
    the arrow keys, recalls earlier messages, and takes a pasted block of lines as one message (bracketed paste).
    Elsewhere (a pipe, a file, a test's stream, or a Python without readline) it reads `stdin` line by line."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty() and stdout.isatty():
        try:
            import readline  # noqa: F401 - importing it gives input() its line editing
        except ImportError:  # (Windows, a Python built without it)
            pass
        else:

            def read_edited() -> str:
                try:
                    return input(prompt) + "\n"  # (decoded with stdin's errors: surrogate escapes as below)
                except EOFError:
                    return ""

            return read_edited

    def read() -> str:
        if prompt:
            stdout.write(prompt)
            stdout.flush()
        return stdin.readline()

    return read


DEFAULT_REPLY_TOKENS = 200  # chat's reply length when --max-new-tokens is not given


def chat(
    run: str | Path,
    *,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    system: str = "",
    max_new_tokens: int | None = None,
    temperature: float = 0.7,
    top_k: int = 50,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    device: str = "auto",
    compile: bool = False,  # noqa: A002 - the CLI flag's name
    penalties: Any = None,
    interactive: bool | None = None,
) -> int:
    """`lmforge chat RUN_DIR`: an interactive conversation; returns the number of replies given.
    `penalties`: a `sampling.Penalties`, applied within each reply. `interactive`: prompt (`you> `, `bot> `) and
    write the banner and notices to `stdout`, as a terminal needs; off, `stdout` gets the replies alone, each
    ending in a newline, and the rest goes to stderr. None: whether `stdin` is a terminal."""
    from lmforge.detokenize import StreamDecoder
    from lmforge.generate import (
        context_length,
        generate,
        load_generator,
        prompt_too_long,
        run_stops,
    )
    from lmforge.sampling import check_max_new_tokens, check_sampling, check_seed

    check_sampling(temperature, top_k, top_p, min_p)  # before loading, not after the first message is typed
    check_seed(seed)
    given = max_new_tokens is not None  # (None: 200, capped to half the context without a note)
    max_new_tokens = DEFAULT_REPLY_TOKENS if max_new_tokens is None else max_new_tokens
    check_max_new_tokens(max_new_tokens)
    if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 (a GBK terminal) arrive as surrogate escapes
        stdin.reconfigure(errors="surrogateescape")
    ft = load_generator(run, device, compile=compile)
    tok, model = ft.tokenizer, ft.model
    stops = run_stops(ft)  # eos and an imported instruct model's end of turn
    template = ft.template or ChatTemplate()
    context = context_length(model)  # a recurrent model's has no limit
    if max_new_tokens > context // 2 and given:  # the other half holds the history (it was capped without a word)
        print(
            f"note: --max-new-tokens {max_new_tokens} is more than half the model's context ({context} tokens); "
            f"replies are capped at {context // 2} tokens, the other half holds the conversation",
            file=sys.stderr,
            flush=True,
        )
    max_new_tokens = min(max_new_tokens, context // 2)
    budget = context - max_new_tokens  # the prompt's tokens, beside the reply's
    if system and not template.system_fits(tok, {"role": "system", "content": system}, budget):
        raise ConfigError(
            f"--system is {template.prompt_length(tok, [{'role': 'system', 'content': system}])} tokens with the chat "
            f"template, and the model's context ({context} tokens) leaves {budget} beside a {max_new_tokens}-token "
            "reply, with no room for a message: shorten --system (or lower --max-new-tokens)"
        )
    if interactive is None:
        interactive = stdin.isatty()
    notices = stdout if interactive else sys.stderr  # piped: stdout is the replies alone, for the script reading it
    note = "" if ft.template else " (this run was not chat-tuned; replies may ramble)"
    notices.write(f"lmforge chat: {run}{note}. /reset clears the history, /exit quits.\n")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    read_line = line_reader(stdin, stdout, "you> " if interactive else "")
    replies = 0
    while True:
        line = read_line()
        if any("\ud800" <= ch <= "\udfff" for ch in line):  # undecodable bytes (surrogate escapes)
            notices.write("(that line is not valid UTF-8; set the terminal to UTF-8 and type it again)\n")
            continue
        # the message as typed: a file piped in may start with a byte-order mark and end its lines with \r\n,
        # which went into the message ("hi\r" got another reply than "hi")
        text = line.removeprefix("\ufeff").rstrip("\r\n")
        if not line or text.strip() == "/exit":
            stdout.write("\n" if not line and interactive else "")  # (ends the prompt's line)
            break
        if text.strip() == "/reset":
            history = history[:1] if system else []
            notices.write("(history cleared)\n")
            continue
        if re.fullmatch(r"/[A-Za-z]+", text.strip()):  # /quit, /bye, /help: they went to the model as a message
            notices.write(f"(no command {text.strip()}: /reset clears the history, /exit or Ctrl-D quits)\n")
            continue
        if not text.strip():
            continue
        message = {"role": "user", "content": text}
        # a message the model cannot see whole is not sent, as generate and serve refuse such a prompt: with its
        # start cut (as before) the reply answered a text the user had not written; older turns are dropped instead
        alone = template.prompt_length(tok, history[:1] + [message] if system else [message])
        if alone > budget:
            what = f"with {'the system message and ' if system else ''}the chat template the message is"
            flag = "--max-new-tokens"  # (the reply's room: given, or the default capped to half the context)
            refusal = prompt_too_long(what, alone, context, max_new_tokens=max_new_tokens, flag=flag)
            notices.write(f"(message not sent: {refusal})\n")
            notices.flush()
            continue
        history.append(message)
        ids, dropped = template.prompt_ids(tok, history, budget=budget)
        if dropped:
            history = history[:1] + history[1 + dropped :] if system else history[dropped:]
        stream = StreamDecoder(lambda t: tok.decode(t, skip_special_tokens=True), tok)
        stdout.write("bot> " if interactive else "")

        def on_token(t: int, stream: StreamDecoder = stream) -> None:
            if t not in stops:
                stdout.write(stream.feed(t))
                stdout.flush()

        try:
            generate(
                model,
                ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                # reply i with seed + i (as serve's choice j): with one seed for every reply, each drew the same
                # random numbers, so a question asked again after /reset got the same reply, and others its echo
                seed=None if seed is None else (seed + replies) % 2**63,
                use_cache=ft.use_cache,
                eos_id=tok.eos_id_or_none,
                stop_ids=stops,
                on_token=on_token,
                compile=compile,
                penalties=penalties,
                vocab_size=tok.vocab_size,
            )
        except KeyboardInterrupt:  # Ctrl-C during a reply stops the reply, not the session (it ended it)
            interrupt_handled()
            stdout.write(stream.flush() + ("\n(reply stopped; /exit or Ctrl-D quits)" if interactive else ""))
            if not interactive:
                notices.write("(reply stopped)\n")
        stdout.write(stream.flush() + "\n")
        stdout.flush()
        # as printed: a character cut off by max_new_tokens is dropped (StreamDecoder.flush), not kept as U+FFFD
        # (the reply's tokens but the stop ids, also when Ctrl-C stopped it)
        reply = stream.shown
        history.append({"role": "assistant", "content": reply})
        replies += 1
    return replies
