"""Trying a model: what a RUN_OR_MODEL reference names, loading it for inference, and generating an answer.

Shared by `velora generate` (below) and `velora chat` (chat.py). A reference is
- a finetune run directory or one of its checkpoint-N directories holding a LoRA adapter: the adapter over the
  base model its recipe names, prompted as the run trained (data/templates.py);
- a directory holding a whole model: a merged export, a full/pretrain run (or its checkpoint), any local
  transformers checkpoint; a run's recipe decides the prompt when there is one, else the model's chat template;
- a hub id, a GGUF file or `embedded:smollm2-135m`.
Everything that can be checked without weights is checked first (one line, exit 2): a missing directory, a run
with no adapter yet, a directory that holds neither, options that do not fit the model's prompt style.

The base of an adapter run is loaded WITHOUT quantisation by default (in the device's compute dtype: fp32 on CPU,
bf16/fp16 on CUDA), even for a QLoRA run: that is the model `velora export` merges and users deploy, and on CPU
bitsandbytes dequantises every 4-bit weight on every forward, which makes token-by-token decoding several times
slower. `--load-in-4bit` loads the base as QLoRA trained it (the run's nf4/fp4; nf4 for other models), which is
what fits a large model on a small GPU and reproduces the training-time forward pass exactly. The adapter is
applied unmerged (PEFT), as `velora eval` does. Nothing is written and no run lock is taken: a chat can stay open
while the run trains or exports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from velora_cli.common.device import compute_dtype, default_device, dtype_name
from velora_cli.common.errors import UsageError, VeloraError
from velora_cli.config.presets import EMBEDDED_PREFIX, GGUF_PREFIX
from velora_cli.data.templates import PromptStyle, render, style_of_recipe, style_of_tokenizer
from velora_cli.models.load import ModelSource, first_line, load_base_model, load_tokenizer, resolve_model
from velora_cli.rundir.layout import (
    ADAPTER_CONFIG,
    CHECKPOINT_RE,
    MODEL_CONFIG,
    RECIPE_FILE,
    checkpoints,
    read_run_recipe,
)
from velora_cli.rundir.verify import check_weights

FOUR_BIT = ("nf4", "fp4")


@dataclass(frozen=True)
class Target:
    """What a reference names, worked out before anything loads."""

    model: ModelSource  # the model to load: the base of an adapter run, else the model itself
    tokenizer: ModelSource
    adapter: Path | None = None
    recipe: Any = None  # the run's recipe, when the reference is (inside) a run directory


@dataclass(frozen=True)
class Loaded:
    model: Any
    tokenizer: Any
    style: PromptStyle
    description: str

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: greedy when temperature is 0."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature:g}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p:g}: must be in (0, 1]")


def _run_dir_of(path: Path) -> Path | None:
    """The run directory `path` is, or whose checkpoint-N it is."""
    if (path / RECIPE_FILE).is_file():
        return path
    if CHECKPOINT_RE.match(path.name) and (path.parent / RECIPE_FILE).is_file():
        return path.parent
    return None


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def resolve_target(reference: str) -> Target:
    """Say what `reference` is without loading weights; UsageError (exit 2) when it names nothing loadable."""
    path = Path(reference).expanduser()
    if path.is_dir():
        run_dir = _run_dir_of(path)
        recipe = read_run_recipe(run_dir) if run_dir is not None else None
        if (path / ADAPTER_CONFIG).is_file():
            if recipe is None:
                raise UsageError(
                    f"{path}: a LoRA adapter without recipe.yaml beside it; is this a velora run directory?"
                )
            base = resolve_model(recipe.model.name)
            saved = next((d for d in (path, run_dir) if _has_tokenizer(d)), None)  # the run's, else the base's
            return Target(base, ModelSource(str(saved), str(saved)) if saved else base, path, recipe)
        if (path / MODEL_CONFIG).is_file():
            source = ModelSource(reference, str(path))
            return Target(source, source, recipe=recipe)
        if run_dir is not None:
            done = checkpoints(run_dir)
            hint = f"; its newest checkpoint is {done[-1]}" if done else ""
            raise UsageError(f"{path}: no adapter yet ({ADAPTER_CONFIG} missing); has the run finished?{hint}")
        raise UsageError(
            f"{path}: neither a run directory nor a model directory (no {ADAPTER_CONFIG} or {MODEL_CONFIG})"
        )
    special = reference.startswith((EMBEDDED_PREFIX, GGUF_PREFIX)) or reference.endswith(".gguf")
    if not path.exists() and not special and str(path.parent) != "." and path.parent.is_dir():
        # `runs/typo` would otherwise be taken for a hub id (owner/name) and fail later, less clearly.
        raise UsageError(f"{reference}: run or model directory not found")
    source = resolve_model(reference)
    return Target(source, source)


def load_for_inference(
    reference: str,
    *,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    system: str | None = None,
) -> Loaded:
    """The model, its tokenizer and prompt style for `reference`, in eval mode on the default device.

    `system` (--system) is checked against the prompt style before any weights load, so it fails fast."""
    target = resolve_target(reference)
    if target.adapter is not None:  # a damaged adapter is named now, not as a traceback after the base loads
        check_weights(Path(target.adapter))
    tokenizer = load_tokenizer(target.tokenizer, trust_remote_code)
    style = style_of_recipe(target.recipe) if target.recipe is not None else style_of_tokenizer(tokenizer)
    if style.kind == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{reference}: trained with data.template=chat but the tokenizer has no chat template")
    if system is not None and style.kind == "raw":
        raise UsageError(
            "--system: this model is prompted with plain text (no chat template), so it has no system message"
        )
    quantization = "none"
    if load_in_4bit:
        trained = target.recipe.model.quantization if target.recipe is not None else None
        quantization = trained if trained in FOUR_BIT else "nf4"
    device = default_device()
    dtype = compute_dtype("auto", device)
    model = load_base_model(
        target.model, quantization=quantization, compute=dtype, device=device, trust_remote_code=trust_remote_code
    )
    weights = quantization if quantization != "none" else dtype_name(dtype)
    description = f"{reference} ({weights})"
    if target.adapter is not None:
        from peft import PeftModel  # only an adapter run needs peft

        try:
            model = PeftModel.from_pretrained(model, str(target.adapter))
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # weights of another shape or base
            raise VeloraError(f"{target.adapter}: adapter does not fit the base model: {first_line(exc)}") from None
        description = f"{reference} (LoRA adapter on {target.model.reference}, {weights})"
    return Loaded(model.eval(), tokenizer, style, description)


def _streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    """transformers' TextStreamer (it holds text back until a word is complete), handing the text to `on_text`
    instead of printing it."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def stop_ids(loaded: Loaded) -> list[int]:
    """End of answer: the model's generation config's eos ids and the tokenizer's (what add_eos trained)."""
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, loaded.tokenizer.eos_token_id] if i is not None})


def prompt_ids(loaded: Loaded, text: str) -> torch.Tensor:
    """Token ids of a rendered prompt, tokenised as training tokenised prompts."""
    return loaded.tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]


@dataclass(frozen=True)
class Answer:
    text: str
    cut: bool  # stopped by --max-new-tokens before the model ended its answer


def cut_notice(sampling: Sampling) -> str:
    return f"(answer cut at --max-new-tokens {sampling.max_new_tokens}; raise it for the rest)"


@torch.no_grad()
def answer(
    loaded: Loaded, input_ids: torch.Tensor, sampling: Sampling, on_text: Callable[[str], None] | None = None
) -> Answer:
    """The answer to a tokenised prompt (streamed to `on_text` as it is decoded), without special tokens, and
    whether --max-new-tokens cut it short."""
    from transformers import set_seed

    device = next(loaded.model.parameters()).device
    kwargs: dict[str, Any] = {"do_sample": sampling.temperature > 0}
    if kwargs["do_sample"]:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        if sampling.seed is not None:
            set_seed(sampling.seed)
    else:  # the model's generation_config may ask for sampling; greedy must not inherit its knobs
        kwargs.update(temperature=None, top_p=None, top_k=None)
    output = loaded.model.generate(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids, device=device),
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=stop_ids(loaded),
        pad_token_id=loaded.tokenizer.pad_token_id,
        streamer=_streamer(loaded.tokenizer, on_text) if on_text is not None else None,
        **kwargs,
    )
    new = output[0, input_ids.shape[1] :]
    cut = len(new) >= sampling.max_new_tokens and int(new[-1]) not in stop_ids(loaded)
    return Answer(loaded.tokenizer.decode(new, skip_special_tokens=True), cut)


def load_for_command(reference: str, *, system: str | None, load_in_4bit: bool, trust_remote_code: bool) -> Loaded:
    """load_for_inference with a spinner on stderr (on a terminal only: a pipe or log file gets no live display)."""
    from rich.console import Console

    def load() -> Loaded:
        return load_for_inference(
            reference, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code, system=system
        )

    console = Console(stderr=True)
    if not console.is_terminal:
        return load()
    with console.status(f"loading {reference}"):
        return load()


def run_generate(
    reference: str,
    prompt: str,
    sampling: Sampling,
    *,
    system: str | None = None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
) -> None:
    """`velora generate`: one answer on stdout, streamed, and nothing else there."""
    sampling.check()
    loaded = load_for_command(reference, system=system, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
    out = sys.stdout
    text = render(loaded.style, loaded.tokenizer, [{"role": "user", "content": prompt}], system)

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    reply = answer(loaded, prompt_ids(loaded, text), sampling, on_text=write)
    write("\n")
    if reply.cut:
        print(cut_notice(sampling), file=sys.stderr)
