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


@pytest.mark.parametrize(("quantization", "double_quant"), [("nf4", True), ("fp4", False)])
def test_a_4bit_model_built_on_meta_has_rank_0s_layout(tiny_llama_dir: Path, quantization: str,
                                                       double_quant: bool) -> None:  # fmt: skip
    """A sharded run's ranks other than 0 build the quantised model on meta (models.load.quantized_on_meta): every
    parameter and quant state must have the shape, dtype and class of the one rank 0 loads and quantises, since
    rank 0's are broadcast into them (finetune.sharding.shard_from_rank0), and the model the attributes PEFT and
    the Trainer read (4-bit, bitsandbytes)."""
    import bitsandbytes as bnb

    from velora_cli.models.load import quant_state_tensors

    source = ModelSource(str(tiny_llama_dir), str(tiny_llama_dir))
    kwargs = {"quantization": quantization, "double_quant": double_quant, "quant_storage": torch.float32}
    real = load_base_model(source, **kwargs)
    meta = load_base_model(source, weights=False, **kwargs)
    layout = [{n: (type(p), p.shape, p.dtype) for n, p in m.named_parameters()} for m in (real, meta)]
    assert layout[0] == layout[1]
    assert all(p.is_meta for p in meta.parameters()) and meta.lm_head.weight is meta.model.embed_tokens.weight
    layers = [{n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)} for model in (real, meta)]
    assert sorted(layers[0]) == sorted(layers[1]) and len(layers[0]) == 14
    for name, layer in layers[0].items():
        a, b = layer.quant_state, layers[1][name].quant_state
        assert b is layers[1][name].weight.quant_state
        ta, tb = quant_state_tensors(a), quant_state_tensors(b)
        assert len(ta) == len(tb) == (5 if double_quant else 2)
        for (ha, attr), (hb, _) in zip(ta, tb, strict=True):
            x, y = getattr(ha, attr), getattr(hb, attr)
            assert (x.shape, x.dtype) == (y.shape, y.dtype) and not y.is_meta, (name, attr)
        assert (a.shape, a.dtype, a.blocksize, a.quant_type) == (b.shape, b.dtype, b.blocksize, b.quant_type)
    for attr in ("is_loaded_in_4bit", "is_quantized", "quantization_method"):
        assert getattr(meta, attr) == getattr(real, attr), attr
    assert meta.config.quantization_config.to_dict() == real.config.quantization_config.to_dict()
    assert meta.state_dict().keys() == real.state_dict().keys()  # state_dict() works on the meta build
