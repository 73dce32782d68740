"""The recipe's `preference:` section: how `method: dpo` tunes on prompt/chosen/rejected pairs.

DPO runs on TRL's DPOTrainer (velora_cli/finetune/preference.py); these fields map onto its DPOConfig. The QLoRA/LoRA
path, VeLoRA and the `memory:` section apply as for SFT. `data.cutoff_len` is the longest prompt + completion
(TRL's max_length: a longer completion is cut at its end). ORPO is not offered: TRL 1.16 ships it only under
`trl.experimental` (an API TRL says may change or go without notice), so velora builds on DPO alone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PREFERENCE_METHODS = ("dpo",)

# TRL's DPO losses that need no extra field velora does not expose (exo_pair needs label smoothing > 0).
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
              "sigmoid_norm")  # fmt: skip


class PreferenceSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    beta: float = Field(0.1, gt=0)  # strength of the pull towards the reference (DPO's beta)
    loss_type: Literal[LOSS_TYPES] = "sigmoid"  # type: ignore[valid-type]
    # A pair whose prompt is longer is refused (or skipped with data.skip_bad_rows); None: only cutoff_len bounds it
    max_prompt_length: int | None = Field(None, gt=0)
    # Chosen and rejected completions are cut to this many tokens (None: only cutoff_len bounds them)
    max_completion_length: int | None = Field(None, gt=0)
