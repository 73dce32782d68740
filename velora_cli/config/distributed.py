"""The recipe's `distributed:` section: how several processes share a run (DDP replicas or FSDP2 shards).

`strategy: auto` is resolved once, in finetune/prepare.py, from the memory planner: DDP when one GPU holds the
whole run, FSDP otherwise (velora_cli.memory.sharding). A single process ignores the section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FsdpSection(_Section):
    cpu_offload: bool = False  # parameters, gradients and optimizer state live in CPU memory between uses
    reshard_after_forward: bool = True  # free the gathered layer after its forward (ZeRO-3); False: ZeRO-2-like
    # checkpoints - sharded: every rank writes its own shard (torch.distributed.checkpoint), fast and low-memory;
    # full: rank 0 gathers the whole state and writes it (the adapter or model as one process saves it, plus the
    # whole model and optimizer state in accelerate's files: the base weights too for LoRA, so larger and slower)
    state_dict: Literal["sharded", "full"] = "sharded"


class DistributedSection(_Section):
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    fsdp: FsdpSection = Field(default_factory=FsdpSection)
    rdzv_timeout: int = Field(900, gt=0)  # seconds the launcher waits for every node to join

    def shards(self) -> bool:
        """FSDP in this process: the strategy is fsdp and several processes run (a single one trains unsharded)."""
        from velora_cli.common.device import world_size  # torch: not for readers of recipes such as `velora runs`

        return self.strategy == "fsdp" and world_size() > 1
