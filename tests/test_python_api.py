"""The library as a user of the stock transformers Trainer meets it: the README's example, and resume."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from velora_cli.engine import VECTORS_FILE, VeloraCallback, VeloraConfig, apply_velora, velora_state_dict

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_python_api_example_runs_as_written(tmp_path: Path, embedded_model_dir: Path, monkeypatch) -> None:
    code = readme_example()
    assert 15 <= len(code.strip().splitlines()) <= 25
    # Only the model (a hub id there, the embedded SmolLM2 here) and the dtype (bf16 is ~15x slower on CPU) change.
    code, n = re.subn(r'MODEL, DTYPE = .*', f'MODEL, DTYPE = "{embedded_model_dir}", torch.float32', code)
    assert n == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    adapter = tmp_path / "runs" / "api" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert namespace["trainer"].state.global_step == 2
    for step in (1, 2):
        vectors = load_file(str(tmp_path / "runs" / "api" / f"checkpoint-{step}" / VECTORS_FILE))
        assert len(vectors) == 2 * 2 * 30  # (v, initialised flag) x (v_proj, down_proj) x 30 decoder layers
    assert not any("velora" in key for key in load_file(str(adapter / "adapter_model.safetensors")))


# ------------------------------------------------------------------------------------------- stock resume


class CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def _trainer(model_dir: Path, output_dir: Path, callbacks: list):
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    apply_velora(model, VeloraConfig(layers=["v", "d"], num_groups=8, init="batch_average"))
    rows = [tokenizer(f"Question {i}: what is {i} plus {i}? Answer: {2 * i}.") for i in range(16)]
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
        save_steps=2, learning_rate=1e-3, report_to="none", use_cpu=True, disable_tqdm=True, seed=7,
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=callbacks), model


@pytest.mark.slow
def test_stock_trainer_resume_restores_v_bit_for_bit(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """init=batch_average moves v every micro-batch, so a resume that re-initialised v would train differently."""
    straight, straight_model = _trainer(tiny_llama_dir, tmp_path / "straight", [VeloraCallback()])
    straight.train()

    crashed, _ = _trainer(tiny_llama_dir, tmp_path / "crashed", [VeloraCallback(), CrashAt(3)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    saved = load_file(str(tmp_path / "crashed" / "checkpoint-2" / VECTORS_FILE))

    callback = VeloraCallback()
    resumed, resumed_model = _trainer(tiny_llama_dir, tmp_path / "crashed", [callback])
    restored: dict[str, torch.Tensor] = {}

    class Snapshot(TrainerCallback):  # runs after VeloraCallback's on_train_begin, before the first forward
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            restored.update(velora_state_dict(model))

    resumed.add_callback(Snapshot())
    resumed.train(resume_from_checkpoint=True)
    assert callback.restored_from == tmp_path / "crashed" / "checkpoint-2"
    assert restored.keys() == saved.keys()
    for key in saved:
        assert torch.equal(restored[key], saved[key]), key

    a, b = straight_model.state_dict(), resumed_model.state_dict()
    lora_keys = [k for k in a if "lora_" in k]
    assert lora_keys
    for key in lora_keys:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)
    final_a, final_b = velora_state_dict(straight_model), velora_state_dict(resumed_model)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.slow
def test_resume_without_the_vectors_is_an_error_not_a_silent_reinit(tmp_path: Path, tiny_llama_dir: Path) -> None:
    crashed, _ = _trainer(tiny_llama_dir, tmp_path / "run", [VeloraCallback(), CrashAt(3)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    os.remove(tmp_path / "run" / "checkpoint-2" / VECTORS_FILE)
    resumed, _ = _trainer(tiny_llama_dir, tmp_path / "run", [VeloraCallback()])
    with pytest.raises(FileNotFoundError, match=f"resuming at step 2, but no {VECTORS_FILE}"):
        resumed.train(resume_from_checkpoint=True)
