"""Model references and the embedded pretrained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from velora_cli.common.errors import UsageError
from velora_cli.common.hub import is_hub_id
from velora_cli.models.load import ModelSource, load_base_model, load_tokenizer, resolve_model


def test_embedded_model_is_converted_to_a_plain_checkpoint(embedded_model_dir: Path) -> None:
    assert (embedded_model_dir / "model.safetensors").is_file()
    config = (embedded_model_dir / "config.json").read_text()
    assert "quantization_config" not in config  # the GGUF quantizer must not leak into the saved config
    assert '"model_type": "llama"' in config


@pytest.mark.slow
def test_embedded_model_answers_paris(embedded_model_dir: Path) -> None:
    source = ModelSource("embedded:smollm2-135m", str(embedded_model_dir))
    tokenizer = load_tokenizer(source)
    model = load_base_model(source, compute=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("embedded:nope", "unknown embedded model 'embedded:nope'"),
        ("gguf:/no/such/file.gguf", "GGUF file not found: /no/such/file.gguf"),
        ("./missing-model-dir", "model directory not found: ./missing-model-dir"),
    ],
)
def test_bad_model_references_fail_with_one_line(reference: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        resolve_model(reference)
    assert str(info.value).startswith(message)


def test_hub_ids_pass_through_unchanged() -> None:
    source = resolve_model("huggyllama/llama-7b")
    assert source.path == "huggyllama/llama-7b" and is_hub_id(source.path)
