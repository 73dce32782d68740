"""What a memory estimate depends on: the Settings of a training run, resolved once from a recipe (and the
command-line shortcuts), and the byte sizes of the dtypes it names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from velora_cli.common.device import auto_compute_name
from velora_cli.common.errors import RecipeError
from velora_cli.config.preference import PREFERENCE_METHODS
from velora_cli.config.presets import LLAMA_PROJECTIONS
from velora_cli.engine.config import DEFAULT_NUM_GROUPS
from velora_cli.engine.lean.policy import Recompute, parse_checkpointing

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

OFFLOAD_IN_FLIGHT = 2  # layers of saved tensors on the GPU under offload: one being copied, one in use (assumption)


@dataclass(frozen=True)
class Settings:
    """Everything the estimate depends on, resolved from a recipe (and the command-line shortcuts)."""

    batch: int
    seq: int
    quantization: str = "nf4"
    double_quant: bool = True
    compute: str = "bf16"  # fp32 | bf16 | fp16
    device: str = "cuda"  # cuda | cpu: dropout masks are bool on CUDA, float on CPU; overhead only on CUDA
    attn: str = "sdpa"  # sdpa | eager
    lora_r: int = 8
    lora_dropout: float = 0.05
    targets: tuple[str, ...] = LLAMA_PROJECTIONS
    velora: tuple[str, ...] = ("v_proj", "down_proj")  # empty: VeLoRA off
    # one count, or per layer ((module name, count), ...: hashable, as the planner keeps Settings in a set)
    num_groups: int | tuple[tuple[str, int], ...] | None = DEFAULT_NUM_GROUPS
    subtoken_size: int | None = None
    gradient_checkpointing: bool = False  # the stock switch (input grads on); `checkpointing` is apply_lean's
    optimizer: str = "adamw_torch"
    loss: str = "full"  # full | chunked
    lean_ops: bool = False
    checkpointing: str = "none"  # none | all | mlp | every:K (apply_lean; "auto" is resolved by memory.plan)
    offload: bool = False
    chunk_size: int | None = None
    method: str = "qlora"  # full / pretrain: every weight trains (memory/full.py)
    optimizer_in_backward: bool = False
    packing: bool = False  # data.packing: rows of several examples, position_ids per row (see `activations`)

    @property
    def recompute(self) -> Recompute:
        return parse_checkpointing("all" if self.gradient_checkpointing else self.checkpointing)

    @property
    def full(self) -> bool:
        return self.method in ("full", "pretrain")

    @property
    def c(self) -> int:
        return DTYPE_BYTES[self.compute]

    @property
    def pairs(self) -> bool:
        """A preference method (DPO): each example is two sequences (chosen, rejected) plus a reference forward."""
        return self.method in PREFERENCE_METHODS

    @property
    def sequences(self) -> int:
        """Rows of a micro-batch: DPO's collator stacks the chosen and the rejected rows of every pair."""
        return self.batch * (2 if self.pairs else 1)

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq

    def groups_for(self, depth: int, layer: str) -> int:
        """Sub-tokens per token (D/M) VeLoRA keeps for the projection `layer` of input depth `depth`."""
        if self.subtoken_size is not None:
            return max(1, depth // self.subtoken_size)
        if isinstance(self.num_groups, tuple):
            return dict(self.num_groups).get(layer, DEFAULT_NUM_GROUPS)
        return self.num_groups or DEFAULT_NUM_GROUPS

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"], d["velora"] = list(self.targets), list(self.velora)
        return d


def _num_groups(velora: Any) -> int | tuple[tuple[str, int], ...] | None:
    """The recipe's VeLoRA grouping as Settings holds it: per-layer counts by module name ({v: 64} -> v_proj)."""
    if velora.subtoken_size is not None:
        return None
    groups = velora.to_config().num_groups
    return tuple(sorted(groups.items())) if isinstance(groups, dict) else groups


def settings_from_recipe(recipe: Any, device: str = "cuda") -> Settings:
    compute = recipe.model.compute_dtype
    if compute == "auto":  # planned for a current GPU (bf16) or this CPU
        compute = auto_compute_name(device)
    assert compute in DTYPE_BYTES
    targets = tuple(recipe.lora.module_names) if not getattr(recipe, "full", False) else ()
    unknown = [t for t in targets if t not in LLAMA_PROJECTIONS]
    if unknown:
        raise RecipeError(
            f"lora.target_modules: {unknown[0]!r} is not a LLaMA projection; memory-estimate models "
            f"{', '.join(LLAMA_PROJECTIONS)}"
        )
    velora = tuple(recipe.velora.module_names) if recipe.velora.enabled else ()
    return Settings(
        batch=recipe.train.micro_batch_size,
        seq=recipe.data.cutoff_len,
        quantization=recipe.model.quantization,
        double_quant=recipe.model.double_quant,
        compute=compute,
        device=device,
        # flash-attention keeps what SDPA's fused kernels keep (q, k, v, output, log-sum-exp), no probabilities
        attn="eager" if recipe.model.attn_implementation == "eager" else "sdpa",
        lora_r=recipe.lora.r,
        lora_dropout=recipe.lora.dropout,
        targets=targets,
        velora=velora,
        num_groups=_num_groups(recipe.velora),
        subtoken_size=recipe.velora.subtoken_size,
        optimizer=recipe.train.optimizer,
        # train.gradient_checkpointing is folded into memory.checkpointing by the recipe; auto stays for the planner
        loss=recipe.memory.loss,
        lean_ops=recipe.memory.lean_ops,
        checkpointing=recipe.memory.checkpointing,
        offload=recipe.memory.offload,
        chunk_size=recipe.memory.chunk_size,
        method=recipe.method,
        optimizer_in_backward=recipe.train.optimizer_in_backward,
        packing=recipe.data.packing and not recipe.text_data,
    )
