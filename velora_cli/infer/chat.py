"""`velora chat`: a read-answer loop over infer/generate.py, with the conversation kept between turns.

Answers stream to stdout as they are decoded; the banner and notices go to stderr, and the `> ` prompt is shown
only on a terminal, so a chat driven through a pipe (`printf 'hi\\n/exit\\n' | velora chat RUN`) prints answers
only. `/reset` forgets the conversation, `/exit` (or `/quit`, end of input, Ctrl-C) ends it with exit code 0.
When a conversation outgrows the model's context, its oldest turns are dropped.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console

from velora_cli.common.errors import UsageError
from velora_cli.data.templates import render
from velora_cli.infer.generate import Loaded, Sampling, answer, cut_notice, load_for_command, prompt_ids

MAX_LINE = 1 << 20  # characters in one message read from stdin
COMMANDS = "/reset forgets the conversation, /exit quits"


def _read(source: TextIO, interactive: bool) -> str | None:
    """The next line of input, or None at its end."""
    if interactive:
        try:
            return input("> ")  # readline editing and history on a terminal
        except EOFError:
            return None
    try:
        line = source.readline(MAX_LINE + 1)
    except UnicodeDecodeError as exc:
        raise UsageError(f"<stdin>: not UTF-8 text (byte {exc.start} of the input read so far: {exc.reason})") from None
    if len(line) > MAX_LINE:  # binary input without newlines would otherwise be read until memory runs out
        raise UsageError(f"<stdin>: a line longer than {MAX_LINE} characters; a message is one line of text")
    return line if line else None


def _fit(loaded: Loaded, history: list[dict[str, str]], system: str | None, room: int):
    """The prompt ids of the conversation, its oldest turns dropped until the answer has `room` tokens of
    context left (None if even the last message alone leaves too little)."""
    limit = loaded.max_positions
    while True:
        ids = prompt_ids(loaded, render(loaded.style, loaded.tokenizer, history, system))
        if limit is None or ids.shape[1] + room <= limit:
            return ids, history
        if len(history) <= 1:
            return None, history
        history = history[2:]  # one user turn and its answer


def run_chat(
    reference: str,
    sampling: Sampling,
    *,
    system: str | None = None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
) -> None:
    """`velora chat`: load once, then answer each line until /exit or the end of input."""
    sampling.check()
    loaded = load_for_command(reference, system=system, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
    source, out = sys.stdin, sys.stdout
    notices = Console(stderr=True, highlight=False, soft_wrap=True)
    interactive = source.isatty()
    notices.print(f"{loaded.description}, prompted with {loaded.style.describe()}; {COMMANDS}")

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    history: list[dict[str, str]] = []
    try:
        while (line := _read(source, interactive)) is not None:
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                history = []
                notices.print("(conversation cleared)")
                continue
            if text.startswith("/"):
                notices.print(f"unknown command {text.split()[0]}: {COMMANDS}")
                continue
            ids, history = _fit(loaded, [*history, {"role": "user", "content": text}], system, sampling.max_new_tokens)
            if ids is None:
                notices.print("that message alone fills the model's context; say it in fewer words")
                history = history[:-1]
                continue
            reply = answer(loaded, ids, sampling, on_text=write)
            write("\n")
            if reply.cut:
                notices.print(cut_notice(sampling))
            history.append({"role": "assistant", "content": reply.text})
    except KeyboardInterrupt:  # Ctrl-C ends a chat like /exit does, not as a failure
        write("\n")
