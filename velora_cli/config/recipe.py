"""The recipe: a YAML file validated against a schema, with `--set a.b=value` overrides.

Every error is one line naming the file, the dotted field and what is wrong (with a did-you-mean for
misspelt keys), raised as RecipeError (exit code 2) before anything is written. The YAML loader refuses
duplicate keys (plain YAML lets the last one win silently), numbers must be finite, and an error in a field
set by `--set` names that option as well as the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from velora_cli.common.errors import UsageError
from velora_cli.common.memstats import parse_bytes
from velora_cli.config.distributed import DistributedSection
from velora_cli.config.preference import PREFERENCE_METHODS, PreferenceSection
from velora_cli.config.presets import DEFAULT_MODEL
from velora_cli.engine.config import DEFAULT_NUM_GROUPS, INIT_TYPES, VeloraConfig, VeloraConfigError, expand_layer_names


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` are valid YAML floats, and no field of a recipe means anything with them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSection(Section):
    name: str = DEFAULT_MODEL
    quantization: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    trust_remote_code: bool = False
    # flash_attention_2: CUDA with the flash-attn package, bf16/fp16; packed rows then use its varlen kernel
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    # method: pretrain - the architecture to initialise afresh: a hub id / local dir holding config.json, or one of
    # the paper's (GaLore's) sizes llama-60m, llama-130m, llama-350m, llama-1b (see velora_cli/models/full.py)
    config: str | None = None
    tokenizer: str | None = None  # default: model.config when it names a hub id / directory, else model.name
    # A trained LoRA adapter to start from (an SFT run's directory or an adapter dir), e.g. before `method: dpo`
    adapter: str | None = None


class LoraSection(Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list("qkvogud"), min_length=1)

    @property
    def module_names(self) -> list[str]:
        return expand_layer_names(self.target_modules)


class VeloraSection(Section):
    enabled: bool = True
    layers: list[str] = Field(default_factory=lambda: ["v", "d"], min_length=1)
    # sub-tokens per token (D/M); one count, or one per layer type ({v: 64, d: 86}, as the official scripts)
    num_groups: Any = None  # int | {layer: int}; the engine checks types and values
    subtoken_size: Any = None  # int: M, an alternative to num_groups
    init: Literal[INIT_TYPES] = "batch_average_once"  # type: ignore[valid-type]
    ema_decay: float = 0.99
    scale: float = 1.0

    @model_validator(mode="after")
    def _engine_accepts(self) -> VeloraSection:
        """The engine's own config checks every field; its errors name the field, here under `velora.`."""
        if self.num_groups is None and self.subtoken_size is None:
            self.__dict__["num_groups"] = DEFAULT_NUM_GROUPS
        self.to_config()
        return self

    def to_config(self) -> VeloraConfig:
        try:
            return VeloraConfig(
                layers=list(self.layers),
                num_groups=self.num_groups,
                subtoken_size=self.subtoken_size,
                init=self.init,
                ema_decay=self.ema_decay,
                scale=self.scale,
            )
        except VeloraConfigError as exc:
            raise ValueError(str(exc)) from exc

    @property
    def module_names(self) -> list[str]:
        return expand_layer_names(self.layers)


class DataSection(Section):
    path: str
    split: str = "train"
    # alpaca, messages, sharegpt, prompt_completion (velora_cli/data/formats.py) or text; None: detected from the rows
    # (text for method pretrain and .txt files)
    format: Literal["alpaca", "messages", "sharegpt", "prompt_completion", "text"] | None = None
    template: Literal["alpaca", "chat"] = "alpaca"  # alpaca rows; conversations always use the chat template
    system_prompt: str | None = None  # chat template only: replaces the tokenizer's default system message
    cutoff_len: int = Field(512, gt=8, le=1 << 20)  # 1M tokens: beyond any model's context
    val_set_size: float = Field(0, ge=0)  # >= 1: number of rows; < 1: fraction
    val_path: str | None = None
    train_on_inputs: bool = False
    add_eos: bool = True
    skip_bad_rows: bool = False
    packing: bool = False  # several examples per cutoff_len sequence, attention kept inside each (packing.py)
    # Plain text (pre-training, continued pre-training): .txt files/globs, .jsonl/parquet/hub rows with `text_field`,
    # tokenised, joined with EOS and packed into blocks of cutoff_len tokens (see velora_cli/data/corpus.py).
    text_field: str = "text"
    subset: str | None = None  # a hub dataset's configuration, e.g. `en` for allenai/c4
    streaming: bool = False  # hub datasets: read on the fly (needs train.max_steps)
    val_split: str | None = None  # streaming: held-out blocks come from this split (e.g. validation)


class TrainSection(Section):
    micro_batch_size: int = Field(1, gt=0, le=1 << 16)
    batch_size: int = Field(16, gt=0, le=1 << 20)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, lt=1)  # cosine: decay to this fraction of the lr (GaLore: 0.1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"
    ] = "adamw_torch"
    # method full/pretrain: each parameter's AdamW step runs in backward as soon as its gradient is complete
    # (register_post_accumulate_grad_hook, as GaLore's layer-wise mode), so no full set of gradients is held.
    # Needs batch_size == micro_batch_size (no accumulation); gradient clipping is not applied (no global norm).
    optimizer_in_backward: bool = False
    seed: int = 42
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(2, gt=0)
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)

    def accumulation(self, processes: int = 1) -> int:
        """Gradient accumulation steps: batch_size is the global batch of micro-batches over every process."""
        per_step = self.micro_batch_size * processes
        if self.batch_size % per_step:
            by = f"micro_batch_size x processes = {per_step}" if processes > 1 else f"micro_batch_size {per_step}"
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of {by}")
        return self.batch_size // per_step

    @model_validator(mode="after")
    def _accumulation(self) -> TrainSection:
        self.accumulation()
        return self


CHECKPOINTING_RE = re.compile(r"none|all|mlp|auto|every:([1-9][0-9]*)")


class MemorySection(Section):
    """Activation-memory techniques (velora_cli.engine.lean) and the planner's GPU budget.

    `loss` and `lean_ops` default on: both are exact (same loss and gradients as the stock path, tests/test_lean.py)
    and cost no measurable speed, so there is no reason to keep the full-vocabulary logits or the extra SiLU
    output. Models outside the LLaMA family (which apply_lean does not patch) keep the stock path when this
    section is left at its defaults, and fail with a recipe error when it asks for a technique explicitly.
    `checkpointing: auto` lets the planner (velora_cli.memory.plan) pick recompute and offload for `budget`.
    `train.gradient_checkpointing: true` is kept as the older spelling of `checkpointing: all`.
    """

    loss: Literal["chunked", "full"] = "chunked"
    lean_ops: bool = True
    checkpointing: str = "none"  # none | all | mlp | every:K | auto
    offload: bool = False  # saved activations to pinned CPU memory (CUDA only)
    budget: str | None = None  # GPU memory the planner fits into, e.g. 22GiB (default: the GPU's total)
    chunk_size: int | None = Field(None, gt=0)  # tokens per loss chunk (default: 128 MiB of fp32 logits)

    @field_validator("checkpointing", mode="before")
    @classmethod
    def _checkpointing(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if not CHECKPOINTING_RE.fullmatch(text):
            raise ValueError("expected none, all, mlp, every:K (K >= 1) or auto")
        return "all" if text == "every:1" else text

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> str | None:
        if value is not None:
            try:
                parse_bytes(str(value), "size", "22GiB, 80GB or 40960MiB")
            except UsageError as exc:
                raise ValueError(str(exc).removeprefix(f"size {str(value)!r}: ")) from None
        return None if value is None else str(value)

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget is None else parse_bytes(str(self.budget), "memory.budget", "22GiB")


class OutputSection(Section):
    dir: str | None = None  # default: runs/<recipe name>


class ExportSection(Section):
    enabled: bool = False
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    dir: str | None = None  # default: RUN_DIR/merged


class MmluSection(Section):
    enabled: bool = False
    shots: int = Field(5, ge=0)
    subjects: list[str] | None = None
    limit: int | None = Field(None, gt=0)
    data_dir: str | None = None
    batch_size: int = Field(8, gt=0)
    split: Literal["test", "validation", "dev"] = "test"
    use_merged: bool = False


class HeldoutSection(Section):
    """Greedy exact match on held-out instructions, scored before and after training."""

    enabled: bool = False
    path: str | None = None  # default: the validation split
    limit: int = Field(64, gt=0)


class PerplexitySection(Section):
    """Perplexity of held-out text (packed blocks of data.cutoff_len tokens), in the eval stage."""

    enabled: bool = False
    path: str | None = None  # text file/corpus; default: the run's held-out split of data.path
    limit: int | None = Field(None, gt=0)  # at most this many blocks


class EvalSection(Section):
    mmlu: MmluSection = Field(default_factory=MmluSection)
    heldout: HeldoutSection = Field(default_factory=HeldoutSection)
    perplexity: PerplexitySection = Field(default_factory=PerplexitySection)


METHODS = ("qlora", "lora", "full", "pretrain", *PREFERENCE_METHODS)

FULL_METHODS = ("full", "pretrain")  # every weight trains; no adapters


class Recipe(Section):
    name: str | None = None
    method: Literal[METHODS] = "qlora"  # type: ignore[valid-type]
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    velora: VeloraSection = Field(default_factory=VeloraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection = Field(default_factory=OutputSection)
    export: ExportSection = Field(default_factory=ExportSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)  # method: dpo (config/preference.py)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        """The run directory is runs/NAME: one path component, so a recipe cannot put it anywhere else."""
        if name is None:
            return None
        bad = ("/" in name or "\\" in name or "\0" in name or name.startswith(".") or not name.strip()
               or len(name.encode()) > 255 or any(ord(c) < 32 for c in name))  # fmt: skip
        if bad:
            raise ValueError("a run name is one folder name: no '/', '\\', control characters or leading '.', "
                             "at most 255 bytes (output.dir sets the run directory itself)")
        return name

    @model_validator(mode="after")
    def _checkpointing_alias(self) -> Recipe:
        """train.gradient_checkpointing: true means memory.checkpointing: all; both set and disagreeing is an error."""
        if self.train.gradient_checkpointing:
            mine = self.memory.checkpointing
            if "checkpointing" in self.memory.model_fields_set and mine != "all":
                raise ValueError(
                    f"train.gradient_checkpointing=true and memory.checkpointing={mine!r} disagree; "
                    "set only memory.checkpointing"
                )
            self.memory.__dict__["checkpointing"] = "all"
        return self

    @model_validator(mode="after")
    def _method_combinations(self) -> Recipe:
        """What each method allows (one line each): see velora_cli/models/full.py for what the methods do."""
        m, q = self.method, self.model.quantization
        q_given = "quantization" in self.model.model_fields_set
        if m in FULL_METHODS and q != "none" and q_given:
            raise ValueError(f"method {m!r} trains every weight; model.quantization={q!r} cannot be trained "
                             "(use quantization: none, or method: qlora)")  # fmt: skip
        if m == "lora" and q != "none" and q_given:
            raise ValueError(f"method 'lora' is unquantised; model.quantization={q!r} is method: qlora")
        if m not in ("qlora", *PREFERENCE_METHODS) and q != "none":  # DPO: QLoRA unless quantization: none
            self.model.__dict__["quantization"] = "none"
        if "preference" in self.model_fields_set and m not in PREFERENCE_METHODS:
            raise ValueError(f"the preference section is for method: dpo, not {m!r}")
        if m in PREFERENCE_METHODS and self.distributed.strategy == "fsdp":  # not built or tested: DDP is
            raise ValueError(f"method {m!r} runs on one GPU or under DDP, not FSDP yet; use distributed.strategy: ddp")
        if q == "int8" and self.distributed.strategy == "fsdp":  # bitsandbytes' Int8Params break under fully_shard
            raise ValueError("model.quantization: int8 does not shard under FSDP; use nf4 (or distributed.strategy: "
                             "ddp)")
        if self.model.adapter and m in FULL_METHODS:
            raise ValueError(f"model.adapter is a LoRA adapter to continue; method {m!r} has none")
        if m in FULL_METHODS and "lora" in self.model_fields_set:
            raise ValueError(f"method {m!r} trains every weight and has no LoRA adapter; remove the lora section")
        if m == "pretrain" and not self.model.config:
            raise ValueError("method 'pretrain' needs model.config (a hub id or directory with config.json, or "
                             "llama-60m, llama-130m, llama-350m, llama-1b)")  # fmt: skip
        if m != "pretrain" and self.model.config:
            raise ValueError(f"model.config is for method: pretrain (a fresh initialisation), not {m!r}")
        if self.train.optimizer_in_backward:
            if m not in FULL_METHODS:
                raise ValueError(f"train.optimizer_in_backward is for method full or pretrain, not {m!r}")
            if self.train.batch_size != self.train.micro_batch_size:
                raise ValueError("train.optimizer_in_backward steps in every backward pass: batch_size must equal "
                                 f"micro_batch_size (no accumulation), got {self.train.batch_size} and "
                                 f"{self.train.micro_batch_size}")  # fmt: skip
            if self.train.optimizer not in ("adamw_torch", "adamw_torch_fused"):
                raise ValueError(f"train.optimizer_in_backward runs torch AdamW per parameter, not "
                                 f"{self.train.optimizer!r}")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _streaming(self) -> Recipe:
        """A stream is plain text read on the fly, without a length: its held-out part is a count of documents."""
        d = self.data
        if d.streaming and not self.text_data:
            raise ValueError("data.streaming reads plain text: set data.format: text (instructions load whole)")
        if d.streaming and 0 < d.val_set_size < 1:
            raise ValueError(f"data.val_set_size={d.val_set_size:g} is a fraction, and a stream has no length: hold "
                             "out a number of documents (>= 1), or set data.val_split")  # fmt: skip
        if d.val_split and not d.streaming:
            raise ValueError("data.val_split is for data.streaming: true (otherwise data.val_path names the held-out "
                             "file)")  # fmt: skip
        return self

    @property
    def full(self) -> bool:
        """Every weight trains (method full or pretrain): no adapter, the run dir holds a whole model."""
        return self.method in FULL_METHODS

    @property
    def text_data(self) -> bool:
        """Plain text, known from the recipe alone (rows that turn out to be text are found when they are read)."""

        default = "text" if self.method == "pretrain" else None
        return (detect_path_format(self.data.path, self.data.format) or default) == "text"

    @model_validator(mode="after")
    def _velora_on_lora_layers(self) -> Recipe:
        if self.velora.enabled and not self.full:
            missing = [n for n in self.velora.module_names if n not in self.lora.module_names]
            if missing:
                raise ValueError(
                    f"velora.layers {missing} are not LoRA targets (lora.target_modules); "
                    "VeLoRA compresses the input of a LoRA A projection"
                )
        return self

    def run_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name or 'run'}")


TEXT_SUFFIXES = (".txt", ".md", ".text")  # plain text: data.format text (velora_cli/data/corpus.py)


def detect_path_format(path: str, fmt: str | None) -> str | None:
    """The format a path's suffix says (plain text files), else `fmt` (None: detect from the rows)."""
    return "text" if fmt is None and Path(path).suffix in TEXT_SUFFIXES else fmt
