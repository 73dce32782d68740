"""The Ollama `Modelfile` written beside a GGUF export: `ollama create NAME -f Modelfile` serves the model.

Ollama prompts with Go templates, not the Jinja chat templates transformers and llama.cpp read, and a Jinja
template cannot be translated in general. So the TEMPLATE is written for the prompt families velora knows: the
Alpaca prompt (data/templates.py, for runs trained on it), ChatML (`<|im_start|>`: SmolLM2, Qwen) and Llama 3
(`<|start_header_id|>`), each turn for turn as its Jinja renders it; a plain-text model gets `{{ .Prompt }}`. Any
other chat template is left to Ollama, which reads `tokenizer.chat_template` from the GGUF file itself. A default
system message (the recipe's, or the one the chat template inserts on its own) becomes SYSTEM, which Ollama puts
first when a request has none. Stop strings end an answer where the prompt format starts a new turn.
"""

from __future__ import annotations

import re
from typing import Any

from velora_cli.common.bounds import clip
from velora_cli.common.errors import UsageError
from velora_cli.data.templates import ALPACA_PREAMBLE, ALPACA_TURN_END, ALPACA_TURN_HEAD, ALPACA_TURN_TAIL, PromptStyle

MODELFILE = "Modelfile"
NUM_CTX_CAP = 4096  # Ollama allocates the KV cache for num_ctx up front; a 128k context would not fit a laptop

_ALPACA = (
    f"{{{{ if .System }}}}{{{{ .System }}}}{{{{ else }}}}{ALPACA_PREAMBLE}{{{{ end }}}}\n\n"
    f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{ALPACA_TURN_HEAD}{{{{ .Content }}}}{ALPACA_TURN_TAIL}'
    f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{ALPACA_TURN_END}{{{{ end }}}}{{{{ end }}}}'
)
_CHATML = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
_LLAMA3 = (
    "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_FAMILIES = {  # marker in the Jinja template -> (Go template, stop strings, the default system message's pattern)
    "<|im_start|>": (_CHATML, ["<|im_start|>", "<|im_end|>"], r"<\|im_start\|>system\n(.*?)<\|im_end\|>"),
    "<|start_header_id|>": (
        _LLAMA3,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
    ),
}


def _quoted(text: str, what: str) -> str:
    """`text` as Ollama's Modelfile parser (parser/parser.go ParseFile) reads it back unchanged, else UsageError.

    That parser has no escapes. A value opened by three double quotes ends at the first line break where the text so
    far, trailing spaces trimmed, ends in three double quotes; spaces, tabs and line breaks inside are kept, and any
    other character Go's strconv.IsPrint rejects is dropped. So a value ending in a double quote reads back as it is
    (the parser ends it at the line break after the closing quotes), and these two kinds are refused."""
    for i, c in enumerate(text):
        head = ('"""' + text[:i]).rstrip()
        if c in "\r\n" and len(head) >= 6 and head.endswith('"""'):
            why = f"has three double quotes at the end of line {text[:i].count(chr(10)) + 1}"
            break
        if not (c.isprintable() or c in "\t\r\n"):
            why = f"has the unprintable character {c!r}"
            break
    else:
        return f'"""{text}"""'
    raise UsageError(f"Modelfile {what} {clip(text)}: {why}, which Ollama's Modelfile parser cannot read back")


def _stop(text: str) -> str:
    """A stop string in one pair of quotes when the parser reads that back (spaces are kept: only a line break ends a
    value), else in three."""
    plain = text and not f'"{text}"'.startswith('"""') and all(c.isprintable() or c == "\t" for c in text)
    return f'"{text}"' if plain else _quoted(text, "stop string")


def _template_default_system(tokenizer: Any, pattern: str) -> str | None:
    """The system message a chat template writes by itself when a conversation has none (SmolLM2 does)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    found = re.search(pattern, rendered, flags=re.DOTALL)
    return found.group(1) if found else None


def modelfile(gguf_name: str, style: PromptStyle, tokenizer: Any, context_length: int) -> str:
    """The Modelfile text for a GGUF file `gguf_name` in the same directory."""
    template, stops, system = None, [], style.system
    if style.kind == "alpaca":
        template, stops = _ALPACA, [ALPACA_TURN_HEAD.strip()]
    elif style.kind == "raw":
        template = "{{ .Prompt }}"
    else:
        chat_template = tokenizer.chat_template or ""
        family = next((f for marker, f in _FAMILIES.items() if marker in chat_template), None)
        if family is not None:
            template, stops, pattern = family
            system = system or _template_default_system(tokenizer, pattern)
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops = [*stops, tokenizer.eos_token]
    lines = [f"# Ollama: ollama create NAME -f {MODELFILE}", f"FROM ./{gguf_name}"]
    if template is None:
        lines.append("# No TEMPLATE: Ollama uses the chat template stored in the GGUF file.")
    else:
        lines.append(f"TEMPLATE {_quoted(template, 'TEMPLATE')}")
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'SYSTEM (data.system_prompt or the chat template default)')}")
    lines += [f"PARAMETER stop {_stop(stop)}" for stop in stops]
    lines.append(f"PARAMETER num_ctx {min(context_length, NUM_CTX_CAP)}")
    return "\n".join(lines) + "\n"


def serve_commands(folder: Any, name: str, gguf_name: str) -> list[str]:
    """The exact commands that serve a GGUF export: Ollama through its Modelfile, llama.cpp's chat on the file (its
    chat template, the one the run trained with, is in the GGUF metadata)."""
    import shlex

    tag = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "velora"  # Ollama's model-name alphabet
    return [
        f"ollama create {tag} -f {shlex.quote(f'{folder}/{MODELFILE}')} && ollama run {tag}",
        f"llama-cli -m {shlex.quote(f'{folder}/{gguf_name}')} -cnv",
    ]
