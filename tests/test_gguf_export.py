"""`velora export --format gguf`: a file llama.cpp's conventions describe, that transformers' GGUF loader reads back
as the merged model, with an Ollama Modelfile; models or tokenizers the writer does not know are refused first.

The reference is the fp32 merged export of the same run (tests/test_export.py checks that one against PEFT).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_run_recipe

from velora_cli.cli import main
from velora_cli.data.templates import ALPACA_CHAT_TEMPLATE
from velora_cli.export.merge import export_run

SENTENCE = "The capital of France is Paris; 2024 had 366 days.\n  Indented, émigré, 東京!"


@pytest.fixture(scope="module")
def merged(tiny_lora_run: Path, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_run(tiny_lora_run, tmp_path_factory.mktemp("gguf") / "merged", dtype="fp32")
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def exports(tiny_lora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """f16 through the API; q8_0 through the command line, into its default place in (a copy of) the run."""
    root = tmp_path_factory.mktemp("gguf")
    run = root / "run"
    shutil.copytree(tiny_lora_run, run)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["export", str(run), "--format", "gguf", "--quant", "q8_0"])
    (root / "printed.txt").write_text(printed.getvalue())
    return {"f16": export_run(tiny_lora_run, root / "f16", fmt="gguf", quant="f16"), "q8_0": run / "gguf"}


@pytest.fixture(scope="module")
def loaded():
    """transformers' GGUF loader on an export folder, once per folder (it parses the 49k-token vocabulary slowly)."""
    from transformers import AutoModelForCausalLM

    cache: dict[Path, object] = {}

    def load(folder: Path):
        if folder not in cache:
            cache[folder] = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
        return cache[folder].eval()

    return load


def _logits(model, tokenizer, text: str = SENTENCE) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0]


def _read(path: Path) -> tuple[dict, dict[str, str]]:
    """(metadata, tensor name -> ggml type name), read by transformers' own GGUF parser (a second reader)."""
    from gguf import GGMLQuantizationType
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    types = {name: GGMLQuantizationType(kind).name for name, kind in GgufHeader.from_file(str(path)).ggml_types.items()}
    return metadata, types


@pytest.mark.slow
def test_f16_reads_back_as_the_merged_model(exports, merged, loaded) -> None:
    from transformers import AutoTokenizer

    model, tokenizer = merged
    gguf_model = loaded(exports["f16"])
    gguf_tokenizer = AutoTokenizer.from_pretrained(exports["f16"], gguf_file="model.gguf")
    assert gguf_tokenizer(SENTENCE)["input_ids"] == tokenizer(SENTENCE)["input_ids"]
    assert gguf_tokenizer.chat_template == ALPACA_CHAT_TEMPLATE  # the prompt the run trained with
    diff = (_logits(gguf_model, tokenizer) - _logits(model, tokenizer)).abs().max().item()
    assert diff < 1e-2  # measured 7.6e-4 (f16 weights)
    # Q and K were permuted for llama.cpp's RoPE, and the loader's reverse permutation restores them.
    for name in ("q_proj", "k_proj"):
        got, want = (getattr(m.model.layers[0].self_attn, name).weight for m in (gguf_model, model))
        assert (got - want).abs().max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["bf16", "f32"])
def test_bf16_and_f32_hold_the_merged_weights_exactly(quant, tiny_lora_run, merged, loaded, tmp_path) -> None:
    """bf16: each matrix is the fp32 merge rounded to bf16 (round to nearest even, as torch), nothing else;
    f32: the merge itself, so the logits are the merged model's."""
    model, tokenizer = merged
    folder = export_run(tiny_lora_run, tmp_path / quant, fmt="gguf", quant=quant)
    fields, tensors = _read(folder / "model.gguf")
    assert tensors["blk.0.attn_v.weight"] == quant.upper() and tensors["output_norm.weight"] == "F32"
    assert fields["general.file_type"] == {"bf16": 32, "f32": 0}[quant]  # llama.cpp's LlamaFileType
    gguf_model = loaded(folder)
    for name in ("v_proj", "o_proj"):
        got, want = (getattr(m.model.layers[1].self_attn, name).weight for m in (gguf_model, model))
        rounded = want.to(torch.bfloat16).float() if quant == "bf16" else want
        assert torch.equal(got, rounded), name
    diff = (_logits(gguf_model, tokenizer) - _logits(model, tokenizer)).abs().max().item()
    assert diff < (1e-5 if quant == "f32" else 1e-1)


def test_metadata_and_tensor_names_follow_llama_cpp(exports, merged) -> None:
    config = merged[0].config
    fields, tensors = _read(exports["f16"] / "model.gguf")
    assert fields["general.architecture"] == "llama"
    expected = {
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_hidden_layers,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.rope.dimension_count": config.hidden_size // config.num_attention_heads,
        "llama.vocab_size": config.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",  # llama.cpp's name for SmolLM's pre-tokenizer
        "tokenizer.ggml.eos_token_id": 2,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size and fields["tokenizer.ggml.merges"]
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in per_block}
    assert set(tensors) == names  # tied embeddings: no output.weight, as llama.cpp writes them
    assert tensors["blk.0.attn_norm.weight"] == "F32" and tensors["blk.1.ffn_down.weight"] == "F16"


@pytest.mark.slow
def test_q8_0_weights_are_within_a_quantisation_step(exports, merged, loaded) -> None:
    model, tokenizer = merged
    _, tensors = _read(exports["q8_0"] / "model.gguf")
    assert tensors["blk.0.attn_q.weight"] == "Q8_0" and tensors["token_embd.weight"] == "Q8_0"
    assert tensors["output_norm.weight"] == "F32"
    gguf_model = loaded(exports["q8_0"])
    reference = dict(model.named_parameters())
    for name, weight in gguf_model.named_parameters():
        if weight.dim() < 2:
            continue
        # Q8_0: blocks of 32 values along a row, one scale d = max|x| / 127 (stored in f16) each.
        blocks = reference[name].detach().reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        error = (weight.detach().reshape(-1, 32) - blocks).abs()
        assert (error <= 0.6 * step + 1e-7).all(), name  # half a step, plus the f16 rounding of d
    diff = (_logits(gguf_model, tokenizer) - _logits(model, tokenizer)).abs().max().item()
    assert diff < 0.1  # measured 0.021; a random model's near-tied logits make top-1 agreement meaningless here


def test_cli_default_place_and_modelfile(exports) -> None:
    printed = (exports["q8_0"].parents[1] / "printed.txt").read_text()
    assert printed.startswith(f"exported q8_0 GGUF to {exports['q8_0']}/\n")
    assert "Modelfile" in printed and "model.gguf" in printed
    assert (exports["q8_0"] / "model.gguf").read_bytes()[:4] == b"GGUF"
    text = (exports["q8_0"] / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text
    assert 'TEMPLATE """{{ if .System }}{{ .System }}{{ else }}Below is an instruction' in text
    assert "### Instruction:\n{{ .Content }}\n\n### Response:\n" in text
    assert 'PARAMETER stop "### Instruction:"\nPARAMETER stop "<|im_end|>"\n' in text
    assert text.endswith("PARAMETER num_ctx 1024\n")
    # and the marker that makes the folder velora's to replace (rundir.ownership)
    assert sorted(p.name for p in exports["q8_0"].iterdir()) == [".velora-export", "Modelfile", "model.gguf"]
    # issue 27: the exact commands that serve it
    assert f"  ollama create tiny-alpaca -f {exports['q8_0']}/Modelfile && ollama run tiny-alpaca\n" in printed
    assert f"  llama-cli -m {exports['q8_0']}/model.gguf -cnv\n" in printed


def test_chat_template_runs_get_a_chatml_modelfile(tiny_lora_run: Path, tmp_path: Path, capsys) -> None:
    from transformers import AutoTokenizer

    from velora_cli.data.templates import PromptStyle
    from velora_cli.export.modelfile import modelfile

    tokenizer = AutoTokenizer.from_pretrained(tiny_lora_run)
    text = modelfile("model.gguf", PromptStyle("chat", None), tokenizer, 8192)
    assert 'TEMPLATE """{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    # SmolLM2's template writes its own system message when there is none; Ollama gets it as SYSTEM.
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.endswith("PARAMETER num_ctx 4096\n")
    own = modelfile("model.gguf", PromptStyle("chat", "Be terse."), tokenizer, 512)
    assert 'SYSTEM """Be terse."""' in own

    # issue 27: the exported chat template (the GGUF's tokenizer.chat_template too) opens with the system prompt
    # the run trained with, not SmolLM2's own default, unless a conversation brings its own.
    from velora_cli.data.templates import served_chat_template

    tokenizer.chat_template = served_chat_template(PromptStyle("chat", "Be terse."), tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi") and "SmolLM" not in prompt
    own = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                                        tokenize=False)  # fmt: skip
    assert own.startswith("<|im_start|>system\nS<|im_end|>") and "Be terse." not in own


def _run_on_base(tiny_lora_run: Path, tmp_path: Path, config) -> Path:
    """A copy of the run whose recipe names a base with `config` (config and tokenizer only: nothing loads)."""
    base, run = tmp_path / "base", tmp_path / "run"
    config.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_lora_run / name, base / name)
    shutil.copytree(tiny_lora_run, run)
    write_run_recipe(run, str(base))
    return run


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("gpt2", "--format gguf: {base} is a 'gpt2' model; the GGUF writer knows LLaMA-family models only"),
        ("qwen2_moe", "--format gguf: {base} is a 'qwen2_moe' model; the GGUF writer knows LLaMA-family models only"),
        ("pre-tokenizer", "--format gguf: the tokenizer of {base} splits text in a way llama.cpp does not know"),
        ("quant", "--quant 'q4_k': expected one of f16, bf16, q8_0, f32"),
        ("quant-safetensors", "--quant applies to --format gguf; safetensors exports take --dtype"),
        ("format", "--format 'onnx': expected one of safetensors, gguf"),
        ("adapter-only", "--adapter-only copies the PEFT adapter; it cannot be combined with --format gguf"),
    ],
)
def test_refusals_exit_2_before_any_work(case, expected, tiny_lora_run, tiny_llama_dir, tmp_path, capsys) -> None:
    from transformers import AutoConfig, GPT2Config, Qwen2MoeConfig

    run, extra = tiny_lora_run, ["--format", "gguf"]
    if case == "gpt2":
        run = _run_on_base(tiny_lora_run, tmp_path, GPT2Config(n_layer=1, n_embd=64, n_head=4))
    elif case == "qwen2_moe":
        run = _run_on_base(tiny_lora_run, tmp_path, Qwen2MoeConfig(num_hidden_layers=1, hidden_size=64))
    elif case == "pre-tokenizer":
        run = _run_on_base(tiny_lora_run, tmp_path, AutoConfig.from_pretrained(tiny_llama_dir))
        spec = json.loads((tiny_lora_run / "tokenizer.json").read_text())
        byte_level = spec["pre_tokenizer"]
        assert byte_level["type"] == "ByteLevel"
        spec["pre_tokenizer"] = {**byte_level, "add_prefix_space": True}  # " The" for "The": other tokens
        for folder in (run, tmp_path / "base"):
            (folder / "tokenizer.json").write_text(json.dumps(spec))
    else:
        extra = {
            "quant": ["--format", "gguf", "--quant", "q4_k"],
            "quant-safetensors": ["--quant", "q8_0"],
            "format": ["--format", "onnx"],
            "adapter-only": ["--format", "gguf", "--adapter-only"],
        }[case]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run_cli(["export", str(run), "--out", str(out), *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and stdout == ""
    assert len(lines) == 1 and lines[0].startswith("error: " + expected.format(base=tmp_path / "base")), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_sentencepiece_style_vocabulary_round_trips(tmp_path: Path) -> None:
    """Llama 1/2-style BPE (byte fallback, `▁` for spaces, BOS added): written as tokenizer model `llama` with
    scores, read back into the same tokenizer and model. A toy vocabulary stands in for Llama-2's (not offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from velora_cli.export.gguf import check, write_gguf

    pieces = ["▁", "t", "h", "e", "a", "c", "p", "i", "l", "o", "f", "r", "n", "s", "F", "P", "T", "▁t", "he", "▁the"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *pieces, "ca", "▁ca", "ra", "is"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("c", "a"), ("▁", "ca"), ("r", "a"), ("i", "s")]
    tokenizer = LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, add_bos_token=True)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    write_gguf(model, check(config, tokenizer, "toy"), tmp_path / "model.gguf", "f16", "toy")

    text = "The capital of France is Paris; ça va?"
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert back(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer(text)["input_ids"][0] == 1  # BOS, as the tokenizer adds it
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    assert (_logits(loaded, tokenizer, text) - _logits(model, tokenizer, text)).abs().max() < 1e-2
