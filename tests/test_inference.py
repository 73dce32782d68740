"""`velora generate` and `velora chat`: the answer a run's model gives, prompted as the run trained, on stdout.

The reference for every answer is PEFT's PeftModel over the tiny LLaMA in fp32 and a direct `model.generate`,
given the prompt text training would have built (data.py) for the run's template.
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_run_recipe

from velora_cli.data.formats import ALPACA_NO_INPUT, record_pieces
from velora_cli.data.templates import PromptStyle, render
from velora_cli.rundir.layout import read_run_recipe

PROMPT = "Name a colour."
FOLLOW_UP = "And another one?"
TOKENS = 12


@pytest.fixture(scope="module")
def reference(tiny_lora_run: Path, tiny_llama_dir: Path):
    """(PeftModel over the fp32 base, tokenizer, greedy answer to a prompt text)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lora_run)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tiny_lora_run).eval()

    def answer(prompt_text: str, of=model) -> str:
        ids = tokenizer(prompt_text, return_tensors="pt")
        with torch.no_grad():
            out = of.generate(**ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    return model, tokenizer, answer


def _training_prompt(record: dict, template: str, tokenizer, system: str | None = None) -> str:
    """The untrained text training puts before the first answer (formats.record_pieces' first piece)."""
    return record_pieces(record, tokenizer, template, system)[0][0][0]


def _run_with(tiny_lora_run: Path, tmp_path: Path, **data) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_lora_run, run)
    write_run_recipe(run, read_run_recipe(tiny_lora_run).model.name, **data)
    return run


def test_the_alpaca_chat_template_renders_trainings_prompt(reference) -> None:
    _, tokenizer, _ = reference
    record = {"instruction": PROMPT, "input": "", "output": "Blue."}
    user = [{"role": "user", "content": PROMPT}]
    assert render(PromptStyle("alpaca"), tokenizer, user) == _training_prompt(record, "alpaca", tokenizer)
    assert _training_prompt(record, "alpaca", tokenizer) == ALPACA_NO_INPUT.format(instruction=PROMPT)
    chat = _training_prompt(record, "chat", tokenizer, "Be brief.")
    assert render(PromptStyle("chat", "Be brief."), tokenizer, user) == chat
    # A conversation continues in the same form; --system replaces the preamble.
    turns = [*user, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": FOLLOW_UP}]
    text = render(PromptStyle("alpaca"), tokenizer, turns, system="Answer in one word.")
    assert text == (
        f"Answer in one word.\n\n### Instruction:\n{PROMPT}\n\n### Response:\nBlue.\n\n"
        f"### Instruction:\n{FOLLOW_UP}\n\n### Response:\n"
    )


@pytest.mark.slow
def test_generate_answers_as_model_generate_does(tiny_lora_run: Path, reference, tiny_llama_dir: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    _, _, answer = reference
    code, out, err = run_cli(
        ["generate", str(tiny_lora_run), "--prompt", PROMPT, "--max-new-tokens", str(TOKENS)], capsys
    )
    assert code == 0, err
    expected = answer(ALPACA_NO_INPUT.format(instruction=PROMPT))
    assert out == expected + "\n"  # the answer alone: scriptable
    # The adapter and the Alpaca prompt both matter: without either the answer differs.
    assert expected != answer(PROMPT)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert expected != answer(ALPACA_NO_INPUT.format(instruction=PROMPT), of=base)


@pytest.mark.slow
def test_a_chat_template_run_is_prompted_with_its_system_message(tiny_lora_run, reference, tmp_path, capsys) -> None:
    _, tokenizer, answer = reference
    run = _run_with(tiny_lora_run, tmp_path, template="chat", system_prompt="You answer in French.")
    user = [{"role": "user", "content": PROMPT}]
    for extra, system in (([], "You answer in French."), (["--system", "Be terse."], "Be terse.")):
        code, out, err = run_cli(
            ["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", str(TOKENS), *extra], capsys
        )
        assert code == 0, err
        messages = [{"role": "system", "content": system}, *user]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert out == answer(text) + "\n"


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "prompt_completion"])
def test_a_run_is_prompted_as_its_data_format_trained(fmt, tiny_lora_run, reference, tmp_path, capsys) -> None:
    # alpaca is the default template: a conversations run must not be prompted with it, nor a prompt_completion one
    _, tokenizer, answer = reference
    run = _run_with(tiny_lora_run, tmp_path, format=fmt)
    code, out, err = run_cli(["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", str(TOKENS)], capsys)
    assert code == 0, err
    if fmt == "prompt_completion":
        text = _training_prompt({"prompt": PROMPT, "completion": "Blue."}, "alpaca", tokenizer)
    else:
        text = _training_prompt({"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant",
                                 "content": "Blue."}]}, "alpaca", tokenizer)  # fmt: skip
    assert out == answer(text) + "\n"


@pytest.mark.slow
def test_chat_through_stdin_keeps_resets_and_exits(tiny_lora_run: Path, reference, monkeypatch, capsys) -> None:
    _, _, answer = reference
    script = f"{PROMPT}\n{FOLLOW_UP}\n/reset\n\n/bogus\n{PROMPT}\n/exit\n{FOLLOW_UP}\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run_cli(["chat", str(tiny_lora_run), "--max-new-tokens", str(TOKENS)], capsys)
    assert code == 0, err
    first = answer(ALPACA_NO_INPUT.format(instruction=PROMPT))
    turns = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": first},
        {"role": "user", "content": FOLLOW_UP},
    ]
    second = answer(render(PromptStyle("alpaca"), reference[1], turns))
    # After /reset the same question gets the first answer again; nothing after /exit is answered.
    assert out == f"{first}\n{second}\n{first}\n"
    assert "(conversation cleared)" in err and "unknown command /bogus" in err
    assert "prompted with the Alpaca prompt" in err

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\n"))  # end of input ends the chat too
    code, out, _ = run_cli(["chat", str(tiny_lora_run), "--max-new-tokens", str(TOKENS)], capsys)
    assert (code, out) == (0, f"{first}\n")


def test_chat_says_when_a_message_leaves_no_room_to_answer(tiny_lora_run: Path, monkeypatch, capsys) -> None:
    # The tiny LLaMA's context is 1024 tokens; the prompt plus 1010 new tokens does not fit, so nothing is generated.
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\n"))
    code, out, err = run_cli(["chat", str(tiny_lora_run), "--max-new-tokens", "1010"], capsys)
    assert (code, out) == (0, "")
    assert "that message alone fills the model's context; say it in fewer words" in err


@pytest.mark.slow
def test_a_merged_export_is_prompted_as_its_run(tiny_lora_run: Path, tmp_path: Path, capsys) -> None:
    """The export's tokenizer carries the Alpaca prompt as its chat template, so the merged model answers alike."""
    from transformers import AutoTokenizer

    from velora_cli.data.templates import ALPACA_CHAT_TEMPLATE
    from velora_cli.export.merge import export_run

    merged = export_run(tiny_lora_run, tmp_path / "merged", dtype="fp32")
    assert AutoTokenizer.from_pretrained(merged).chat_template == ALPACA_CHAT_TEMPLATE
    args = ["--prompt", PROMPT, "--max-new-tokens", str(TOKENS)]
    _, from_run, _ = run_cli(["generate", str(tiny_lora_run), *args], capsys)
    code, from_export, err = run_cli(["generate", str(merged), *args], capsys)
    assert code == 0, err
    assert from_export == from_run


@pytest.mark.slow
def test_sampling_is_seeded_and_4bit_loads_as_trained(tiny_lora_run, tiny_llama_dir, reference, capsys) -> None:
    from peft import PeftModel

    from velora_cli.models.load import ModelSource, load_base_model

    args = ["generate", str(tiny_lora_run), "--prompt", PROMPT, "--max-new-tokens", str(TOKENS)]
    sampled = [run_cli([*args, "--temperature", "1.5", "--seed", "3"], capsys)[1] for _ in range(2)]
    greedy = reference[2](ALPACA_NO_INPUT.format(instruction=PROMPT)) + "\n"
    assert sampled[0] == sampled[1] != greedy

    code, out, err = run_cli([*args, "--load-in-4bit"], capsys)
    assert code == 0, err
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lora_run)
    nf4 = load_base_model(ModelSource("tiny", str(tiny_llama_dir)), quantization="nf4")
    model = PeftModel.from_pretrained(nf4, tiny_lora_run).eval()
    ids = tokenizer(ALPACA_NO_INPUT.format(instruction=PROMPT), return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out == tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True) + "\n"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "{path}: run or model directory not found"),
        ("no-adapter", "{path}: no adapter yet (adapter_config.json missing); has the run finished?"),
        ("neither", "{path}: neither a run directory nor a model directory (no adapter_config.json or config.json)"),
        ("system-on-text", "--system: this model is prompted with plain text (no chat template)"),
        ("temperature", "--temperature -1: must be >= 0 (0 is greedy)"),
    ],
)
def test_errors_exit_2_with_one_line(case: str, expected: str, tiny_lora_run: Path, tmp_path: Path, capsys) -> None:
    path, extra = tmp_path / "run", []
    if case == "no-adapter":
        path.mkdir()
        write_run_recipe(path, "embedded:smollm2-135m")
    elif case == "neither":
        path.mkdir()
    elif case == "system-on-text":
        path = _run_with(tiny_lora_run, tmp_path, format="text")
        extra = ["--system", "Be terse."]
    elif case == "temperature":
        path, extra = tiny_lora_run, ["--temperature", "-1"]
    for command in (["generate", str(path), "--prompt", PROMPT], ["chat", str(path)]):
        code, out, err = run_cli([*command, *extra], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and out == ""
        assert len(lines) == 1 and lines[0].startswith("error: " + expected.format(path=path)), err
