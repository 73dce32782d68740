"""The end-to-end checks of the GPU truth run, on a 1B-shaped (TinyLlama-1.1B) random model saved as a local
bf16 checkpoint with a tokenizer trained here (nothing downloaded):

- builder check: the in-place quantisation every measurement uses (fast: 7B from random on the GPU in seconds)
  gives the same weights, memory and logits as loading the checkpoint with BitsAndBytesConfig, as
  `velora finetune` does;
- `pytest -m cuda` (the engine on real Linear4bit / Linear8bitLt CUDA kernels, paged optimizers);
- the cached MMLU scorer vs the per-question reference (benchmarks/mmlu_speed.py): agreement and speed;
- `velora export` of an adapter trained on the checkpoint's model (QLoRA + VeLoRA v,d, a few steps), and the
  merged model checked against PEFT over the same base.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_R,
    NUM_GROUPS,
    REPO,
    SHAPES,
    VELORA_VD,
    Workload,
    no_cpu_repacking_,
    quantize_nf4_,
    random_model,
    run_cmd,
    tensor_bytes,
)
from stage_memory import Config, build_qlora, measure_training

MMLU_DATA = REPO / "recipes" / "data" / "mmlu_mini"
MMLU_SUBJECTS = "astronomy,philosophy,high_school_geography,nutrition"


def train_tokenizer(path: Path, vocab: int):
    """A byte-level BPE trained on the repo's MMLU CSVs and docs (nothing downloaded): MMLU and export need one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_text(encoding="utf-8") for p in sorted(MMLU_DATA.rglob("*.csv"))]
    texts += [(REPO / name).read_text(encoding="utf-8") for name in ("README.md", "BENCHMARKS.md")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 8000), special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.pad_token = fast.eos_token
    fast.save_pretrained(path)
    return fast


def checkpoint_stage(args: argparse.Namespace) -> dict[str, Any]:
    """The 1B shape as a bf16 checkpoint + tokenizer on local disk (same seed: the measured model's weights)."""
    shape = args.export_shape
    ckpt = args.work / "ckpt-1b"
    began = time.perf_counter()
    model = random_model(shape, args.torch_device)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 0, 1, 1
    model.save_pretrained(ckpt)
    del model
    gc.collect()
    if args.torch_device.type == "cuda":
        torch.cuda.empty_cache()
    saved_s = time.perf_counter() - began
    tok = train_tokenizer(ckpt, SHAPES[shape]["vocab_size"])
    args.ckpt = ckpt
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    return {"path": str(ckpt), "shape": shape, "weights_bytes": size, "save_s": round(saved_s, 1),
            "tokenizer_vocab": len(tok)}  # fmt: skip


def builder_check_stage(args: argparse.Namespace) -> dict[str, Any]:
    """In-place nf4 (used for every measurement) vs from_pretrained + BitsAndBytesConfig (what finetune does)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = args.torch_device
    cuda = device.type == "cuda"
    ids = torch.randint(0, SHAPES[args.export_shape]["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)

    def weights_bytes(model) -> int:
        return torch.cuda.memory_allocated() if cuda else tensor_bytes(model)

    def logits(model) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids).logits.float().cpu()

    if cuda:
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated() if cuda else 0
    began = time.perf_counter()
    inplace = random_model(args.export_shape, device)
    quantize_nf4_(inplace, device)
    if cuda:
        torch.cuda.empty_cache()
    inplace_s = time.perf_counter() - began
    inplace_bytes = weights_bytes(inplace) - base
    a = logits(inplace)
    del inplace
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8,
    )  # fmt: skip
    began = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "quantization_config": bnb_config}
    if cuda:
        kwargs["device_map"] = {"": device.index or 0}
    loaded = AutoModelForCausalLM.from_pretrained(args.ckpt, **kwargs)
    no_cpu_repacking_(loaded)
    loaded_s = time.perf_counter() - began
    loaded_bytes = weights_bytes(loaded) - base
    b = logits(loaded)
    del loaded
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    diff = (a - b).abs().max().item()
    return {
        "inplace_bytes": inplace_bytes,
        "from_pretrained_bytes": loaded_bytes,
        "bytes_ratio": round(inplace_bytes / loaded_bytes, 6) if loaded_bytes else None,
        "max_abs_logit_diff": diff,
        "identical_logits": diff == 0.0,
        "inplace_s": round(inplace_s, 2),
        "from_pretrained_s": round(loaded_s, 2),
    }


# ---------------------------------------------------------------------------------- tests, MMLU, export


def cuda_tests_stage(args: argparse.Namespace) -> dict[str, Any]:
    xml = args.work / "pytest_cuda.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    cmd += ["--continue-on-collection-errors", f"--junitxml={xml}", "tests"]
    res = run_cmd(cmd, args, timeout=args.pytest_timeout, log_name="pytest_cuda.log")
    counts: dict[str, int] = {}
    failed: list[str] = []
    if xml.is_file():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    res.update(counts=counts, failed=failed)
    if res["rc"] not in (0, 5):  # 5: nothing selected
        res["error"] = f"pytest -m cuda exited {res['rc']}: {len(failed)} failed/errored"
    return res


def mmlu_data(args: argparse.Namespace) -> Path:
    """The repo's mini-MMLU, its test questions repeated `--mmlu-repeat` times (more timed questions; the
    5-shot dev prefixes stay the real ones)."""
    out = args.work / "mmlu"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(MMLU_DATA, out)
    for csv in (out / "test").glob("*.csv"):
        text = csv.read_text(encoding="utf-8")
        csv.write_text((text if text.endswith("\n") else text + "\n") * args.mmlu_repeat, encoding="utf-8")
    return out


def mmlu_stage(args: argparse.Namespace) -> dict[str, Any]:
    data = mmlu_data(args)
    figures = args.work / "mmlu_speed.json"
    cmd = [sys.executable, "benchmarks/mmlu_speed.py", "--model", str(args.ckpt), "--data-dir", str(data)]
    cmd += ["--subjects", MMLU_SUBJECTS, "--limit", str(args.agreement_limit), "--json", str(figures)]
    res = run_cmd(cmd, args, timeout=args.sub_timeout)
    if figures.is_file():
        res["figures"] = json.loads(figures.read_text(encoding="utf-8"))
    if res["rc"] != 0:
        res["error"] = f"mmlu_speed.py exited {res['rc']}"
    return res


def export_stage(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = args.work / "run-1b"
    w = Workload("export_1b", args.export_shape, 2, 64, steps=2)
    cfg = Config("qlora_velora_vd", velora=VELORA_VD)
    trained = measure_training(w, lambda: build_qlora(w.shape, cfg, args.torch_device), args, save_adapter=run_dir)
    for f in args.ckpt.iterdir():  # the run's tokenizer, as a finetune run directory holds it
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, run_dir / f.name)
    recipe = (
        "name: gpu-truth-1b\n"
        f"model: {{name: {json.dumps(str(args.ckpt))}, quantization: nf4, compute_dtype: bf16}}\n"
        f"lora: {{r: {LORA_R}, alpha: {LORA_ALPHA}, dropout: {LORA_DROPOUT}}}\n"
        f"velora: {{enabled: true, layers: [v, d], num_groups: {NUM_GROUPS}}}\n"
        "data: {path: unused.json}\n"
        "memory: {loss: full, lean_ops: false}\n"
    )
    (run_dir / "recipe.yaml").write_text(recipe, encoding="utf-8")
    merged = args.work / "merged-1b"
    cmd = [sys.executable, "-m", "velora_cli", "export", str(run_dir), "--out", str(merged), "--dtype", "bf16"]
    cmd.append("--force")
    res = run_cmd(cmd, args, timeout=args.sub_timeout)
    if res["rc"] != 0:
        res["error"] = f"velora export exited {res['rc']}"
        return res
    res["exported_bytes"] = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    res["files"] = sorted(p.name for p in merged.iterdir())
    res["check"] = merged_check(args, run_dir, merged)
    res["adapter_training"] = {k: trained[k] for k in ("loss_first", "loss_last", "finite", "tokens_per_s")}
    return res


def merged_check(args: argparse.Namespace, run_dir: Path, merged: Path) -> dict[str, Any]:
    """The merged export vs PEFT's adapter over the same unquantised bf16 base: same logits up to bf16 rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = args.torch_device
    ids = torch.randint(0, SHAPES[args.export_shape]["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)
    out = {}
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).to(device).eval()
        a = m(input_ids=ids).logits.float()
        del m
        base = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.bfloat16).to(device)
        p = PeftModel.from_pretrained(base, str(run_dir)).eval()
        b = p(input_ids=ids).logits.float()
        c = p.get_base_model()
        with p.disable_adapter():
            base_logits = c(input_ids=ids).logits.float()
        del p, base, c
    out["max_abs_logit_diff_vs_peft"] = (a - b).abs().max().item()
    out["max_abs_logit_diff_vs_base"] = (b - base_logits).abs().max().item()  # the adapter does something
    out["logit_scale"] = b.abs().max().item()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


