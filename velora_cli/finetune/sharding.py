"""FSDP2 under transformers' Trainer: the arguments that turn it on, the CPU/gloo switch accelerate lacks, VeLoRA's
vectors made rank 0's on every rank, which checkpoints a sharded run resumes from, and the full state dict gathered
from the shards so the run dir holds a normal adapter or model any one process loads.

The sharding itself is accelerate's (`fully_shard` per decoder layer, fsdp_version=2), and so is the low-CPU-RAM
loading of an unquantised base (cpu_ram_efficient_loading: rank 0's weights broadcast into the shards of ranks that
built on meta, see models.load.rank0_reads_weights). accelerate passes over 4-bit models there, so for those the
same two steps are called here, followed by the one thing they lack: the quant states (shard_from_rank0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from velora_cli.config.recipe import Recipe
from velora_cli.rundir.layout import checkpoint_step


def decoder_layer_class(model: nn.Module) -> str:
    """The class FSDP wraps one unit each: the model's own `_no_split_modules` (LlamaDecoderLayer, ...)."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    names = list(getattr(base, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in base.modules()}
    found = [n for n in names if n in present]
    if not found:
        raise ValueError(f"{type(base).__name__} names no decoder-layer class (_no_split_modules) to shard by")
    return found[0]


def fsdp_arguments(recipe: Recipe, model: nn.Module, config: Any) -> dict[str, Any]:
    """TrainingArguments fields for FSDP2 as the recipe's `distributed.fsdp` asks (`config`: the base model's)."""
    from velora_cli.models.load import rank0_reads_weights

    fsdp = recipe.distributed.fsdp
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "transformer_layer_cls_to_wrap": [decoder_layer_class(model)],
            "reshard_after_forward": fsdp.reshard_after_forward,
            "cpu_offload": fsdp.cpu_offload,
            "state_dict_type": "FULL_STATE_DICT" if fsdp.state_dict == "full" else "SHARDED_STATE_DICT",
            # The memory planner's checkpointing (memory.checkpointing) stays in charge, not FSDP's own.
            "activation_checkpointing": False,
            # Rank 0 alone read the weights, the other ranks hold them on meta (models.load.load_recipe_base):
            # sharding hands each rank its part of rank 0's (accelerate's, or ShardingTrainer's for 4-bit bases).
            # A pretrain run initialises every rank alike instead.
            "cpu_ram_efficient_loading": recipe.method != "pretrain" and rank0_reads_weights(recipe.model, config),
        },
    }


def resumable_shards(complete: list[Path], recipe: Recipe, steps: int) -> list[Path]:
    """The complete checkpoints a sharded run resumes from. A last-step checkpoint of shards is left out: no single
    process loads them (session._finish_from reads whole files), and the Trainer, given them, trains a step past the
    end; so its steps are retrained, exactly, from the checkpoint before it (or the start). Whole checkpoints
    (`state_dict: full`) hold the adapter or model and finish the run as a single process's do."""
    last = checkpoint_step(complete[-1]) if complete else None
    if recipe.distributed.fsdp.state_dict == "sharded" and last is not None and last >= steps:
        return complete[:-1]
    return complete


class SharedVectors(TrainerCallback):
    """VeLoRA's v made rank 0's on every rank once the model is sharded (after a resume's vectors are loaded).

    FSDP shards and broadcasts parameters only; v is a buffer each rank built itself, and the ranks that started on
    meta (models.load.rank0_reads_weights) built it empty. A `random` v must match, and checkpoints record rank 0's.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        import torch.distributed as dist

        from velora_cli.engine import velora_layers

        for layer in velora_layers(model).values():
            dist.broadcast(layer.velora_v, src=0)


class ShardingTrainer(Trainer):
    """Trainer whose accelerator runs FSDP2 on CPU processes too, with VeLoRA's vectors shared (SharedVectors).

    accelerate enables FSDP only for GPU-type distributed states (state.py puts MULTI_CPU aside), although
    `fully_shard` itself runs on gloo: the CPU tests and the CPU benchmark need it. So the plugin the Trainer built
    is installed on the state afterwards, which is exactly what accelerate does on GPUs - the shared PartialState
    included: every later AcceleratorState() copies its distributed_type back, and a state that reads MULTI_CPU
    again is not FSDP2 to accelerate.get_state_dict, which then hands the Trainer's FULL_STATE_DICT checkpoint the
    raw DTensors (PEFT's save fails on them: "invalid python storage").
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_callback(SharedVectors())  # after the caller's VeloraCallback, which restores v on a resume
        check_same_model(self.model, self.accelerator.device)
        if self.accelerator.state.fsdp_plugin.cpu_ram_efficient_loading and four_bit_layers(self.model):
            # Sharded now, before the Trainer creates its optimizer: its prepare() takes an FSDP model as it is.
            shard_from_rank0(self.accelerator, self.model)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.is_fsdp_enabled or self.args.fsdp_plugin_args is None:
            return
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


def check_same_model(model: nn.Module, device: torch.device) -> None:
    """Every rank built the same model: parameter and buffer names, shapes, dtypes, which ones train (a collective).

    Ranks other than 0 build theirs on meta by a path of their own (models.load.rank0_reads_weights); any
    difference from rank 0's makes sharding or a later collective wait forever, so it is an error here instead.
    """
    import hashlib

    import torch.distributed as dist

    layout = [(n, tuple(t.shape), str(t.dtype), t.requires_grad)
              for n, t in (*model.named_parameters(), *model.named_buffers())]  # fmt: skip
    digest = torch.tensor(list(hashlib.sha256(repr(layout).encode()).digest()), dtype=torch.uint8, device=device)
    digests = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(digests, digest)
    differ = [rank for rank, d in enumerate(digests) if not torch.equal(d, digests[0])]
    if differ:
        raise RuntimeError(f"rank {differ[0]} built a model different from rank 0's (parameters, shapes, dtypes or "
                           "trainable flags): sharding would hang; this is a bug in velora's sharded loading")


def four_bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's bitsandbytes 4-bit linear layers by name (none without bitsandbytes)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return {}
    from bitsandbytes.nn import Linear4bit

    return {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}


def shard_from_rank0(accelerator, model: nn.Module) -> None:
    """Shard a 4-bit model that rank 0 alone loaded (and quantised) while the other ranks built it on meta
    (models.load.quantized_on_meta), and give every rank its part of rank 0's weights and all of its quant states.

    accelerate's low-CPU-RAM loading is these steps without the last: fsdp2_prepare_model skips it for models with
    Params4bit, as their quant states (absmax, code tables) are not in the state dict. A rank's quant states are
    the ones that must match its codes, and FSDP keeps them on the module (bitsandbytes reattaches them to the
    gathered weight in forward), so each rank holds all of them whole: about 3% of the codes' size.
    """
    import torch.distributed as dist
    from accelerate.utils import fsdp2_load_full_state_dict, fsdp2_prepare_model
    from torch.distributed.fsdp import CPUOffloadPolicy

    from velora_cli.models.load import quant_state_tensors

    states = {name: layer.quant_state for name, layer in four_bit_layers(model).items()}
    # Rank 0's weights live on in `full`; its parameters go to meta like the other ranks', so sharding allocates
    # nothing and loading makes the only shards (else rank 0 would briefly hold two sets: on a GPU, twice its share).
    full = {k: v.data for k, v in model.state_dict().items()} if accelerator.is_main_process else {}
    _parameters_to_meta(model)
    fsdp2_prepare_model(accelerator, model)
    offload = isinstance(accelerator.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy)
    fsdp2_load_full_state_dict(accelerator, model, full, cpu_offload=offload)
    del full
    for state in states.values():  # the same order on every rank: the modules' names
        for holder, attr in quant_state_tensors(state):
            tensor = getattr(holder, attr)
            if accelerator.is_main_process:
                tensor = tensor.to(accelerator.device)
            else:
                tensor = torch.empty(tensor.shape, dtype=tensor.dtype, device=accelerator.device)
            dist.broadcast(tensor, src=0)
            setattr(holder, attr, tensor)
    # Loading assigns every tensor anew, which unties lm_head from the embeddings (accelerate ties them after too).
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _parameters_to_meta(model: nn.Module) -> None:
    """Every parameter on meta, its class and attributes kept (a Params4bit its quant state, which stays real), tied
    parameters still one object; buffers are left as they are (accelerate's meta move would lose RoPE's)."""
    swapped: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or param.is_meta:
                continue
            if id(param) not in swapped:
                kwargs = {k: v for k, v in param.__dict__.items() if k != "_is_hf_initialized"}
                empty = torch.empty(param.shape, dtype=param.dtype, device="meta")
                swapped[id(param)] = type(param)(empty, requires_grad=param.requires_grad, **kwargs)
            module._parameters[name] = swapped[id(param)]


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, gathered from every rank's shards onto rank 0's CPU (a collective: every rank calls it;
    the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (lm_head = embed_tokens) come back as two entries; a single process saves the first name only.
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            state.pop(name, None)
        seen.add(id(param))
    return state


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Every element finite, on every rank. FSDP2 tensors are DTensors: each rank checks its own shard and the ranks
    agree by an all-reduce, so all of them stop together (a collective: every rank calls it when any is sharded)."""
    from torch.distributed.tensor import DTensor

    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    local = [t for t in local if t.numel()]
    finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(local))).all()) if local else True
    if any(isinstance(t, DTensor) for t in tensors):
        import torch.distributed as dist

        flag = torch.tensor([int(finite)], device=local[0].device if local else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite
