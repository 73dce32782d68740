"""`method: dpo`: preference tuning on TRL's DPOTrainer, inside the same session as SFT.

TRL owns the DPO loss, the pair collator (chosen rows then rejected rows in one batch), the reference forward with the
adapter disabled (no second model in memory; starting from an SFT adapter, TRL keeps a frozen copy of it as the
reference adapter) and its chunked log-prob head, which never materialises the (tokens x vocabulary) logits. What
velora adds here, in a subclass rather than around it:
- the pairs arrive tokenised (data/preference.py, with TRL's own helpers), so the pre-flight checked exactly what
  trains; `_prepare_dataset` takes them as they are;
- a QLoRA adapter keeps the fp32 weights velora trains everywhere (TRL casts a quantised model's adapter to bf16);
- the session's callbacks (VeloraCallback, the step guard, checkpoint keeper, interrupt, monitor) and its
  TrainingArguments, so resume, checkpoints and metrics.jsonl work as for SFT;
- held-out pairs scored before and after: pair accuracy (the model gives chosen a higher log-probability than
  rejected) and DPO's reward accuracy and margin against the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from velora_cli.rundir.summary import PairScore


class VeloraDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer on pairs tokenised by data/preference.py, with the adapter's dtypes as velora built them."""

    def __init__(self, model, *args, **kwargs):
        dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        super().__init__(model, *args, **kwargs)
        for name, param in model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # already tokenised exactly as TRL would (data/preference.py)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "length" not in self._signature_columns:  # train.group_by_length's sampler reads it (TRL's collator not)
            self._signature_columns.append("length")


def dpo_arguments(session) -> DPOConfig:
    """The session's TrainingArguments as a DPOConfig, plus the recipe's preference section."""
    p, d = session.recipe.preference, session.recipe.data
    return session.training_arguments(
        DPOConfig,
        beta=p.beta,
        loss_type=[p.loss_type],
        max_length=d.cutoff_len,
        # lora.dropout applies as the recipe sets it (VeLoRA folds it into its own layer, which TRL's switch-off
        # of nn.Dropout modules would miss, leaving VeLoRA and stock LoRA training differently)
        disable_dropout=False,
        gradient_checkpointing=False,  # memory.checkpointing owns recomputation (engine/lean), as for SFT
        precompute_ref_log_probs=False,
        pad_to_multiple_of=8 if session.device.type == "cuda" else None,
    )


def make_dpo_trainer(session, callbacks: list) -> VeloraDPOTrainer:
    data = session.prepared.data
    return VeloraDPOTrainer(
        session.model,
        ref_model=None,  # the base with the adapter disabled (or TRL's frozen copy of a starting adapter)
        args=dpo_arguments(session),
        train_dataset=data.train_set,
        eval_dataset=data.val_set,
        processing_class=session.tokenizer,
        callbacks=callbacks,
    )


@torch.no_grad()
def score_pairs(trainer: VeloraDPOTrainer, dataset: Any, batch_size: int = 8) -> PairScore:
    """Policy and reference log-probabilities of every held-out pair (TRL's collator, fused head and reference)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    device = trainer.accelerator.device
    rows = [dataset[i] for i in range(len(dataset))]
    pair_hits = reward_hits = 0
    margins: list[float] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = trainer.data_collator(rows[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                        use_cache=False, fused_lm_head=True)  # fmt: skip
            chosen, rejected = out.log_probs.sum(dim=1).chunk(2)
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
            margin = trainer.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
            pair_hits += int((chosen > rejected).sum())
            reward_hits += int((margin > 0).sum())
            margins += margin.float().tolist()
    finally:
        model.train(was_training)
    n = len(rows)
    return PairScore(n, pair_hits / n, reward_hits / n, sum(margins) / n)
