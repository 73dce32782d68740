"""GGUF for llama.cpp, Ollama and LM Studio: a merged LLaMA-family model written as one `.gguf` file.

Written with the `gguf` package (llama.cpp's own Python writer) the way llama.cpp's convert_hf_to_gguf.py writes a
`LlamaForCausalLM` (its `LlamaModel` and `TextModel.set_gguf_parameters`, `get_vocab_base`, `_set_vocab_gpt2`,
`_set_vocab_llama_hf`); that script is not a package that can be imported, so its LLaMA path is restated here:
- metadata: `llama.*` context/embedding/feed-forward lengths, block count, head counts, RMS epsilon, RoPE base and
  dimension count (and linear / llama3 RoPE scaling), vocabulary size, file type;
- tensors, named by gguf's own `TensorNameMap` (token_embd, blk.N.attn_q ... ffn_down, output_norm, output; no
  `output` when the embeddings are tied), with Q and K rows permuted per head as llama.cpp's RoPE kernel expects
  (transformers' GGUF loader undoes the same permutation); 1-D tensors (norms) stay F32, the matrices become F16,
  BF16, F32 or Q8_0 (`gguf.quants`; a row that is not a multiple of Q8_0's 32-value block falls back to F16, as
  llama.cpp). f16 is the default (every llama.cpp build reads it); bf16 keeps a bf16-trained model's weights
  exactly; f32 is lossless for an fp32 merge, the input llama.cpp's `llama-quantize` makes any other type from;
- the tokenizer: byte-level BPE (`gpt2`: SmolLM, Llama 3, GPT-2 style) with its merges and llama.cpp's
  pre-tokenizer name, or SentencePiece-style BPE (`llama`: Llama 1/2, Mistral) with scores, via gguf's
  `LlamaHfVocab`; token types, bos/eos/unk/pad ids, add-bos/eos flags and the chat template via gguf's
  `SpecialVocab`, read from the tokenizer files the export saved.
llama.cpp names a byte-level pre-tokenizer by hashing the tokens of a fixed text; a tokenizer whose hash is not
one of the LLaMA family's below would be split differently by llama.cpp than in training, so it is refused, like
any architecture other than LLaMA, before any weights load (one line, exit 2).

The weights come from the merged model in fp32 (export.py merges in fp32 for GGUF), so f16/bf16/q8_0 rounding
happens once. Verified by loading the file back with transformers' GGUF loader (tests/test_gguf_export.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from velora_cli.common.errors import UsageError, VeloraError

GGUF_FILE = "model.gguf"
QUANTS = ("f16", "bf16", "q8_0", "f32")
ARCHITECTURE = "llama"
# llama.cpp's pre-tokenizer probe text and the hashes of its LLaMA-family tokenizers (convert_hf_to_gguf.py,
# get_vocab_base_pre; refs in the comments there: HuggingFaceTB/SmolLM-135M, meta-llama/Meta-Llama-3-8B,
# openai-community/gpt2).
_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
_ROPE_TYPES = ("default", "linear", "llama3")


def check_architecture(config: Any, reference: str) -> None:
    """UsageError unless the GGUF writer knows this model: LLaMA blocks, no biases, a RoPE llama.cpp reads."""
    model_type = getattr(config, "model_type", None)
    if model_type != ARCHITECTURE:
        raise UsageError(
            f"--format gguf: {reference} is a {model_type!r} model; the GGUF writer knows LLaMA-family "
            "models only (model_type 'llama'); export safetensors instead"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UsageError(f"--format gguf: {reference} has attention/MLP biases, which the GGUF writer does not write")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise UsageError(
            f"--format gguf: {reference} uses RoPE scaling {rope_type!r}; the GGUF writer knows "
            f"{', '.join(_ROPE_TYPES)}"
        )


# ------------------------------------------------------------------------------------------------ tokenizer


@dataclass
class Vocab:
    """The tokenizer as GGUF metadata, read before any weights load."""

    model: str  # tokenizer.ggml.model: gpt2 | llama
    pre: str  # tokenizer.ggml.pre
    tokens: list[Any]
    types: list[int]
    scores: list[float] | None
    special: Any  # gguf.SpecialVocab: merges, special ids, add-bos/eos, chat template

    def add_to(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        self.special.add_to_gguf(writer, quiet=True)


def _looks_special(token: str) -> bool:
    # llama.cpp's does_token_look_special, the part that concerns LLaMA-family tokenizers.
    return token.startswith("<|") and token.endswith("|>")


def _byte_level(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id with their types (llama.cpp's get_vocab_base): added tokens are CONTROL when special."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # the embedding has rows the tokenizer never produces
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            special = added[index].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _special(tokenizer: Any, tokenizer_dir: Path, **kwargs: Any) -> Any:
    """gguf's SpecialVocab, with whether BOS/EOS are added stated as the tokenizer behaves: a file that leaves it
    out gets llama.cpp's (and transformers') default, BOS on for SentencePiece vocabularies, whatever the model
    trained with."""
    import gguf

    special = gguf.SpecialVocab(tokenizer_dir, **kwargs)
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(ids) and ids[-1] == tokenizer.eos_token_id
    return special


def read_vocab(tokenizer_dir: Path, vocab_size: int, reference: str) -> Vocab:
    """The tokenizer saved in `tokenizer_dir` as GGUF metadata; UsageError for one llama.cpp would not read the
    same way."""
    import gguf
    from transformers import AutoTokenizer

    path = tokenizer_dir / "tokenizer.json"
    model = json.loads(path.read_text(encoding="utf-8"))["model"] if path.is_file() else {}
    if model.get("type") != "BPE":
        kind = model.get("type") or "no tokenizer.json"
        raise UsageError(
            f"--format gguf: the tokenizer of {reference} is not BPE ({kind}); the GGUF writer knows "
            "byte-level and SentencePiece-style BPE"
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if model.get("byte_fallback"):  # SentencePiece-style (Llama 1/2): tokens with scores, no merges needed
        hf_vocab = gguf.LlamaHfVocab(tokenizer_dir)
        tokens, scores, types = (list(column) for column in zip(*hf_vocab.all_tokens(), strict=True))
        special = _special(tokenizer, tokenizer_dir, n_vocab=len(tokens))
        return Vocab("llama", "default", tokens, [int(t) for t in types], scores, special)
    digest = hashlib.sha256(str(tokenizer.encode(_PROBE)).encode()).hexdigest()
    pre = _PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise UsageError(
            f"--format gguf: the tokenizer of {reference} splits text in a way llama.cpp does not know "
            f"for LLaMA models (pre-tokenizer hash {digest[:12]}); export safetensors instead"
        )
    tokens, types = _byte_level(tokenizer, max(vocab_size, len(tokenizer)))
    return Vocab("gpt2", pre, tokens, types, None, _special(tokenizer, tokenizer_dir, load_merges=True))


# ------------------------------------------------------------------------------------------------- weights


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows from (half, pair) to (pair, half) interleaving."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """The per-frequency factors llama.cpp reads from `rope_freqs` (convert_hf_to_gguf.py generate_extra_tensors)."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _encode(name: str, data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """(array, ggml type) for one tensor: 1-D and norms F32, the rest as `quant` says."""
    import gguf

    if data.ndim <= 1 or name.endswith("_norm.weight") or quant == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if quant == "q8_0":
        try:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.QuantError:  # rows not a multiple of 32 values
            pass
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def _metadata(writer: Any, config: Any, name: str, quant: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f32": gguf.LlamaFileType.ALL_F32}  # fmt: skip
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model: Any, vocab: Vocab, path: Path, quant: str, name: str) -> None:
    """Write `model` (a LlamaForCausalLM, weights in fp32) and `vocab` as one GGUF file at `path`."""
    import gguf

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    _metadata(writer, config, name, quant)
    vocab.add_to(writer)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        writer.add_tensor(
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(rope, head_dim)
        )
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd, and transformers' loader ties them again when output is absent
        stem, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            raise VeloraError(f"--format gguf: no GGUF name for tensor {hf_name}")
        data = tensor.detach().to("cpu").float().numpy()
        if stem.endswith("q_proj"):
            data = _permute(data, heads)
        elif stem.endswith("k_proj"):
            data = _permute(data, kv_heads)
        array, qtype = _encode(f"{mapped}.{suffix}", data, quant)
        writer.add_tensor(f"{mapped}.{suffix}", array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ------------------------------------------------------------------------------------------------------ API


def check(config: Any, tokenizer: Any, reference: str) -> Vocab:
    """Everything the GGUF writer needs to know before weights load: the architecture, and the tokenizer (with
    the chat template it will carry) as GGUF metadata; UsageError when either is one it cannot write."""
    import tempfile

    check_architecture(config, reference)
    # gguf's vocab readers take the tokenizer files, as convert_hf_to_gguf.py does: save them, with the template.
    with tempfile.TemporaryDirectory(prefix="velora-gguf-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return read_vocab(Path(folder), config.vocab_size, reference)


def write_export(model: Any, vocab: Vocab, folder: Path, quant: str, name: str, style: Any, tokenizer: Any) -> None:
    """`folder`/model.gguf and, beside it, the Ollama Modelfile that serves it as the run was prompted."""
    from velora_cli.export.modelfile import MODELFILE, modelfile

    write_gguf(model, vocab, folder / GGUF_FILE, quant, name)
    text = modelfile(GGUF_FILE, style, tokenizer, model.config.max_position_embeddings)
    (folder / MODELFILE).write_text(text, encoding="utf-8")
