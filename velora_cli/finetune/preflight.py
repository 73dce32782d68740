"""Pre-flight checks: everything a command will need, checked before a model loads or a file is written.

For `finetune` that is every chosen stage's inputs - the model's config.json (not its weights) and the LoRA /
VeLoRA shapes against it on a weightless meta-device model, the training data decoded, parsed, counted and
tokenised, the held-out and MMLU files parsed - and every output location: a path that is a file, a read-only or
full file system. An input problem is one line naming the file, field or row (exit 2); an output location that
cannot be written is one line naming it (exit 1). Either way the run directory is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velora_cli.common.errors import RecipeError, UsageError
from velora_cli.common.fs import check_writable
from velora_cli.config.preference import PREFERENCE_METHODS


@dataclass
class Preflight:
    """What the checks loaded, so the stages need not load it again."""

    recipe: Any  # the recipe every stage runs with: finetune.prepare's for the train stage, else as loaded
    session: Any = None  # finetune.session.FinetuneSession, prepared (train stage)
    source: Any = None  # the base model's resolved reference (models.load.ModelSource), for every stage
    heldout: list[dict[str, str]] = field(default_factory=list)
    mmlu: dict[str, Any] | None = None  # local MMLU data (eval stage)


def needs_cuda(recipe) -> str | None:
    """The recipe field that only runs on a CUDA GPU, if any: such a recipe targets one wherever it is planned."""
    if recipe.train.optimizer in ("paged_adamw_8bit", "paged_adamw_32bit"):
        return f"train.optimizer={recipe.train.optimizer}"
    if recipe.model.attn_implementation == "flash_attention_2":
        return "model.attn_implementation=flash_attention_2"
    if recipe.memory.offload:
        return "memory.offload=true"
    return None


def check_trainable(recipe, planning: bool = False) -> None:
    """Combinations that cannot train, caught before any weights are loaded. `planning` (a dry run) plans for the
    recipe's target GPU: what needs CUDA is not refused on a machine without one."""
    import importlib.util

    import torch

    if recipe.model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(f"model.quantization={recipe.model.quantization!r} needs bitsandbytes (not installed)")
    cuda = torch.cuda.is_available() or planning
    if recipe.train.optimizer in ("paged_adamw_8bit", "paged_adamw_32bit") and not cuda:
        raise UsageError(f"train.optimizer={recipe.train.optimizer!r} needs CUDA; use adamw_torch on CPU")
    if recipe.distributed.fsdp.cpu_offload and not cuda:  # FSDP2's CPUOffloadPolicy copies shards to the GPU
        raise UsageError("distributed.fsdp.cpu_offload moves the shards between GPU and host memory and needs CUDA; "
                         "CPU processes hold them in host memory already: remove it on CPU")  # fmt: skip
    if recipe.model.attn_implementation == "flash_attention_2":
        if not planning and (not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None):
            raise RecipeError("model.attn_implementation=flash_attention_2 needs a CUDA device and the flash-attn "
                              "package (pip install flash-attn); use sdpa otherwise")  # fmt: skip
        if recipe.model.compute_dtype == "fp32":
            raise RecipeError("model.attn_implementation=flash_attention_2 computes in bf16/fp16: set "
                              "model.compute_dtype to auto, bf16 or fp16")  # fmt: skip


def check_resumable_optimizer(recipe, run_dir: Path, velora: bool) -> None:
    """The newest checkpoint's optimizer state must be of the kind this recipe trains with: LayerwiseAdamW's
    (train.optimizer_in_backward) and an ordinary AdamW's do not load into each other (torch's param-group error)."""
    from velora_cli.finetune.layerwise import stepped_in_backward
    from velora_cli.rundir.verify import sound_checkpoints

    complete = sound_checkpoints(run_dir, velora)[0]
    written = stepped_in_backward(complete[-1]) if complete else None
    wanted = recipe.train.optimizer_in_backward
    if written is not None and written != wanted:
        was, now = str(written).lower(), str(wanted).lower()
        raise UsageError(
            f"{complete[-1]}: written with train.optimizer_in_backward={was}, and this run sets it to {now}; the "
            f"optimizer state cannot carry over. Resume with train.optimizer_in_backward={was}, or start afresh "
            "with --no-resume"
        )


def check_memory(recipe, config, planning: bool = False) -> None:
    """The memory section against the model's config and this machine: every:K needs K <= the number of decoder
    layers (a larger K checkpoints layer 0 only, which every:L already says); offload needs CUDA (unless
    `planning` for the recipe's GPU)."""
    import torch

    from velora_cli.common.errors import RecipeError

    if recipe.memory.offload and not torch.cuda.is_available() and not planning:
        raise RecipeError(
            "memory.offload=true copies saved activations from the GPU to CPU memory; there is no CUDA device "
            "here (on CPU they are in CPU memory already): set memory.offload: false"
        )
    spec, layers = recipe.memory.checkpointing, getattr(config, "num_hidden_layers", None)
    if spec.startswith("every:") and layers and int(spec.partition(":")[2]) > layers:
        raise RecipeError(
            f"memory.checkpointing={spec}: the model has {layers} decoder layers; every:K checkpoints layers 0, K, "
            f"2K, ..., so K must be at most {layers} (every:{layers} checkpoints layer 0 only)"
        )


def check_reporting(recipe) -> None:
    """train.report_to's backends are installed: transformers only finds out once the model is loaded."""
    import importlib.util

    from velora_cli.common.errors import RecipeError

    for backend in recipe.train.report_to:
        if importlib.util.find_spec(backend) is None:
            raise RecipeError(f"train.report_to: {backend} is not installed (pip install {backend})")


def preflight(recipe, stages: list[str], run_dir: Path, *, has_adapter: bool, resume: bool = False,
              planning: bool = False) -> Preflight:  # fmt: skip
    """Check every input and output of the chosen `stages` (see the module docstring); raise before writing.
    `resume`: the train stage will continue from the run's newest checkpoint; `planning`: a dry run."""
    from velora_cli.data.load import load_records

    checks = Preflight(recipe)
    check_writable(run_dir, "output.dir", directory=True)
    if "train" not in stages and not has_adapter:
        raise UsageError(f"{run_dir}: no trained adapter yet; run the train stage first")
    if "train" in stages:
        from velora_cli.finetune.session import FinetuneSession

        check_reporting(recipe)
        import torch

        from velora_cli.common.device import default_device

        target = torch.device("cuda") if planning and needs_cuda(recipe) else default_device()
        session = FinetuneSession(recipe, run_dir, target)
        prepared = session.prepare()  # model config, shapes on a meta model, the data: read once, here
        checks.recipe, checks.session, checks.source = prepared.recipe, session, prepared.source
        if recipe.full and resume:
            check_resumable_optimizer(recipe, run_dir, bool(prepared.compressed))
        check_memory(recipe, prepared.config, planning)
        session.total_steps()  # a stream has no length: it needs train.max_steps
        h = recipe.eval.heldout
        if h.enabled:
            # read in the training data's format, so a bad row names its missing field
            fmt = prepared.data.format if prepared.data.format != "text" else None
            rows = prepared.data.val_records
            if h.path and recipe.method in PREFERENCE_METHODS:  # preference pairs, scored before and after
                from velora_cli.data.preference import load_pairs

                rows = load_pairs(h.path, "validation", recipe.data.skip_bad_rows, field="eval.heldout.path").pairs
            elif h.path:
                rows = load_records(h.path, field="eval.heldout.path", fmt=fmt).records
            if not rows:
                raise UsageError("eval.heldout: enabled without a path, and the recipe holds out no validation rows")
            checks.heldout = list(rows)[: h.limit]
    elif not recipe.full:  # export and eval load the run's base: resolved here, once
        from velora_cli.models.load import resolve_model

        checks.source = resolve_model(recipe.model.name)
    if "export" in stages:
        from velora_cli.export.options import default_out

        target = Path(recipe.export.dir) if recipe.export.dir else default_out(run_dir, None, adapter_only=False)
        check_writable(target, "export.dir", directory=True)
    if "eval" in stages:
        m = recipe.eval.mmlu
        from velora_cli.common.hub import offline, require_hub
        from velora_cli.eval.mmlu_data import load_mmlu

        if m.data_dir:
            try:
                checks.mmlu = load_mmlu(
                    Path(m.data_dir), split=m.split, subjects=m.subjects, limit=m.limit, shots=m.shots
                )
            except UsageError as exc:  # DataError included: keep the type (and exit code), name the field
                raise type(exc)(f"eval.mmlu.data_dir: {exc}") from None
        elif m.enabled and not offline():  # eval.perplexity alone reads local text: no hub
            require_hub("eval.mmlu: cais/mmlu")
    return checks
