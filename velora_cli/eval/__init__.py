"""Evaluation: 5-shot MMLU (eval.mmlu_data, eval.mmlu_prompts, eval.scorer, eval.summary), held-out exact match
(eval.heldout), and the `velora eval` command with the model loading it shares with the pipeline (eval.command)."""
