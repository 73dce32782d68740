"""The recipe's `distributed:` section: how several processes share a run (DDP replicas or FSDP2 shards).

`strategy: auto` is resolved once, in finetune/prepare.py, from the memory planner: DDP when one GPU holds the
whole run, FSDP otherwise (velora_cli.memory.sharding). A single process ignores the section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FsdpSection(_Section):
    cpu_offload: bool = False  # parameters, gradients and optimizer state live in CPU memory between uses
    reshard_after_forward: bool = True  # free the gathered layer after its forward (ZeRO-3); False: ZeRO-2-like
    # sharded: every rank writes its own shard (torch.distributed.checkpoint), fast and low-memory;
    # full: rank 0 gathers the whole state (one file set any single process can read)
    state_dict: Literal["sharded", "full"] = "sharded"

    @field_validator("state_dict")
    @classmethod
    def _full_not_yet(cls, value: str) -> str:
        # transformers 5.24 hands PEFT DTensors when it saves a gathered FSDP2 checkpoint, and resuming from one
        # hung in our tests: refuse it rather than write checkpoints that cannot be resumed. The final adapter/model
        # is always gathered whole, whatever this says.
        if value == "full":
            raise ValueError("'full' is not supported yet (resuming from a gathered FSDP2 checkpoint hangs); use "
                             "sharded - the run dir's final adapter or model is saved whole either way")  # fmt: skip
        return value


class DistributedSection(_Section):
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    fsdp: FsdpSection = Field(default_factory=FsdpSection)
    rdzv_timeout: int = Field(900, gt=0)  # seconds the launcher waits for every node to join

    def shards(self) -> bool:
        """FSDP in this process: the strategy is fsdp and several processes run (a single one trains unsharded)."""
        from velora_cli.common.device import world_size  # torch: not for readers of recipes such as `velora runs`

        return self.strategy == "fsdp" and world_size() > 1
