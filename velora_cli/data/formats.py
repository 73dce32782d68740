"""Data formats: the record shapes velora trains on, their row checks, and how a record becomes token ids + labels.

Formats (`data.format`, or detected from the first row's keys):
- `alpaca`: {instruction, input?, output}; `data.template` alpaca (the Stanford prompt) or chat (the tokenizer's
  chat template around one user/assistant exchange, with `data.system_prompt`);
- `prompt_completion`: {prompt, completion}, raw text: the prompt, then the completion; no template;
- `messages`: {messages: [{role: system|user|assistant, content}]}, OpenAI style, multi-turn, optional system first;
- `sharegpt`: {conversations: [{from: system|human|gpt, value}]}, read as `messages`;
- `text`: plain text, packed into blocks by velora_cli/data/corpus.py (detected here, handled there).

Each row is checked (one line naming the file, row and field) and normalised: alpaca rows stay
{instruction, input, output}, prompt_completion rows {prompt, completion}, conversations {messages: [...]}.

A record is tokenised as a list of pieces (text, trained), each piece on its own, so a label boundary is always a
token boundary. Conversations are rendered with the tokenizer's chat template; an assistant turn's text is what
rendering the conversation up to and including that turn adds to rendering it up to the turn's generation prompt
(the prefix method: exact for any prefix-preserving template, and independent of `{% generation %}` markers, which
SmolLM2's and most templates lack). Whitespace the template puts after the end-of-turn token stays untrained, so
the trained tokens decode to the assistant's content and the end-of-turn token exactly. A template that rewrites
earlier turns when a later one is added cannot be masked this way and is refused with one line.
Labels cover the assistant turns (the completion, the output) only, or everything with `train_on_inputs`.

Rows longer than `cutoff_len`: a conversation is cut after its last whole assistant turn that fits (truncated),
and dropped when not even its first one fits; a single-turn row (alpaca, prompt_completion) is cut at cutoff_len
and dropped when no trained token is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from velora_cli.common.errors import DataError

FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt", "text")
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# A format's conversation field: (key, role key, content key, accepted role -> chat role)
CONVERSATION_FIELDS = {
    "messages": ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": ("conversations", "from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
}


# ---------------------------------------------------------------------------------------------- checks


def detect_format(row: Any, where: str) -> str:
    """The format a row's keys say (the first row decides for a whole file)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object (a record), got {type(row).__name__}")
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    keys = ", ".join(map(str, row))
    raise DataError(f"{where}: cannot tell the data format from a row with keys {keys}; set data.format to one of "
                    f"{', '.join(FORMATS)}")  # fmt: skip


def _text_field(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} is {'missing' if key not in row else 'empty or not a string'}")
    return value


def _conversation(row: dict, fmt: str, where: str) -> list[dict[str, str]]:
    key, role_key, content_key, roles = CONVERSATION_FIELDS[fmt]
    items = row.get(key)
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: field {key!r} is {'missing' if key not in row else 'not a non-empty list'}")
    messages = []
    for i, item in enumerate(items):
        at = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{where}: {at} is not an object with {role_key!r} and {content_key!r}")
        role = item.get(role_key)
        if role not in roles:
            raise DataError(f"{where}: {at}.{role_key} {role!r} is not one of {'/'.join(roles)}")
        content = item.get(content_key)
        if not isinstance(content, str):
            raise DataError(f"{where}: {at}.{content_key} is {'missing' if content is None else 'not a string'}")
        role = roles[role]
        if role == "system" and i:
            raise DataError(f"{where}: {at}.{role_key} {item[role_key]!r}: only the first message can be a system one")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: {at}.{content_key} is empty (an assistant turn with nothing to learn)")
        if role == "assistant" and not any(m["role"] == "user" for m in messages):
            raise DataError(f"{where}: {at} is an assistant turn before any user turn")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: {key} has no assistant turn to learn from")
    return messages


def check_row(row: Any, fmt: str, where: str) -> dict[str, Any]:
    """The normalised record of one row in format `fmt`; else a one-line DataError starting with `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object ({fmt} format), got {type(row).__name__}")
    if fmt == "alpaca":
        instruction, output = _text_field(row, "instruction", where), _text_field(row, "output", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' is not a string")
        return {"instruction": instruction, "input": extra, "output": output}
    if fmt == "prompt_completion":
        return {"prompt": _text_field(row, "prompt", where), "completion": _text_field(row, "completion", where)}
    if fmt in CONVERSATION_FIELDS:
        return {"messages": _conversation(row, fmt, where)}
    raise DataError(f"{where}: data.format {fmt!r} rows are plain text, read by the text corpus")


# ------------------------------------------------------------------------------------------ tokenising


def user_message(record: dict[str, str]) -> str:
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def as_messages(record: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages of a conversation record, or of an alpaca record under the chat template."""
    messages = record.get("messages") or [
        {"role": "user", "content": user_message(record)},
        {"role": "assistant", "content": record["output"]},
    ]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def conversation_pieces(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a conversation rendered with the chat template (the prefix method, see above)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template: conversations need one (alpaca rows: template alpaca)")

    def render(upto: int, generation: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=generation, tokenize=False)

    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k in range(last + 1):
        if messages[k]["role"] != "assistant":
            continue
        prompt, full = render(k, True), render(k + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the tokenizer's chat template rewrites earlier turns when a turn is added, so the "
                            "assistant turns cannot be masked exactly; set model.tokenizer to one with another "
                            "template")  # fmt: skip
        answer = full[len(prompt) :].rstrip()
        pieces += [(prompt[len(done) :], False), (answer, True)]
        done = prompt + answer
    return pieces


def record_pieces(record: dict[str, Any], tokenizer, template: str, system_prompt: str | None) -> tuple[list, bool]:
    """(pieces, rendered by the chat template) for any normalised record."""
    if "prompt" in record:
        return [(record["prompt"], False), (record["completion"], True)], False
    if "messages" in record or template == "chat":
        return conversation_pieces(as_messages(record, system_prompt), tokenizer), True
    fmt = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
    return [(fmt.format(**record), False), (record["output"], True)], False


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]  # token counts at which an assistant turn ends (where a conversation may be cut)


def encode(record: dict[str, Any], tokenizer, *, template: str, train_on_inputs: bool, add_eos: bool,
           system_prompt: str | None = None) -> Encoded:  # fmt: skip
    """Token ids and labels of a whole record (no cutoff)."""
    pieces, chat = record_pieces(record, tokenizer, template, system_prompt)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    ends: list[int] = []
    for n, (text, trained) in enumerate(pieces):
        # A rendered chat template already holds the special tokens it wants (a BOS among them); raw text gets the
        # tokenizer's own, once, at the start.
        piece = tokenizer(text, add_special_tokens=n == 0 and not chat)["input_ids"] if text else []
        # Raw text has no end-of-turn; the chat template closes each turn itself (SmolLM2: <|im_end|>, its EOS).
        if trained and not chat and add_eos and eos is not None and eos not in piece:
            piece = [*piece, eos]
        ids += piece
        labels += piece if trained or train_on_inputs else [IGNORE_INDEX] * len(piece)
        if trained:
            ends.append(len(ids))
    return Encoded(ids, labels, ends)


def fit_cutoff(enc: Encoded, cutoff_len: int, conversation: bool) -> tuple[dict[str, list[int]] | None, str]:
    """(row or None, "kept" | "truncated" | "dropped"): the record cut to cutoff_len as the module docstring says."""
    if len(enc.input_ids) <= cutoff_len:
        cut, status = len(enc.input_ids), "kept"
    elif conversation:
        cut = max((end for end in enc.turn_ends if end <= cutoff_len), default=0)
        status = "truncated" if cut else "dropped"
    else:
        cut, status = cutoff_len, "truncated"
    ids, labels = enc.input_ids[:cut], enc.labels[:cut]
    if status == "dropped" or all(label == IGNORE_INDEX for label in labels):
        return None, "dropped"
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, status


def describe(record: dict[str, Any]) -> tuple[str, str]:
    """(the last user text, the expected last answer) of a record, for the examples a report shows."""
    if "prompt" in record:
        return record["prompt"], record["completion"]
    if "messages" in record:
        last = max(i for i, m in enumerate(record["messages"]) if m["role"] == "assistant")
        users = [m["content"] for m in record["messages"][:last] if m["role"] == "user"]
        return users[-1], record["messages"][last]["content"]
    return record["instruction"], record["output"]
