"""How a trained model is prompted: the prompt style a run trained with, and a conversation rendered in it.

A model fine-tuned on the Alpaca prompt must be prompted with that prompt, so `velora generate`/`chat` and the
exports read the style from the run's recipe (`data.format`, `data.template`): `alpaca`, `chat` (the tokenizer's
own chat template, with the recipe's system prompt as the default system message) or `raw` (plain-text training,
prompt_completion: the prompt is continued as is). A model that is not a run is prompted with its chat
template when it has one.

The Alpaca prompt is also written out as a Jinja chat template (`ALPACA_CHAT_TEMPLATE`), built from the very
strings training formats rows with (formats.py), so one renderer serves single prompts and multi-turn chats, and an
export of an Alpaca run carries the prompt it was trained on in its tokenizer (and GGUF) for other servers to use.
Its single-turn rendering is exactly training's prompt (tests/test_inference.py checks); later turns are
appended in the same `### Instruction` / `### Response` form, which Alpaca training never saw but which keeps a
conversation readable to the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from velora_cli.data.formats import ALPACA_NO_INPUT

Style = Literal["alpaca", "chat", "raw"]

# ALPACA_NO_INPUT is PREAMBLE + "\n\n" + TURN_HEAD + instruction + TURN_TAIL.
_HEAD, ALPACA_TURN_TAIL = ALPACA_NO_INPUT.split("{instruction}")
ALPACA_PREAMBLE, ALPACA_TURN_HEAD = _HEAD.split("\n\n", 1)
ALPACA_TURN_END = "\n\n"  # after an answer, before the next instruction


def _literal(text: str) -> str:
    """A Jinja string literal (Jinja reads JSON's escapes: \\n, \\", \\uXXXX)."""
    return json.dumps(text)


ALPACA_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    f"{{% else %}}{{{{ {_literal(ALPACA_PREAMBLE)} }}}}{{% endif %}}{{{{ {_literal(chr(10) * 2)} }}}}"
    "{% for message in messages %}"
    f"{{% if message['role'] == 'user' %}}{{{{ {_literal(ALPACA_TURN_HEAD)} + message['content'] + "
    f"{_literal(ALPACA_TURN_TAIL)} }}}}"
    f"{{% elif message['role'] == 'assistant' %}}{{{{ message['content'] + {_literal(ALPACA_TURN_END)} }}}}"
    "{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class PromptStyle:
    """How to turn a conversation into the model's prompt text."""

    kind: Style
    system: str | None = None  # the default system message (a chat-template run's data.system_prompt)

    def describe(self) -> str:
        return {"alpaca": "the Alpaca prompt", "chat": "the chat template", "raw": "plain text"}[self.kind]


def style_of_recipe(recipe: Any) -> PromptStyle:
    """The prompt a run trained with, from its recipe."""
    data = recipe.data
    if recipe.method == "pretrain" or data.format in ("text", "prompt_completion"):
        return PromptStyle("raw")
    if data.format in ("messages", "sharegpt"):  # the conversations carry their own system turns
        return PromptStyle("chat", data.system_prompt)
    return PromptStyle(data.template, data.system_prompt if data.template == "chat" else None)


def style_of_tokenizer(tokenizer: Any) -> PromptStyle:
    """A model that is not a run: its chat template when it has one, else plain text."""
    return PromptStyle("chat" if getattr(tokenizer, "chat_template", None) else "raw")


def render(style: PromptStyle, tokenizer: Any, messages: list[dict[str, str]], system: str | None = None) -> str:
    """The prompt text for `messages` (user/assistant turns, the last one the user's), ready for the answer.

    `system` replaces the style's default system message. The text is tokenised as training tokenised prompts
    (`add_special_tokens=True`), so e.g. a tokenizer that adds BOS adds it here too.
    """
    if style.kind == "raw":
        return "".join(m["content"] for m in messages)
    system = system if system is not None else style.system
    turns = ([{"role": "system", "content": system}] if system else []) + messages
    template = ALPACA_CHAT_TEMPLATE if style.kind == "alpaca" else None
    return tokenizer.apply_chat_template(turns, chat_template=template, add_generation_prompt=True, tokenize=False)


def served_chat_template(style: PromptStyle, tokenizer: Any) -> str | None:
    """The chat template an export of the model should carry, so servers prompt it as it was trained (a model
    trained on plain text keeps its tokenizer's, for lack of a better one). A chat run trained with
    data.system_prompt gets it as the default system turn: left alone, a template such as SmolLM2's would put its
    own default system message first, one the run never trained with."""
    if style.kind == "alpaca":
        return ALPACA_CHAT_TEMPLATE
    template = tokenizer.chat_template
    if style.kind != "chat" or not style.system or not isinstance(template, str):
        return template
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {_literal(style.system)}}}] + messages %}}"
        "{%- endif %}" + template
    )
